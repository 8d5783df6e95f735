"""Tokenizers: GPT-2's byte-pair encoding (through tiktoken) and a byte-level fallback, behind one small interface.

Every tokenizer here has

    name: str          "gpt2", "bytes", or the name of a custom tiktoken encoding
    n_vocab: int       ids are 0 .. n_vocab - 1 (the model's vocab_size must be at least this)
    eot_token: int     the end-of-text id written after every document
    encode(text) -> list[int]        plain text only: "<|endoftext|>" inside the text is encoded as ordinary
                                     characters, so a document cannot forge a document boundary
    encode_batch(texts) -> list[list[int]]
    decode(ids) -> str               the end-of-text id decodes to "<|endoftext|>"

GPT-2's tokenizer needs two files (``vocab.bpe``, ``encoder.json``) that tiktoken downloads once and keeps in a
cache folder. Offline, ``get_tokenizer("auto")`` falls back to ``ByteTokenizer`` (257 ids: the 256 byte values
and end-of-text), which needs no files at all; ``get_tokenizer("gpt2")`` raises ``TokenizerError`` with the fix.

tiktoken downloads with ``requests.get`` and no timeout, so on a network that silently drops packets it could
wait for minutes. Before asking it for GPT-2 we therefore look for its cached files ourselves, and when they are
not there we try a short connection to the download host (``files.can_reach``) and give up at once if that fails.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from urllib.parse import urlparse

from kernels.errors import MinigptError

from .files import can_reach

__all__ = ["TOKENIZER_CHOICES", "ByteTokenizer", "TiktokenTokenizer", "TokenizerError", "get_tokenizer",
           "tokenizer_from_name"]

log = logging.getLogger(__name__)

EOT_TEXT = "<|endoftext|>"  # GPT-2's end-of-text special token
TOKENIZER_CHOICES = ("auto", "gpt2", "bytes")
# The two files tiktoken fetches for GPT-2 (tiktoken_ext/openai_public.py); it caches each under sha1(url).
GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)

_GPT2_FIX = ("put tiktoken's GPT-2 files (vocab.bpe, encoder.json) in a folder and set TIKTOKEN_CACHE_DIR to it, "
             "or run once with internet access, or use --tokenizer bytes")


class TokenizerError(MinigptError, RuntimeError):
    """A tokenizer that cannot be built or used; the message says how to fix it."""


def _check_ids(ids, n_vocab: int) -> list[int]:
    """``ids`` (a list, a 1-D tensor or array) as a list of ints, each checked against the vocabulary."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < n_vocab]
    if bad:
        raise TokenizerError(f"token id {bad[0]} is outside this tokenizer's vocabulary (0..{n_vocab - 1}) — "
                             f"was the model trained with another tokenizer?")
    return ids


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are the byte values and 256 is end-of-text.

    Any text encodes with no vocabulary file, which makes it the offline fallback. Sequences are about four times
    longer than GPT-2's for English, so a model sees less text within the same context length.
    """

    name = "bytes"
    n_vocab = 257
    eot_token = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # Bytes between end-of-text ids are decoded as one run, so a character split over several ids comes back
        # whole; an incomplete character (e.g. at the end of a sample) becomes U+FFFD instead of an exception.
        pieces, run = [], []
        for i in _check_ids(ids, self.n_vocab):
            if i == self.eot_token:
                pieces.append(bytes(run).decode("utf-8", errors="replace") + EOT_TEXT)
                run = []
            else:
                run.append(i)
        pieces.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(pieces)

    def __repr__(self) -> str:
        return "ByteTokenizer(n_vocab=257)"


class TiktokenTokenizer:
    """Any ``tiktoken.Encoding`` (GPT-2's, or a custom one) behind the interface above."""

    def __init__(self, encoding, name: str | None = None):
        if EOT_TEXT not in encoding.special_tokens_set:
            raise TokenizerError(f"tiktoken encoding {encoding.name!r} has no {EOT_TEXT} special token — "
                                 f"add it to special_tokens when building the encoding")
        self.encoding = encoding
        self.name = name or encoding.name
        self.n_vocab = encoding.n_vocab
        self.eot_token = encoding.encode_single_token(EOT_TEXT)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # tiktoken encodes a batch on several threads (its Rust core releases the GIL).
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(_check_ids(ids, self.n_vocab), errors="replace")

    def __repr__(self) -> str:
        return f"TiktokenTokenizer(name={self.name!r}, n_vocab={self.n_vocab})"


def _tiktoken_cache_dir() -> str:
    """The folder tiktoken caches downloads in (tiktoken/load.py: TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR, tmp)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def gpt2_cache_paths() -> list[str]:
    """Where tiktoken looks for GPT-2's two files: ``<cache dir>/sha1(url)`` (empty when caching is off)."""
    cache_dir = _tiktoken_cache_dir()
    if not cache_dir:
        return []
    return [os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()) for url in GPT2_URLS]


def _load_gpt2_encoding():
    """tiktoken's GPT-2 encoding, or TokenizerError (quickly, when the files are neither cached nor reachable)."""
    try:
        import tiktoken
    except ImportError:
        raise TokenizerError("tiktoken is not installed — pip install tiktoken, or use --tokenizer bytes") from None
    paths = gpt2_cache_paths()
    cached = bool(paths) and all(os.path.exists(p) for p in paths)
    if not cached and not can_reach(GPT2_URLS[0]):
        host = urlparse(GPT2_URLS[0]).hostname
        raise TokenizerError(f"GPT-2 tokenizer files are not cached and {host} cannot be reached — {_GPT2_FIX}")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # network errors, a corrupt cache, a hash mismatch: all end the same way for the user
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise TokenizerError(f"could not load the GPT-2 tokenizer ({reason}) — {_GPT2_FIX}") from e


def tokenizer_from_name(name: str):
    """The tokenizer called ``name`` ("gpt2" or "bytes"), with no fallback: loading a checkpoint needs exactly the
    tokenizer it was trained with."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return TiktokenTokenizer(_load_gpt2_encoding(), name="gpt2")
    raise TokenizerError(f"unknown tokenizer {name!r} — choose one of: gpt2, bytes")


def get_tokenizer(name: str = "auto"):
    """The tokenizer for ``--tokenizer NAME``: "gpt2", "bytes", or "auto" (GPT-2, else bytes with one warning)."""
    if name not in TOKENIZER_CHOICES:
        raise TokenizerError(f"unknown tokenizer {name!r} — choose one of: {', '.join(TOKENIZER_CHOICES)}")
    if name != "auto":
        return tokenizer_from_name(name)
    try:
        return TiktokenTokenizer(_load_gpt2_encoding(), name="gpt2")
    except TokenizerError as e:
        reason = str(e).split(" — ")[0]  # the fix is for --tokenizer gpt2; here we fall back instead
        log.warning("warning: %s; falling back to the byte-level tokenizer — see README 'Offline'", reason)
        return ByteTokenizer()
