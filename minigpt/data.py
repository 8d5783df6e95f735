"""Training data: a source of documents -> a cached file of token ids -> windows of (input, target) ids.

Sources (the ``--data`` string):

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

A source without a validation split is tokenized as one stream and cut at ``train_ratio`` (0.9) of its tokens,
as the seed notebook cut its text.

Token cache (nanoGPT's "prepare" step, done on first use): every document is tokenized once and followed by the
end-of-text id, into one flat binary file of uint16 ids (uint32 when the vocabulary has more than 65536 ids), read
back with ``np.memmap``, so even the full TinyStories (about 500M tokens) never sits in memory as Python objects.
The file name carries a hash of everything that decides its content (the source — for local files their absolute
paths, sizes and modification times —, the split, the tokenizer's name and vocabulary size, ``max_docs``, the
text field, and ``FORMAT_VERSION``), so a second run with the same inputs starts at once and a changed input
gets a new file, which replaces the entries of earlier versions of the same files. Files are written to a
temporary name in the same folder, synced, then renamed, so an interrupted run never leaves a half-written cache
behind (Ctrl-C and SIGTERM remove the temporary file; one left by a killed process is removed by the next run).
One process at a time writes a source's entries: another one asking for them meanwhile (a second run started at
the same moment) waits, saying for which process, then reads what the first wrote. The lock is a small hidden file
per source (``.<name>.lock``), kept after use: removing it would race with a process about to lock it. A full disk
or a file-size limit while writing is one DataError naming the folder, and nothing half-written is kept.
On load, the largest id of an entry is checked against the vocabulary: a damaged entry is tokenized again.
Folder: ``cache_dir``, else $MINIGPT_CACHE, else ~/.cache/minigpt.

Windows (the seed's ``GPTDatasetV1``): window ``i`` is ``tokens[i*stride : i*stride + max_length]`` and its target
is the same window shifted by one token.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import hashlib
import json
import logging
import mmap
import os
import re
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import stories
from .checkpoint import atomic_open, exclusive_lock, remove_stale_temps
from .tokenizer import EOT_TEXT, can_reach, get_tokenizer

__all__ = ["FORMAT_VERSION", "DataError", "TokenizingInterrupted", "TokenWindows", "create_dataloader", "create_dataloader_v1",
           "default_cache_dir", "load_token_splits", "make_loader", "token_dtype"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the cache file layout or the tokenization of documents changes
TINYSTORIES = "roneneldan/TinyStories"
CHUNK_CHARS = 1 << 20  # a text file is read and tokenized about this many characters at a time
BATCH_CHARS = 1 << 20  # texts are handed to the tokenizer in batches of about this many characters ...
BATCH_PIECES = 1024  # ... or this many pieces, whichever comes first (bounds the Python lists alive at once)
HF_BATCH_ROWS = 1000  # rows per read from a Hugging Face split
# A text piece is a (text, ends_document) pair: a document may come in several pieces (a large file in chunks).
Pieces = Iterator[tuple[str, bool]]


class DataError(ValueError):
    """A problem with the data the user asked for; the message names it and says how to fix it."""


class _Unavailable(Exception):
    """TinyStories cannot be loaded here (no `datasets`, no network): the caller falls back to `stories`."""


def default_cache_dir() -> str:
    return os.environ.get("MINIGPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minigpt")


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned type holding every id: uint16 for GPT-2's 50257, uint32 above 65536."""
    if n_vocab <= 1 << 16:
        return np.dtype(np.uint16)
    if n_vocab <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataError(f"vocabulary of {n_vocab} ids does not fit the uint32 token cache")


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Source:
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


