"""Where training text comes from: the ``--data`` string -> a ``Source`` that yields the text of its documents.

    tinystories      Hugging Face ``roneneldan/TinyStories``, its "train" and "validation" splits. With
                     ``max_docs`` it is streamed, so a subset downloads only what it reads: the first ``max_docs``
                     training stories and the first ``max(1, max_docs // 10)`` validation stories (TinyStories'
                     own validation split is ~1% of its size; a tenth keeps the validation loss of a small run
                     from resting on a handful of stories). Without ``datasets`` or without the Hub it says so
                     in one line and uses ``stories`` instead (``info["source"]`` tells which one was used).
    stories          the generated corpus of ``minigpt/stories.py`` (20000 stories; ``max_docs`` takes fewer)
    hf:NAME[:CONFIG] any Hugging Face text dataset (or a local dataset folder); "train", plus "validation" when
                     there is one; ``text_field`` names the column with the text
    a path           a .txt file, a folder (every *.txt inside, recursively, sorted) or a glob of .txt files;
                     each file is one document. Devices, FIFOs and sockets are refused (one may never end)

Resolving a source reads and downloads nothing: ``Source.open()`` does, when the token cache
(minigpt/token_cache.py) has no entry for it yet. A large file comes in several pieces, each cut where GPT-2's
pre-tokenizer starts a new token anyway, so the pieces tokenize exactly as the whole file would.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kernels.errors import MinigptError

from . import stories
from .files import can_reach

__all__ = ["DataError", "Pieces", "Source", "SourceUnavailable", "resolve_source", "stories_source"]

log = logging.getLogger(__name__)

TINYSTORIES = "roneneldan/TinyStories"
CHUNK_CHARS = 1 << 20  # a text file is read and tokenized about this many characters at a time
HF_BATCH_ROWS = 1000  # rows per read from a Hugging Face split
# A text piece is a (text, ends_document) pair: a document may come in several pieces (a large file in chunks).
Pieces = Iterator[tuple[str, bool]]


class DataError(MinigptError, ValueError):
    """A problem with the data the user asked for; the message names it and says how to fix it. The one error of
    the whole data pipeline (sources, token cache, windows), defined here at its start."""


class SourceUnavailable(Exception):
    """TinyStories cannot be loaded here (no `datasets`, no network): the caller falls back to `stories`."""


@dataclass
class Source:
    label: str  # what info["source"] reports
    slug: str  # a short, file-name-safe name for the cache files
    descriptor: dict  # everything that decides the text (hashed into the cache key)
    layouts: tuple  # the split-name tuples it may have: ("train", "validation") and/or ("all",)
    # Opening may use the network; it returns {split name: (pieces factory, number of documents or None)}.
    open: Callable[[], dict[str, tuple[Callable[[], Pieces], int | None]]]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[:40] or "data"


def _stat_list(paths: list[str]) -> list:
    return [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]


def stories_source(max_docs: int | None) -> Source:
    n = max_docs or stories.DEFAULT_NUM_STORIES

    def pieces() -> Pieces:
        return ((s, True) for s in stories.generate_stories(n, seed=0))

    return Source("stories", "stories", {"kind": "stories", "version": stories.CORPUS_VERSION, "n": n, "seed": 0},
                  (("all",),), lambda: {"all": (pieces, n)})


def _safe_cut(buf: str) -> int:
    """Where to end a chunk of a large file so it tokenizes exactly as the whole file would: just before a
    single newline (else a single space) with non-space characters on both sides. GPT-2's pre-tokenizer starts a
    new piece there in any case, so the cut changes no token. 0 means "read more first"."""
    start = max(1, len(buf) - (1 << 16))  # look in the last 64K characters only
    for pattern in (r"(?<=\S)\n(?=\S)", r"(?<=\S) (?=\S)"):
        last = None
        for last in re.finditer(pattern, buf[start:]):
            pass
        if last is not None:
            return start + last.start()
    # A file with no such place in 8 chunks (no spaces at all): cut anyway; at most one token differs.
    return len(buf) if len(buf) >= 8 * CHUNK_CHARS else 0


def _file_pieces(paths: list[str]) -> Pieces:
    for path in paths:
        try:
            with open(path, encoding="utf-8-sig") as f:
                buf = ""
                while block := f.read(CHUNK_CHARS):
                    buf += block
                    cut = _safe_cut(buf)
                    if cut:
                        yield buf[:cut], False
                        buf = buf[cut:]
                yield buf, True
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason}) — convert it to UTF-8 "
                            f"(e.g. iconv -f latin1 -t utf-8) or remove it from the data") from None


def _walk_txt(folder: str) -> list[str]:
    """Every .txt file under ``folder``, following links to folders but entering each real folder once (a link
    back to a parent would otherwise loop)."""
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        files += [os.path.join(root, name) for name in names if name.endswith(".txt")]
    return sorted(files)


def _readable_once(paths: list[str]) -> list[str]:
    """``paths`` without broken links (dangling, or a loop) and without second names of one real file (a link to
    a file also found under its own name, or a glob through a linked folder): each file is read once."""
    kept, seen, broken = [], set(), []
    for path in paths:
        try:
            info = os.stat(path)  # follows links: fails for a dangling or looping one
        except OSError:
            broken.append(path)
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        key = (info.st_dev, info.st_ino)
        if key not in seen:
            seen.add(key)
            kept.append(path)
    if broken:
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        log.warning("note: skipping %d broken link(s) in the data: %s", len(broken), shown)
    return kept


def _special_kind(path: str) -> str:
    """What a path that is neither a regular file nor a folder is, in words: "a character device", "a FIFO"."""
    mode = os.stat(path).st_mode
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def _files_source(data: str, max_docs: int | None) -> Source:
    path = os.path.expanduser(data)
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = _readable_once(_walk_txt(path))
        if not files:
            raise DataError(f"no .txt files in folder {data} — put the text in .txt files (UTF-8) or give a glob")
    elif glob.has_magic(path):
        files = _readable_once(sorted(p for p in glob.glob(path, recursive=True) if p.endswith(".txt")))
        if not files:
            raise DataError(f"no .txt files match {data!r} — check the pattern (quote it so the shell keeps it)")
    elif os.path.exists(path):
        raise DataError(f"{data} is {_special_kind(path)}, not a file or folder — only regular .txt files and "
                        "folders of them are read (a device or a pipe may never end): save the text in a .txt file")
    else:
        raise DataError(f"no such file or folder: {data} — give a .txt file, a folder of .txt files, a glob, "
                        f"'tinystories', 'stories' or 'hf:NAME'")
    files = files[:max_docs] if max_docs else files
    return Source(data, "files-" + _slug(os.path.basename(path.rstrip("/*")) or "root"),
                  {"kind": "files", "files": _stat_list(files)}, (("all",),),
                  lambda: {"all": (lambda: _file_pieces(files), len(files))})


def _hf_pieces(split, field: str, limit: int | None) -> Pieces:
    rows = split.take(limit) if limit is not None else split
    for batch in rows.iter(batch_size=HF_BATCH_ROWS):
        if field not in batch:
            raise DataError(f"the dataset has no field {field!r} — choose --text-field from: {', '.join(batch)}")
        for text in batch[field]:
            if text is not None and not isinstance(text, str):
                raise DataError(f"field {field!r} holds {type(text).__name__}, not text — choose another "
                                f"--text-field")
            yield text or "", True


def _hf_source(name: str, config: str | None, field: str, max_docs: int | None, label: str,
               fallback: bool) -> Source:
    val_docs = max(1, max_docs // 10) if max_docs else None
    local = os.path.exists(name)
    descriptor = {"kind": "hf", "name": os.path.abspath(name) if local else name, "config": config,
                  "text_field": field, "max_docs": max_docs, "val_docs": val_docs}
    if local:  # a local dataset folder: key on its files too, like a .txt source
        descriptor["files"] = _stat_list(_readable_once(sorted(os.path.join(r, n) for r, _, ns in os.walk(name)
                                                               for n in ns)) if os.path.isdir(name) else [name])

    def fail(reason: str):
        if fallback:
            return SourceUnavailable(reason)
        return DataError(f"cannot load Hugging Face dataset {name!r}: {reason}")

    def open_splits():
        try:
            import datasets
        except ImportError:
            raise fail("the 'datasets' package is not installed (pip install datasets)") from None
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        # load_dataset keeps retrying when offline before it fails; a quick probe first keeps the fallback fast.
        offline = getattr(datasets.config, "HF_HUB_OFFLINE", False)  # HF_HUB_OFFLINE=1: the HF cache only
        if not local and not offline and not can_reach(endpoint):
            raise fail(f"the Hugging Face Hub ({endpoint}) cannot be reached — connect to the internet, or set "
                       f"HF_HUB_OFFLINE=1 to use a copy already in the HF cache")
        try:
            ds = datasets.load_dataset(name, config, streaming=max_docs is not None)
        except Exception as e:  # hub, network and file errors all mean "not loadable here"; say which
            reason = (str(e).splitlines() or [""])[0][:300]
            raise fail(f"{type(e).__name__}: {reason}") from e
        if "train" not in ds:
            raise DataError(f"dataset {name!r} has no 'train' split (it has: {', '.join(ds)})")
        columns = ds["train"].column_names
        if columns is not None and field not in columns:
            raise DataError(f"dataset {name!r} has no field {field!r} — choose --text-field from: "
                            f"{', '.join(columns)}")

        def split(split_name: str, limit: int | None):
            total = limit if limit is not None else len(ds[split_name])
            return (lambda: _hf_pieces(ds[split_name], field, limit)), total

        if "validation" in ds:
            return {"train": split("train", max_docs), "validation": split("validation", val_docs)}
        return {"all": split("train", max_docs)}

    return Source(label, "hf-" + _slug(name.replace("/", "_") + (f"_{config}" if config else "")), descriptor,
                  (("train", "validation"), ("all",)), open_splits)


def resolve_source(data: str, max_docs: int | None, text_field: str) -> Source:
    """The source named by ``data`` (nothing is read or downloaded yet)."""
    if not isinstance(data, str) or not data.strip():
        raise DataError(f"--data is empty ({data!r}) — name a source: tinystories, stories, hf:NAME, or a .txt file, "
                        "folder or glob")
    if data == "tinystories":
        return _hf_source(TINYSTORIES, None, "text", max_docs, label="tinystories", fallback=True)
    if data == "stories":
        return stories_source(max_docs)
    if data.startswith("hf:"):
        rest = data[3:]
        name, config = (rest, None) if os.path.exists(rest) else (rest.partition(":")[0], rest.partition(":")[2])
        if not name:
            raise DataError(f"{data!r} names no dataset — write hf:NAME or hf:NAME:CONFIG")
        return _hf_source(name, config or None, text_field, max_docs, label=data, fallback=False)
    return _files_source(data, max_docs)
