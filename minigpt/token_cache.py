"""The token cache (nanoGPT's "prepare" step, done on first use): a source's documents tokenized once into a file.

Every document is tokenized once and followed by the end-of-text id, into one flat binary file of uint16 ids
(uint32 when the vocabulary has more than 65536 ids), read back with ``np.memmap``, so even the full TinyStories
(about 500M tokens) never sits in memory as Python objects. The file name carries a hash of everything that decides
its content (the source — for local files their absolute paths, sizes and modification times —, the split, the
tokenizer's name and vocabulary size, ``max_docs``, the text field, and ``FORMAT_VERSION``), so a second run with
the same inputs starts at once and a changed input gets a new file, which replaces the entries of earlier versions
of the same files. Files are written to a temporary name in the same folder, synced, then renamed, so an
interrupted run never leaves a half-written cache behind (Ctrl-C and SIGTERM remove the temporary file; one left by
a killed process is removed by the next run). One process at a time writes a source's entries: another one asking
for them meanwhile (a second run started at the same moment) waits, saying for which process, then reads what the
first wrote. The lock is a small hidden file per source (``.<name>.lock``), kept after use: removing it would race
with a process about to lock it. A full disk or a file-size limit while writing is one DataError naming the
folder, and nothing half-written is kept. On load, the largest id of an entry is checked against the vocabulary: a
damaged entry is tokenized again. Folder: ``cache_dir``, else $MINIGPT_CACHE, else ~/.cache/minigpt.

An entry is ``path`` (the ids) beside ``path + ".json"`` (its metadata: dtype, token and document counts).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import signal
import threading
from itertools import chain

import numpy as np

from .data_sources import DataError, Pieces, Source, SourceUnavailable, stories_source
from .files import atomic_open, exclusive_lock, remove_stale_temps

__all__ = ["FORMAT_VERSION", "TokenizingInterrupted", "cached_or_tokenized", "default_cache_dir", "open_cache_dir",
           "read_tokens", "token_dtype"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the cache file layout or the tokenization of documents changes
BATCH_CHARS = 1 << 20  # texts are handed to the tokenizer in batches of about this many characters ...
BATCH_PIECES = 1024  # ... or this many pieces, whichever comes first (bounds the Python lists alive at once)


def default_cache_dir() -> str:
    return os.environ.get("MINIGPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minigpt")


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned type holding every id: uint16 for GPT-2's 50257, uint32 above 65536."""
    if n_vocab <= 1 << 16:
        return np.dtype(np.uint16)
    if n_vocab <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataError(f"vocabulary of {n_vocab} ids does not fit the uint32 token cache")


def open_cache_dir(cache_dir: str | None) -> str:
    """The cache folder (created if needed, cleared of temporary files that killed writers left); DataError when
    it cannot be made."""
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
    return cache_dir


def read_tokens(path: str, meta: dict, start: int, stop: int) -> np.memmap:
    """Ids ``start:stop`` of a cache entry, memory-mapped (read from disk as they are used), shape (stop - start,)."""
    dtype = np.dtype(meta["dtype"])
    return np.memmap(path, dtype=dtype, mode="r", offset=start * dtype.itemsize, shape=(stop - start,))


# ---------------------------------------------------------------------------------------------------------------
# Finding entries: a split's key, whether its entry is complete and sound, the older ones it replaces
# ---------------------------------------------------------------------------------------------------------------

def _cache_path(cache_dir: str, source: Source, split: str, tokenizer) -> str:
    key = {"format": FORMAT_VERSION, "source": source.descriptor, "split": split, "tokenizer": tokenizer.name,
           "n_vocab": tokenizer.n_vocab, "eot": tokenizer.eot_token}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{source.slug}-{tokenizer.name}-{split}-{digest}.bin")


def _identity(source: Source, split: str, tokenizer) -> str:
    """What names an entry apart from its content's version: the same files (by path, not size or time), the
    same split and tokenizer. A new entry replaces older ones of the same identity — an edited file, a newer
    generated corpus — instead of leaving them behind."""
    key = {"source": _who(source), "split": split, "tokenizer": tokenizer.name}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _who(source: Source) -> dict:
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
    """The largest id in a cache entry: one sequential read, cheap when the page cache holds the file."""
    if meta["n_tokens"] == 0:
        return -1
    return int(read_tokens(path, meta, 0, meta["n_tokens"]).max())


def _find_cache(source: Source, tokenizer, cache_dir: str) -> dict | None:
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


# ---------------------------------------------------------------------------------------------------------------
# Writing an entry: tokenize, write atomically, clean up on a signal
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# A source's entries: found, or written by this process, or by the one it waits for
# ---------------------------------------------------------------------------------------------------------------

def cached_or_tokenized(source: Source, tokenizer, cache_dir: str, max_docs: int | None):
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
            except SourceUnavailable as e:
                log.warning("warning: TinyStories unavailable (%s); using the generated 'stories' corpus instead", e)
                source, found, cached, _ = cached_or_tokenized(stories_source(max_docs), tokenizer, cache_dir,
                                                               max_docs)
                return source, found, cached, str(e)
            return source, _tokenize_splits(source, splits, tokenizer, cache_dir), False, None
    except OSError as e:  # reading errors were turned into DataError: this one is the cache's
        raise DataError(_cache_write_error(e, cache_dir)) from None


def _entry_lock(cache_dir: str, source: Source, tokenizer):
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


def _tokenize_splits(source: Source, splits: dict, tokenizer, cache_dir: str) -> dict:
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
