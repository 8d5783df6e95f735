"""Tokenizers, offline: the byte tokenizer, a small BPE encoding built here, and GPT-2's loading and fallback."""
from __future__ import annotations

import hashlib
import inspect
import logging
import time

import pytest

tiktoken = pytest.importorskip("tiktoken")

from minigpt import tokenizer as tok
from minigpt.tokenizer import ByteTokenizer, TiktokenTokenizer, TokenizerError, get_tokenizer, tokenizer_from_name

EOT = "<|endoftext|>"
# Merges in priority order; each new token is the concatenation of two earlier ones, as BPE requires.
MERGES = [(b"t", b"h"), (b"th", b"e"), (b" ", b"the"), (b"a", b"n"), (b"an", b"d"), (b" ", b"and")]


def small_encoding(with_eot: bool = True):
    """A 263-id BPE: the 256 bytes, six merges and end-of-text; words (with one leading space) are pre-tokens."""
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in MERGES:
        ranks[left + right] = len(ranks)
    special = {EOT: len(ranks)} if with_eot else {}
    return tiktoken.Encoding(name="tiny-bpe", pat_str=r" ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
                             mergeable_ranks=ranks, special_tokens=special)


# ---------------------------------------------------------------------------------------------------------------
# Byte tokenizer
# ---------------------------------------------------------------------------------------------------------------

def test_bytes_round_trip_and_eot():
    t = ByteTokenizer()
    assert (t.name, t.n_vocab, t.eot_token) == ("bytes", 257, 256)
    text = "Héllo, wörld! 日本語 🙂\nnew line"
    ids = t.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert len(ids) > len(text)  # the non-ASCII characters take several bytes
    assert t.decode(ids) == text
    assert t.decode(ids + [t.eot_token] + t.encode("b")) == text + EOT + "b"
    assert t.encode(EOT) == list(EOT.encode())  # plain text, not the special id
    assert t.encode_batch(["ab", "ç"]) == [t.encode("ab"), t.encode("ç")]


def test_bytes_decode_invalid_utf8_and_bad_ids():
    t = ByteTokenizer()
    assert t.decode([0xFF, ord("A")]) == "\ufffdA"
    assert t.decode(t.encode("é")[:1]) == "\ufffd"  # a character cut in half
    with pytest.raises(TokenizerError, match="outside this tokenizer's vocabulary"):
        t.decode([65, 300])


# ---------------------------------------------------------------------------------------------------------------
# BPE through tiktoken, with an encoding built in the test
# ---------------------------------------------------------------------------------------------------------------

def test_tiktoken_small_bpe_matches_hand_merges():
    t = TiktokenTokenizer(small_encoding())
    th, the, sp_the, an, and_, sp_and = range(256, 262)
    assert (t.name, t.n_vocab, t.eot_token) == ("tiny-bpe", 263, 262)
    assert t.encode("the") == [the]
    assert t.encode(" the") == [sp_the]
    assert t.encode("that") == [th, ord("a"), ord("t")]
    assert t.encode("the band") == [the, ord(" "), ord("b"), and_]
    assert t.encode("sand and") == [ord("s"), and_, sp_and]
    assert t.encode("hand") == [ord("h"), and_]
    assert t.encode(EOT) == list(EOT.encode())  # "<|endoftext|>" in the text stays text
    assert t.encode("an") == [an]


def test_tiktoken_round_trip_batch_and_eot():
    t = TiktokenTokenizer(small_encoding(), name="custom")
    assert t.name == "custom"
    texts = ["the cat and the hat", "Grüße, 世界! 42 <|endoftext|>", "  spaces  \n\n end"]
    for text in texts:
        assert t.decode(t.encode(text)) == text
    assert t.encode_batch(texts) == [t.encode(x) for x in texts]
    assert t.decode(t.encode("a") + [t.eot_token] + t.encode("b")) == "a" + EOT + "b"
    with pytest.raises(TokenizerError, match="vocabulary"):
        t.decode([t.n_vocab])


def test_tiktoken_without_eot_is_an_error():
    with pytest.raises(TokenizerError, match="endoftext"):
        TiktokenTokenizer(small_encoding(with_eot=False))


# ---------------------------------------------------------------------------------------------------------------
# get_tokenizer / tokenizer_from_name and the offline path
# ---------------------------------------------------------------------------------------------------------------

def _gpt2_fails(monkeypatch, message="no network here"):
    def fail():
        raise TokenizerError(message)
    monkeypatch.setattr(tok, "_load_gpt2_encoding", fail)


def test_auto_falls_back_to_bytes_with_one_warning(monkeypatch, caplog):
    _gpt2_fails(monkeypatch)
    with caplog.at_level(logging.WARNING):
        t = get_tokenizer("auto")
    assert isinstance(t, ByteTokenizer)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert "\n" not in line and "byte-level" in line and "no network here" in line


def test_explicit_gpt2_failing_raises_with_the_fix(monkeypatch, tmp_path):
    # Offline and nothing cached: the guard must answer at once, without asking tiktoken to download.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tok, "can_reach", lambda url, timeout=None: False)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("tiktoken should not be asked"))
    start = time.perf_counter()
    with pytest.raises(TokenizerError) as err:
        get_tokenizer("gpt2")
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert "TIKTOKEN_CACHE_DIR" in msg and "--tokenizer bytes" in msg and "\n" not in msg
    with pytest.raises(TokenizerError, match="TIKTOKEN_CACHE_DIR"):
        tokenizer_from_name("gpt2")  # loading a checkpoint: no fallback either


def test_gpt2_download_error_becomes_tokenizer_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tok, "can_reach", lambda url, timeout=None: True)

    def refuse(name):
        raise ConnectionError("connection reset by peer")
    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    with pytest.raises(TokenizerError, match="connection reset by peer.*--tokenizer bytes"):
        get_tokenizer("gpt2")


def test_gpt2_cached_files_skip_the_network_check(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    paths = tok.gpt2_cache_paths()
    for i, path in enumerate(paths):
        with open(path, "wb") as f:
            f.write(b"file %d" % i)
    # The names we look for are the ones tiktoken itself reads: with the files in place it reads them offline.
    from tiktoken.load import read_file_cached
    for i, url in enumerate(tok.GPT2_URLS):
        assert read_file_cached(url) == b"file %d" % i
        assert paths[i].endswith(hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setattr(tok, "can_reach", lambda url, timeout=None: pytest.fail("no probe when cached"))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: small_encoding())
    t = get_tokenizer("gpt2")
    assert isinstance(t, TiktokenTokenizer) and t.name == "gpt2"


def test_gpt2_urls_are_tiktokens():
    import tiktoken_ext.openai_public as public
    source = inspect.getsource(public.gpt2)
    assert all(url in source for url in tok.GPT2_URLS)


def test_unknown_names():
    with pytest.raises(TokenizerError, match="auto, gpt2, bytes"):
        get_tokenizer("gpt3")
    with pytest.raises(TokenizerError, match="gpt2, bytes"):
        tokenizer_from_name("auto")
    assert isinstance(get_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(tokenizer_from_name("bytes"), ByteTokenizer)
