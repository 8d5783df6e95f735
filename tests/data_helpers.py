"""What the data tests share: small corpora written in tmp_path, tokenizers that count or refuse, cache probes."""
from __future__ import annotations

import os

import numpy as np
import pytest

from minigpt.tokenizer import ByteTokenizer, TiktokenTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EOT = 256  # ByteTokenizer's end-of-text id


def small_bpe() -> TiktokenTokenizer:
    """A small BPE (bytes plus a few merges, a GPT-2-like pre-tokenizer), to check exactness with merges."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([b]): b for b in range(256)}
    for pair in [(b"t", b"h"), (b"th", b"e"), (b" ", b"the"), (b"a", b"n"), (b"an", b"d"), (b" ", b"and"),
                 (b"\n", b"\n"), (b" ", b" ")]:
        ranks[pair[0] + pair[1]] = len(ranks)
    return TiktokenTokenizer(tiktoken.Encoding(
        name="tiny-bpe", pat_str=r" ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)}))


def enc(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def both(train, val) -> list[int]:
    return np.concatenate([train, val]).tolist()


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def leftovers(cache_dir: str) -> list[str]:
    return [n for n in os.listdir(cache_dir) if n.endswith(".tmp") or ".tmp-" in n]


def cache_files(cache_dir: str) -> list[str]:
    """What the cache folder holds besides the entries' lock files (kept on purpose: see token_cache._entry_lock)."""
    return sorted(n for n in os.listdir(cache_dir) if not (n.startswith(".") and n.endswith(".lock")))


class Spy(ByteTokenizer):
    """A byte tokenizer that counts the texts it encodes, or refuses to encode at all."""

    def __init__(self, refuse: bool = False, fail_after: int | None = None):
        self.refuse, self.fail_after, self.calls = refuse, fail_after, 0

    def encode_batch(self, texts):
        if self.refuse:
            raise AssertionError("the tokenizer was called although the cache should have been used")
        self.calls += len(texts)
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway
        return super().encode_batch(texts)

    encode = None  # only encode_batch may be used by the cache writer
