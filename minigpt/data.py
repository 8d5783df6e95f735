"""Training data: a source of documents -> a cached file of token ids -> windows of (input, target) ids.

Three rooms, in the order the data flows through them:

    minigpt/data_sources.py   the ``--data`` string -> a source of documents (tinystories, stories, hf:NAME,
                              .txt files), read or downloaded only when needed
    minigpt/token_cache.py    every document tokenized once into a flat file of ids, memory-mapped on use
    minigpt/token_windows.py  windows of ``max_length`` ids and their targets, batched by a DataLoader

This module joins the first two: ``load_token_splits`` gives a run its train and validation ids, and
``python -m minigpt.data DATA`` tokenizes a source into the cache ahead of training. A source without a
validation split is tokenized as one stream and cut at ``train_ratio`` (0.9) of its tokens, as the original notebook
cut its text. The windows' names are importable from here too, as the original notebook's reader expects them.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .data_sources import DataError, resolve_source
from .token_cache import (
    FORMAT_VERSION,
    TokenizingInterrupted,
    cached_or_tokenized,
    default_cache_dir,
    open_cache_dir,
    read_tokens,
    token_dtype,
)
from .token_windows import TokenWindows, create_dataloader, create_dataloader_v1, make_loader
from .tokenizer import get_tokenizer

__all__ = ["FORMAT_VERSION", "DataError", "TokenizingInterrupted", "TokenWindows", "create_dataloader",
           "create_dataloader_v1", "default_cache_dir", "load_token_splits", "make_loader", "token_dtype"]


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
    cache_dir = open_cache_dir(cache_dir)
    source = resolve_source(data, max_docs, text_field)
    source, found, cached, fallback = cached_or_tokenized(source, tokenizer, cache_dir, max_docs)

    info = {"source": source.label, "tokenizer": tokenizer.name, "cached": cached, "fallback": fallback,
            "cache": [path for path, _ in found.values()], "n_docs": sum(m["n_docs"] for _, m in found.values())}
    if "all" in found:
        path, meta = found["all"]
        n = meta["n_tokens"]
        n_train = int(train_ratio * n)
        if min(n_train, n - n_train) < 2:
            raise DataError(f"corpus too short: {n} tokens in {meta['n_docs']} documents from {source.label} "
                            f"leave {n_train} train / {n - n_train} validation tokens — give more text")
        train, val = read_tokens(path, meta, 0, n_train), read_tokens(path, meta, n_train, n)
        info["split"] = "ratio"
    else:
        (tpath, tmeta), (vpath, vmeta) = found["train"], found["validation"]
        if tmeta["n_tokens"] < 2 or vmeta["n_tokens"] < 2:
            raise DataError(f"corpus too short: {tmeta['n_tokens']} train / {vmeta['n_tokens']} validation tokens "
                            f"from {source.label} — give more documents (raise --max-docs)")
        train = read_tokens(tpath, tmeta, 0, tmeta["n_tokens"])
        val = read_tokens(vpath, vmeta, 0, vmeta["n_tokens"])
        info.update(split="validation", train_docs=tmeta["n_docs"], val_docs=vmeta["n_docs"])
    info.update(train_tokens=len(train), val_tokens=len(val))
    return train, val, info


def main(argv: list[str] | None = None) -> int:
    """``python -m minigpt.data DATA``: tokenize a source into the cache ahead of training and print its sizes;
    returns the exit status (see kernels/cli.py)."""
    from kernels.cli import run_cli


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
        resolve_source(args.data, args.max_docs, args.text_field)  # a wrong --data is said before the tokenizer
        try:
            _, _, info = load_token_splits(args.data, get_tokenizer(args.tokenizer), max_docs=args.max_docs,
                                           text_field=args.text_field, cache_dir=args.cache_dir)
        except TokenizingInterrupted as e:
            print(e, file=sys.stderr)
            return 128 + e.signum  # as a program killed by that signal, so scripts see the interruption
        print(json.dumps(info, indent=1))
        return 0

    return run_cli(tokenize, interrupted="interrupted: nothing was cached")


if __name__ == "__main__":
    sys.exit(main())
