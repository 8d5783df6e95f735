"""load_token_splits and `python -m minigpt.data`: a source's train and validation ids, and the errors a user meets
first."""
from __future__ import annotations

import os

import numpy as np
import pytest

from minigpt import data
from minigpt.data import DataError, load_token_splits
from minigpt.tokenizer import ByteTokenizer
from tests.data_helpers import EOT, cache, enc, leftovers, write


def test_single_txt_file_split_by_ratio(tmp_path, cache):
    text = "Hello world. Ünïcode too!\n" * 40
    f = write(tmp_path / "a.txt", text)
    train, val, info = load_token_splits(str(f), ByteTokenizer(), cache_dir=cache)
    expected = enc(text) + [EOT]
    n_train = int(0.9 * len(expected))
    assert train.tolist() == expected[:n_train] and val.tolist() == expected[n_train:]
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and train.ndim == 1
    assert info["source"] == str(f) and info["n_docs"] == 1 and info["split"] == "ratio"
    assert (info["train_tokens"], info["val_tokens"]) == (n_train, len(expected) - n_train)
    assert all(os.path.exists(p) for p in info["cache"])
    assert leftovers(cache) == []


def test_path_errors(tmp_path, cache):
    with pytest.raises(DataError, match="no such file or folder: .*tinystories.*stories.*hf:NAME"):
        load_token_splits(str(tmp_path / "missing.txt"), ByteTokenizer(), cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt files in folder"):
        load_token_splits(str(tmp_path / "empty"), ByteTokenizer(), cache_dir=cache)
    with pytest.raises(DataError, match="no .txt files match"):
        load_token_splits(str(tmp_path / "empty" / "*.txt"), ByteTokenizer(), cache_dir=cache)
    short = write(tmp_path / "short.txt", "hi")
    with pytest.raises(DataError, match="corpus too short: 3 tokens"):
        load_token_splits(str(short), ByteTokenizer(), cache_dir=cache)
    with pytest.raises(DataError, match="train_ratio"):
        load_token_splits(str(short), ByteTokenizer(), cache_dir=cache, train_ratio=1.0)


def test_empty_data_is_an_error_not_the_default(cache):
    for empty in ("", "   "):
        with pytest.raises(DataError, match="--data is empty"):
            load_token_splits(empty, ByteTokenizer(), cache_dir=cache)


def test_a_device_or_a_fifo_as_data_is_named_and_refused(tmp_path, cache, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, kind in (("/dev/zero", "a character device"), (str(fifo), "a FIFO")):
        with pytest.raises(DataError, match=f"{path} is {kind}.* only regular .txt files and folders of them"):
            load_token_splits(path, ByteTokenizer(), cache_dir=cache)
        assert data.main([path, "--tokenizer", "bytes", "--cache-dir", cache]) == 1  # before any tokenizer
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path} is {kind}") and "\n" not in err and "no such file" not in err