def _stories_source(max_docs: int | None) -> _Source:
    n = max_docs or stories.DEFAULT_NUM_STORIES

    def pieces() -> Pieces:
        return ((s, True) for s in stories.generate_stories(n, seed=0))

    return _Source("stories", "stories", {"kind": "stories", "version": stories.CORPUS_VERSION, "n": n, "seed": 0},
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


def _files_source(data: str, max_docs: int | None) -> _Source:
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
    return _Source(data, "files-" + _slug(os.path.basename(path.rstrip("/*")) or "root"),
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
               fallback: bool) -> _Source:
    val_docs = max(1, max_docs // 10) if max_docs else None
    local = os.path.exists(name)
    descriptor = {"kind": "hf", "name": os.path.abspath(name) if local else name, "config": config,
                  "text_field": field, "max_docs": max_docs, "val_docs": val_docs}
    if local:  # a local dataset folder: key on its files too, like a .txt source
        descriptor["files"] = _stat_list(_readable_once(sorted(os.path.join(r, n) for r, _, ns in os.walk(name)
                                                               for n in ns)) if os.path.isdir(name) else [name])

    def fail(reason: str):
        if fallback:
            return _Unavailable(reason)
        return DataError(f"cannot load Hugging Face dataset {name!r}: {reason}")

    def open_splits():
        try:
            import datasets
        except ImportError:
            raise fail("the 'datasets' package is not installed (pip install datasets)") from None
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        # load_dataset retries for ~25 s when offline; a quick probe first keeps the fallback fast.
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

    return _Source(label, "hf-" + _slug(name.replace("/", "_") + (f"_{config}" if config else "")), descriptor,
                   (("train", "validation"), ("all",)), open_splits)


def _resolve_source(data: str, max_docs: int | None, text_field: str) -> _Source:
    """The source named by ``data`` (nothing is read or downloaded yet)."""
    if not isinstance(data, str) or not data.strip():
        raise DataError(f"--data is empty ({data!r}) — name a source: tinystories, stories, hf:NAME, or a .txt file, "
                        "folder or glob")
    if data == "tinystories":
        return _hf_source(TINYSTORIES, None, "text", max_docs, label="tinystories", fallback=True)
    if data == "stories":
        return _stories_source(max_docs)
    if data.startswith("hf:"):
        rest = data[3:]
        name, config = (rest, None) if os.path.exists(rest) else (rest.partition(":")[0], rest.partition(":")[2])
        if not name:
            raise DataError(f"{data!r} names no dataset — write hf:NAME or hf:NAME:CONFIG")
        return _hf_source(name, config or None, text_field, max_docs, label=data, fallback=False)
    return _files_source(data, max_docs)


# ---------------------------------------------------------------------------------------------------------------
# Token cache
# ---------------------------------------------------------------------------------------------------------------

def _cache_path(cache_dir: str, source: _Source, split: str, tokenizer) -> str:
    key = {"format": FORMAT_VERSION, "source": source.descriptor, "split": split, "tokenizer": tokenizer.name,
           "n_vocab": tokenizer.n_vocab, "eot": tokenizer.eot_token}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{source.slug}-{tokenizer.name}-{split}-{digest}.bin")


def _identity(source: _Source, split: str, tokenizer) -> str:
    """What names an entry apart from its content's version: the same files (by path, not size or time), the
    same split and tokenizer. A new entry replaces older ones of the same identity — an edited file, a newer
    generated corpus — instead of leaving them behind."""
    key = {"source": _who(source), "split": split, "tokenizer": tokenizer.name}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _who(source: _Source) -> dict:
    """The source's descriptor without what changes with its content (files' sizes and times, a version)."""
    return {k: ([f[0] for f in v] if k == "files" else v) for k, v in source.descriptor.items() if k != "version"}


def _read_meta(path: str) -> dict | None:
    """The cache entry's metadata if the entry is complete, else None."""
    try:
        with open(path + ".json") as f:
            meta = json.load(f)
        complete = os.path.getsize(path) == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
        return meta if meta.get("format") == FORMAT_VERSION and complete else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_entry(path: str) -> None:
    for name in (path, path + ".json"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _largest_id(path: str, meta: dict) -> int:
    """The largest id in a cache entry: one sequential read, a second per few GB from the page cache."""
    if meta["n_tokens"] == 0:
        return -1
    return int(_memmap(path, meta, 0, meta["n_tokens"]).max())


def _find_cache(source: _Source, tokenizer, cache_dir: str) -> dict | None:
    """{split: (path, meta)} when every split of one of the source's layouts is cached, else None.

    An entry holding an id outside the vocabulary (its bytes were overwritten) is removed with a warning, and
    tokenized again by the caller."""
    for layout in source.layouts:
        found = {s: (p, _read_meta(p)) for s in layout for p in [_cache_path(cache_dir, source, s, tokenizer)]}
        if not all(meta is not None for _, meta in found.values()):
            continue
        for path, meta in found.values():
            top = _largest_id(path, meta)
            if top >= tokenizer.n_vocab:
                log.warning("warning: the token cache %s is damaged (it holds id %d, the vocabulary has %d): "
                            "removing it and tokenizing again", path, top, tokenizer.n_vocab)
                _remove_entry(path)
                return None
        return found
    return None


def _prune_older_versions(path: str, meta: dict, cache_dir: str) -> None:
    """Remove the entries the one just written at ``path`` replaces (same identity, other content)."""
    for name in os.listdir(cache_dir):
        other = os.path.join(cache_dir, name[:-len(".json")])
        if not name.endswith(".bin.json") or other == path:
            continue
        try:
            with open(os.path.join(cache_dir, name)) as f:
                same = json.load(f).get("identity") == meta["identity"]
        except (OSError, ValueError, AttributeError):
            continue
        if same:
            _remove_entry(other)
            log.info("removed %s: its source changed since it was tokenized", other)


class TokenizingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM while tokenizing: the partial file was removed; ``signum`` says which signal."""

    def __init__(self, signum: int, what: str):
        super().__init__(f"interrupted ({signal.Signals(signum).name}) while {what}: nothing was cached — run "
                         "again to tokenize from the start")
        self.signum = signum


@contextlib.contextmanager
def _stop_cleanly_on_signals(what: str):
    """Turn Ctrl-C and SIGTERM (from `kill`, a scheduler, a container stopping) into an exception for the length
    of the block, so the temporary file is removed on the way out (SIGTERM would otherwise end the process on
    the spot), and then into ``TokenizingInterrupted``."""
    received = []

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    old = {}
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    except KeyboardInterrupt:
        raise TokenizingInterrupted(received[0] if received else signal.SIGINT, what) from None
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _progress(total: int | None, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety: without tqdm, work silently
        class _Silent:
            def update(self, n=1): pass
            def close(self): pass
        return _Silent()
    return tqdm(total=total, desc=desc, unit="doc", mininterval=1.0)


def _write_cache(path: str, pieces: Pieces, tokenizer, total_docs: int | None, desc: str, identity: str) -> dict:
    """Tokenize ``pieces`` into ``path`` (ids, with end-of-text after each document) and return its metadata."""
    dtype = token_dtype(tokenizer.n_vocab)
    encode_batch = getattr(tokenizer, "encode_batch", None) or (lambda texts: [tokenizer.encode(t) for t in texts])
    eot = (tokenizer.eot_token,)
    n_docs = n_tokens = 0
    bar = _progress(total_docs, desc)

    def write(f, texts: list[str], ends: list[bool]) -> None:
        nonlocal n_docs, n_tokens
        runs = []
        for ids, end in zip(encode_batch(texts), ends):
            runs.append(ids)
            if end:
                runs.append(eot)
        count = sum(map(len, runs))
        f.write(np.fromiter(chain.from_iterable(runs), dtype=dtype, count=count).tobytes())
        n_tokens += count
        n_docs += sum(ends)
        bar.update(sum(ends))

    try:
        with atomic_open(path) as f:
            texts, ends, chars = [], [], 0
            for text, end in pieces:
                texts.append(text)
                ends.append(end)
                chars += len(text)
                if len(texts) >= BATCH_PIECES or chars >= BATCH_CHARS:
                    write(f, texts, ends)
                    texts, ends, chars = [], [], 0
            if texts:
                write(f, texts, ends)
    finally:
        bar.close()
    meta = {"format": FORMAT_VERSION, "dtype": dtype.name, "n_tokens": n_tokens, "n_docs": n_docs,
            "tokenizer": tokenizer.name, "n_vocab": tokenizer.n_vocab, "desc": desc, "identity": identity}
    with atomic_open(path + ".json") as f:
        f.write(json.dumps(meta, indent=1).encode())
    return meta


def _cached_or_tokenized(source: _Source, tokenizer, cache_dir: str, max_docs: int | None):
    """``(source, {split: (path, meta)}, cached, fallback)``: the source's cache entries, tokenized first when
    missing. Only one process writes an entry: another one asking for it meanwhile waits, then reads it."""
    found = _find_cache(source, tokenizer, cache_dir)
    if found is not None:
        return source, found, True, None
    try:
        with _entry_lock(cache_dir, source, tokenizer):
            found = _find_cache(source, tokenizer, cache_dir)  # written by the process this one waited for
            if found is not None:
                return source, found, True, None
            try:
                splits = source.open()
            except _Unavailable as e:
                log.warning("warning: TinyStories unavailable (%s); using the generated 'stories' corpus instead", e)
                source, found, cached, _ = _cached_or_tokenized(_stories_source(max_docs), tokenizer, cache_dir,
                                                                max_docs)
                return source, found, cached, str(e)
            return source, _tokenize_splits(source, splits, tokenizer, cache_dir), False, None
    except OSError as e:  # reading errors were turned into DataError: this one is the cache's
        raise DataError(_cache_write_error(e, cache_dir)) from None


def _entry_lock(cache_dir: str, source: _Source, tokenizer):
    """The lock a process holds while it writes the cache entries of ``source`` x ``tokenizer`` (every split):
    a second process waits for it, saying whom it waits for, instead of tokenizing the same text again. Keyed like
    ``_identity``, so an edited file reuses its lock file instead of leaving one more behind."""
    key = {"source": _who(source), "tokenizer": tokenizer.name}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f".{source.slug}-{tokenizer.name}-{digest}.lock")

    def say_who(pid: int | None) -> None:
        holder = f"process {pid}" if pid else "another process"
        log.warning("waiting for %s, which is tokenizing the same data into %s", holder, cache_dir)

    return exclusive_lock(path, "the token cache entry", "wait for it to finish", wait=say_who)


def _cache_write_error(e: OSError, cache_dir: str) -> str:
    """One line for a token cache that could not be written: what happened, in which folder, what to do."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EFBIG: "a file-size limit was reached (see `ulimit -f`)"}.get(e.errno, e.strerror or str(e))
    fix = ("free some space, or put the cache on another disk" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
           "raise the limit, or put the cache where none applies" if e.errno == errno.EFBIG else
           "put the cache in a folder you can write")
    return (f"cannot write the token cache in {cache_dir}: {why} — nothing was cached and no partial file is "
            f"left; {fix}: --cache-dir DIR or MINIGPT_CACHE=DIR")


def _tokenize_splits(source: _Source, splits: dict, tokenizer, cache_dir: str) -> dict:
    """Tokenize every split of an opened source into its cache entry; returns {split: (path, meta)}."""
    found = {}
    for name, (pieces, total) in splits.items():
        path = _cache_path(cache_dir, source, name, tokenizer)
        desc = f"tokenizing {source.label} [{name}]"
        with _stop_cleanly_on_signals(desc):
            meta = _write_cache(path, _reading(pieces(), source.label), tokenizer, total, desc,
                                _identity(source, name, tokenizer))
        _prune_older_versions(path, meta, cache_dir)
        found[name] = (path, meta)
    return found


def _reading(pieces: Pieces, label: str) -> Pieces:
    """``pieces``, with an OSError while reading the source told apart from one while writing the cache."""
    try:
        yield from pieces
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise DataError(f"cannot read the data {label}{where}: {e.strerror or e} — check that it can be read, "
                        "or remove it from the data") from None


def _memmap(path: str, meta: dict, start: int, stop: int) -> np.memmap:
    dtype = np.dtype(meta["dtype"])
    return np.memmap(path, dtype=dtype, mode="r", offset=start * dtype.itemsize, shape=(stop - start,))


def load_token_splits(data: str, tokenizer, *, max_docs: int | None = None, text_field: str = "text",
                      train_ratio: float = 0.9, cache_dir: str | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train and validation token ids for ``data`` (see the module docstring), tokenized once and cached.

    Returns ``(train_tokens, val_tokens, info)``: two 1-D ``np.memmap`` arrays of uint16 (uint32 for vocabularies
    above 65536) and a dict with ``source`` (the source actually used), ``n_docs``, ``train_tokens``,
    ``val_tokens``, ``cache`` (the cache file paths), ``split`` ("validation" or "ratio"), ``cached`` (True when
    nothing had to be tokenized) and ``fallback`` (why TinyStories was replaced by ``stories``, else None).
    """
    if max_docs is not None and (not isinstance(max_docs, int) or max_docs < 1):
        raise DataError(f"max_docs must be a positive integer or None, got {max_docs!r}")
    if not 0.0 < train_ratio < 1.0:
        raise DataError(f"train_ratio must be between 0 and 1 (exclusive), got {train_ratio} — e.g. 0.9")
    cache_dir = os.path.expanduser(cache_dir or default_cache_dir())
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        in_the_way = isinstance(e, (FileExistsError, NotADirectoryError))
        raise DataError(f"cannot use {cache_dir} as the token cache folder "
                        f"({'a file is in the way' if in_the_way else e.strerror}) — pass another --cache-dir "
                        "or set MINIGPT_CACHE to a folder") from None
    stale = remove_stale_temps(cache_dir)
    if stale:
        log.info("removed %d temporary file(s) left in %s by an interrupted run", len(stale), cache_dir)

    source = _resolve_source(data, max_docs, text_field)
    source, found, cached, fallback = _cached_or_tokenized(source, tokenizer, cache_dir, max_docs)

    info = {"source": source.label, "tokenizer": tokenizer.name, "cached": cached, "fallback": fallback,
            "cache": [path for path, _ in found.values()], "n_docs": sum(m["n_docs"] for _, m in found.values())}
    if "all" in found:
        path, meta = found["all"]
        n = meta["n_tokens"]
        n_train = int(train_ratio * n)
        if min(n_train, n - n_train) < 2:
            raise DataError(f"corpus too short: {n} tokens in {meta['n_docs']} documents from {source.label} "
                            f"leave {n_train} train / {n - n_train} validation tokens — give more text")
        train, val = _memmap(path, meta, 0, n_train), _memmap(path, meta, n_train, n)
        info["split"] = "ratio"
    else:
        (tpath, tmeta), (vpath, vmeta) = found["train"], found["validation"]
        if tmeta["n_tokens"] < 2 or vmeta["n_tokens"] < 2:
            raise DataError(f"corpus too short: {tmeta['n_tokens']} train / {vmeta['n_tokens']} validation tokens "
                            f"from {source.label} — give more documents (raise --max-docs)")
        train, val = _memmap(tpath, tmeta, 0, tmeta["n_tokens"]), _memmap(vpath, vmeta, 0, vmeta["n_tokens"])
        info.update(split="validation", train_docs=tmeta["n_docs"], val_docs=vmeta["n_docs"])
    info.update(train_tokens=len(train), val_tokens=len(val))
    return train, val, info


# ---------------------------------------------------------------------------------------------------------------
# Windows and loaders
# ---------------------------------------------------------------------------------------------------------------

class TokenWindows(Dataset):
    """Sliding windows over a 1-D token array, as the seed's ``GPTDatasetV1``.

    Item ``i`` is ``(input, target)``: ``input = tokens[i*stride : i*stride + max_length]`` and ``target`` the
    same window shifted one token to the right, both LongTensors of shape (max_length,). The windows start at
    ``range(0, len(tokens) - max_length, stride)``, exactly the seed's loop. Ids are converted from the cache's
    uint16 per item, so a memory-mapped corpus is never copied whole.
    """

    def __init__(self, tokens, max_length: int, stride: int):
        for name, value in (("max_length", max_length), ("stride", stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DataError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        elif not isinstance(tokens, np.ndarray):
            tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1:
            raise DataError(f"tokens must be a 1-D array of ids, got shape {tuple(tokens.shape)}")
        self.tokens, self.max_length, self.stride = tokens, max_length, stride
        self.n_windows = len(range(0, len(tokens) - max_length, stride))

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i < 0:
            i += self.n_windows
        if not 0 <= i < self.n_windows:
            raise IndexError(f"window {i} out of range for {self.n_windows} windows")
        start = i * self.stride
        ids = torch.from_numpy(np.asarray(self.tokens[start:start + self.max_length + 1], dtype=np.int64))
        return ids[:-1], ids[1:]  # (max_length,), (max_length,)

    # A DataLoader worker started with "spawn" (macOS, Windows) receives the dataset pickled: reopen the token
    # file there instead of copying the whole corpus through the pickle.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        t = self.tokens
        if isinstance(t, np.memmap) and isinstance(t.base, mmap.mmap) and t.filename:
            state["tokens"] = ("memmap", t.filename, t.dtype.str, t.offset, len(t))
        return state

    def __setstate__(self, state: dict) -> None:
        t = state["tokens"]
        if isinstance(t, tuple) and t[0] == "memmap":
            _, filename, dtype, offset, n = t
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=(n,))
        self.__dict__.update(state)


def make_loader(tokens, batch_size: int, max_length: int, stride: int, shuffle: bool, drop_last: bool,
                seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader of ``(input, target)`` batches, each (batch_size, max_length) int64.

    Shuffling draws from a ``torch.Generator`` seeded with ``seed``, so two runs see the same order. Raises
    DataError when the tokens do not fill one batch.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    windows = TokenWindows(tokens, max_length, stride)
    need_windows = batch_size if drop_last else 1
    if len(windows) < need_windows:
        # n windows need len(tokens) - max_length > (n - 1) * stride, i.e. (n-1)*stride + max_length + 1 tokens.
        needed = (need_windows - 1) * stride + max_length + 1
        what = f"{batch_size} windows" if drop_last else "one window"
        raise DataError(f"too few tokens: {len(windows.tokens)} tokens, but {what} of {max_length} (stride "
                        f"{stride}) need {needed} — give more data, or lower --context-length / --batch-size")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(windows, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


def create_dataloader(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                      shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                      tokenizer=None) -> DataLoader:
    """The seed notebook's ``create_dataloader_v1``: windows over one text, for readers coming from it.

    As the seed (which encoded with ``allowed_special={"<|endoftext|>"}``), "<|endoftext|>" in ``txt`` becomes
    the end-of-text id. ``tokenizer`` defaults to ``get_tokenizer("auto")``; shuffling is seeded (seed 0).
    """
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer("auto")
    ids: list[int] = []
    for k, part in enumerate(txt.split(EOT_TEXT)):
        if k:
            ids.append(tokenizer.eot_token)
        ids.extend(tokenizer.encode(part))
    return make_loader(np.asarray(ids, dtype=np.int64), batch_size, max_length, stride, shuffle, drop_last,
                       num_workers=num_workers)


create_dataloader_v1 = create_dataloader  # the seed's name


def main(argv: list[str] | None = None) -> int:
    """``python -m minigpt.data DATA``: tokenize a source into the cache ahead of training and print its sizes;
    returns the exit status (see kernels/cli.py)."""
    from kernels.cli import run_cli

    from .checkpoint import CheckpointError
    from .tokenizer import TokenizerError

    p = argparse.ArgumentParser(description="Tokenize a data source into the token cache.")
    p.add_argument("data", help="tinystories, stories, hf:NAME[:CONFIG], a .txt file, a folder or a glob")
    p.add_argument("--tokenizer", default="auto", help="auto, gpt2 or bytes (default: auto)")
    p.add_argument("--max-docs", type=int, default=None, help="use only the first N documents")
    p.add_argument("--text-field", default="text", help="the text column of an hf: dataset (default: text)")
    p.add_argument("--cache-dir", default=None, help="default: $MINIGPT_CACHE or ~/.cache/minigpt")
    args = p.parse_args(argv)
    if args.max_docs is not None and args.max_docs < 1:
        raise SystemExit(f"error: --max-docs must be at least 1, got {args.max_docs} — or leave it out (every "
                         "document)")

    def tokenize() -> int:
        _resolve_source(args.data, args.max_docs, args.text_field)  # a wrong --data is said before the tokenizer
        try:
            _, _, info = load_token_splits(args.data, get_tokenizer(args.tokenizer), max_docs=args.max_docs,
                                           text_field=args.text_field, cache_dir=args.cache_dir)
        except TokenizingInterrupted as e:
            print(e, file=sys.stderr)
            return 128 + e.signum  # as a program killed by that signal, so scripts see the interruption
        print(json.dumps(info, indent=1))
        return 0

    return run_cli(tokenize, errors=(DataError, TokenizerError, CheckpointError),
                   interrupted="interrupted: nothing was cached")


if __name__ == "__main__":
    sys.exit(main())
