"""Data sources, the token cache and the windows, offline: every corpus is written here, in tmp_path."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from minigpt import data
from minigpt.data import DataError, TokenWindows, create_dataloader, load_token_splits, make_loader
from minigpt.stories import generate_stories
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
    """What the cache folder holds besides the entries' lock files (kept on purpose: see data._entry_lock)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------------------

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


def test_folder_recursive_sorted_with_eot_between_documents(tmp_path, cache):
    root = tmp_path / "corpus"
    docs = {"b.txt": "second doc", "a.txt": "first doc", "sub/c.txt": "third, nested", "sub/z.md": "not text"}
    for name, text in docs.items():
        write(root / name, text)
    train, val, info = load_token_splits(str(root), ByteTokenizer(), cache_dir=cache, train_ratio=0.5)
    tokens = both(train, val)
    assert tokens == enc("first doc") + [EOT] + enc("second doc") + [EOT] + enc("third, nested") + [EOT]
    assert info["n_docs"] == 3
    eots = [i for i, t in enumerate(tokens) if t == EOT]
    assert eots == [9, 20, 34]  # each document followed by one end-of-text: cumulative lengths 9, 9+1+10, ...


def test_glob_and_max_docs(tmp_path, cache):
    for name in ("x1.txt", "x2.txt", "y.txt", "x3.log"):
        write(tmp_path / "g" / name, name * 5)
    pattern = str(tmp_path / "g" / "x*")
    train, val, _ = load_token_splits(pattern, ByteTokenizer(), cache_dir=cache)
    assert both(train, val) == enc("x1.txt" * 5) + [EOT] + enc("x2.txt" * 5) + [EOT]
    train, val, info = load_token_splits(pattern, ByteTokenizer(), cache_dir=cache, max_docs=1)
    assert both(train, val) == enc("x1.txt" * 5) + [EOT] and info["n_docs"] == 1


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


def test_undecodable_file_is_named_and_leaves_nothing(tmp_path, cache):
    write(tmp_path / "d" / "good.txt", "fine text " * 10)
    (tmp_path / "d" / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8"):
        load_token_splits(str(tmp_path / "d"), ByteTokenizer(), cache_dir=cache)
    assert cache_files(cache) == []  # no cache entry, no temporary file


def test_large_file_is_tokenized_in_chunks_exactly(tmp_path, cache, monkeypatch):
    bpe = small_bpe()
    text = "\n\n".join(generate_stories(30)) + "\n  indented line\nthe end  \n"
    f = write(tmp_path / "big.txt", text)
    monkeypatch.setattr(data, "CHUNK_CHARS", 200)
    monkeypatch.setattr(data, "BATCH_PIECES", 3)
    pieces = list(data._file_pieces([str(f)]))
    assert len(pieces) > 10 and "".join(p for p, _ in pieces) == text
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    train, val, _ = load_token_splits(str(f), bpe, cache_dir=cache)
    assert both(train, val) == bpe.encode(text) + [bpe.eot_token]  # the cuts changed no token


def test_file_without_spaces_is_still_cut(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_CHARS", 64)
    text = "abcdefghij" * 200
    f = write(tmp_path / "long.txt", text)
    assert len(list(data._file_pieces([str(f)]))) > 2
    train, val, _ = load_token_splits(str(f), ByteTokenizer(), cache_dir=cache)
    assert both(train, val) == enc(text) + [EOT]


# ---------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------

def test_cache_is_written_once_then_reused(tmp_path, cache):
    f = write(tmp_path / "a.txt", "some text to cache. " * 30)
    spy = Spy()
    train1, val1, info1 = load_token_splits(str(f), spy, cache_dir=cache)
    assert spy.calls > 0 and info1["cached"] is False
    train2, val2, info2 = load_token_splits(str(f), Spy(refuse=True), cache_dir=cache)
    assert info2["cached"] is True and info2["cache"] == info1["cache"]
    assert both(train2, val2) == both(train1, val1)
    assert cache_files(cache) == sorted([os.path.basename(info1["cache"][0]),
                                   os.path.basename(info1["cache"][0]) + ".json"])


def test_cache_key_changes_with_inputs(tmp_path, cache):
    root = tmp_path / "docs"
    for i in range(4):
        write(root / f"{i}.txt", f"document number {i} " * 10)
    base = load_token_splits(str(root), ByteTokenizer(), cache_dir=cache)[2]["cache"]
    fewer = load_token_splits(str(root), ByteTokenizer(), cache_dir=cache, max_docs=2)[2]["cache"]
    other_tok = load_token_splits(str(root), small_bpe(), cache_dir=cache)[2]["cache"]
    assert len({base[0], fewer[0], other_tok[0]}) == 3
    write(root / "1.txt", "changed, and longer than before " * 10)  # size and time change: a new entry
    _, _, info = load_token_splits(str(root), Spy(), cache_dir=cache)
    assert info["cached"] is False and info["cache"] != base
    assert load_token_splits(str(root), ByteTokenizer(), cache_dir=cache)[2]["cached"] is True


def test_interrupted_write_leaves_no_partial_cache(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(data, "BATCH_PIECES", 2)
    root = tmp_path / "docs"
    for i in range(10):
        write(root / f"{i:02d}.txt", f"doc {i} " * 20)
    with pytest.raises(data.TokenizingInterrupted, match="interrupted .SIGINT. while tokenizing"):
        load_token_splits(str(root), Spy(fail_after=5), cache_dir=cache)
    assert cache_files(cache) == []
    _, _, info = load_token_splits(str(root), Spy(), cache_dir=cache)
    assert info["n_docs"] == 10 and leftovers(cache) == []
    with open(info["cache"][0] + ".json") as f:
        meta = json.load(f)
    assert meta["n_tokens"] * 2 == os.path.getsize(info["cache"][0])


def test_default_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "envcache"))
    _, _, info = load_token_splits("stories", ByteTokenizer(), max_docs=20)
    assert info["cache"][0].startswith(str(tmp_path / "envcache"))


def test_uint32_for_large_vocabularies():
    assert data.token_dtype(257) == np.uint16 and data.token_dtype(65536) == np.uint16
    assert data.token_dtype(65537) == np.uint32 and data.token_dtype(100277) == np.uint32


# ---------------------------------------------------------------------------------------------------------------
# Generated stories, TinyStories and hf:
# ---------------------------------------------------------------------------------------------------------------

def test_stories_source(cache):
    train, val, info = load_token_splits("stories", ByteTokenizer(), max_docs=40, cache_dir=cache)
    expected = [t for s in generate_stories(40) for t in enc(s) + [EOT]]
    assert both(train, val) == expected
    assert info["source"] == "stories" and info["n_docs"] == 40 and info["fallback"] is None


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def hf_folder(tmp_path, monkeypatch):
    """A local dataset folder that `datasets.load_dataset` reads as splits "train" and "validation"."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep ~/.cache clean
    folder = tmp_path / "ds"
    write_jsonl(folder / "train.jsonl", [{"body": f"train story {i}.", "id": i} for i in range(25)])
    write_jsonl(folder / "validation.jsonl", [{"body": f"held-out story {i}.", "id": i} for i in range(6)])
    return folder


def record_load_dataset(monkeypatch, redirect=None):
    """Wrap datasets.load_dataset to record its calls (and optionally load another path instead)."""
    import datasets
    real, calls = datasets.load_dataset, []

    def load(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return real(str(redirect) if redirect else path, *args, **kwargs)
    monkeypatch.setattr(datasets, "load_dataset", load)
    return calls


def test_hf_local_dataset_streaming_with_max_docs(hf_folder, cache, monkeypatch):
    calls = record_load_dataset(monkeypatch)
    train, val, info = load_token_splits(f"hf:{hf_folder}", ByteTokenizer(), max_docs=10, text_field="body",
                                         cache_dir=cache)
    assert calls[0][2]["streaming"] is True
    assert train.tolist() == [t for i in range(10) for t in enc(f"train story {i}.") + [EOT]]
    assert val.tolist() == enc("held-out story 0.") + [EOT]  # max(1, 10 // 10) validation documents
    assert info["split"] == "validation" and (info["train_docs"], info["val_docs"]) == (10, 1)


def test_hf_local_dataset_full_and_cached(hf_folder, cache, monkeypatch):
    calls = record_load_dataset(monkeypatch)
    train, val, info = load_token_splits(f"hf:{hf_folder}", ByteTokenizer(), text_field="body", cache_dir=cache)
    assert calls[0][2]["streaming"] is False and info["cached"] is False
    assert train.tolist() == [t for i in range(25) for t in enc(f"train story {i}.") + [EOT]]
    assert val.tolist() == [t for i in range(6) for t in enc(f"held-out story {i}.") + [EOT]]
    # Cached now: a second run opens neither the dataset nor the tokenizer.
    _, _, again = load_token_splits(f"hf:{hf_folder}", Spy(refuse=True), text_field="body", cache_dir=cache)
    assert again["cached"] and len(calls) == 1


def test_hf_without_validation_split_uses_the_ratio(hf_folder, cache):
    (hf_folder / "validation.jsonl").unlink()
    train, val, info = load_token_splits(f"hf:{hf_folder}", ByteTokenizer(), max_docs=20, text_field="body",
                                         cache_dir=cache)
    assert both(train, val) == [t for i in range(20) for t in enc(f"train story {i}.") + [EOT]]
    assert info["split"] == "ratio"


def test_hf_missing_text_field_lists_the_fields(hf_folder, cache):
    with pytest.raises(DataError, match="no field 'text'.*body, id"):
        load_token_splits(f"hf:{hf_folder}", ByteTokenizer(), max_docs=5, cache_dir=cache)


def test_tinystories_uses_train_and_validation(hf_folder, cache, monkeypatch):
    # The TinyStories branch end to end, with the Hub replaced by the local folder (its text field renamed).
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (hf_folder / f"{split}.jsonl").read_text().splitlines()]
        write_jsonl(hf_folder / f"{split}.jsonl", [{"text": r["body"]} for r in rows])
    monkeypatch.setattr(data, "can_reach", lambda url, timeout=None: True)
    calls = record_load_dataset(monkeypatch, redirect=hf_folder)
    _, val, info = load_token_splits("tinystories", ByteTokenizer(), max_docs=20, cache_dir=cache)
    assert calls[0][0] == "roneneldan/TinyStories" and calls[0][2]["streaming"] is True
    assert info["source"] == "tinystories" and (info["train_docs"], info["val_docs"]) == (20, 2)
    assert val.tolist() == enc("held-out story 0.") + [EOT] + enc("held-out story 1.") + [EOT]


def test_tinystories_falls_back_to_stories_when_the_hub_fails(cache, monkeypatch, caplog):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(data, "can_reach", lambda url, timeout=None: True)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with caplog.at_level(logging.WARNING):
        train, val, info = load_token_splits("tinystories", ByteTokenizer(), max_docs=30, cache_dir=cache)
    assert info["source"] == "stories" and "ConnectionError" in info["fallback"] and info["n_docs"] == 30
    assert both(train, val) == [t for s in generate_stories(30) for t in enc(s) + [EOT]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "stories" in warnings[0] and "\n" not in warnings[0]


def test_tinystories_unreachable_hub_is_detected_fast(cache, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data, "can_reach", lambda url, timeout=None: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("no download attempt when offline"))
    start = time.perf_counter()
    _, _, info = load_token_splits("tinystories", ByteTokenizer(), max_docs=10, cache_dir=cache)
    assert time.perf_counter() - start < 5.0
    assert info["source"] == "stories" and "cannot be reached" in info["fallback"]


def test_without_datasets_and_tiktoken_installed(tmp_path):
    # In a fresh interpreter where neither package can be imported: the module loads, `stories` works and
    # tinystories falls back; "auto" gives the byte tokenizer.
    code = (
        "import sys; sys.modules['datasets'] = None; sys.modules['tiktoken'] = None\n"
        "from minigpt.data import load_token_splits\n"
        "from minigpt.tokenizer import get_tokenizer\n"
        "tok = get_tokenizer('auto'); assert tok.name == 'bytes'\n"
        f"_, _, info = load_token_splits('tinystories', tok, max_docs=5, cache_dir={str(tmp_path)!r})\n"
        "assert info['source'] == 'stories' and 'not installed' in info['fallback'], info\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_unknown_hf_name_is_a_data_error(cache):
    with pytest.raises(DataError, match="names no dataset"):
        load_token_splits("hf:", ByteTokenizer(), cache_dir=cache)


# ---------------------------------------------------------------------------------------------------------------
# Windows and loaders
# ---------------------------------------------------------------------------------------------------------------

def seed_windows(token_ids, max_length, stride):
    """The seed's GPTDatasetV1 loop, written out."""
    inputs, targets = [], []
    for i in range(0, len(token_ids) - max_length, stride):
        inputs.append(token_ids[i:i + max_length])
        targets.append(token_ids[i + 1:i + max_length + 1])
    return inputs, targets


@pytest.mark.parametrize("n,max_length,stride", [(50, 8, 3), (50, 8, 8), (50, 4, 11), (9, 8, 1), (8, 8, 2),
                                                 (3, 8, 2)])
def test_windows_match_the_seed_loop(tmp_path, n, max_length, stride):
    ids = np.random.default_rng(n + stride).integers(0, 50257, size=n).astype(np.uint16)
    path = tmp_path / "t.bin"
    ids.tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(n,))
    ds = TokenWindows(tokens, max_length, stride)
    inputs, targets = seed_windows(ids.tolist(), max_length, stride)
    assert len(ds) == len(inputs)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.int64 and x.shape == (max_length,)
        assert x.tolist() == inputs[i] and y.tolist() == targets[i]
    with pytest.raises(IndexError):
        ds[len(ds)]
    if len(ds):
        assert ds[-1][0].tolist() == inputs[-1]
        # Pickled for a worker process, the memmap is reopened from its file rather than copied.
        clone = pickle.loads(pickle.dumps(ds))
        assert isinstance(clone.tokens, np.memmap) and clone[0][0].tolist() == inputs[0]
        assert len(pickle.dumps(ds)) < 1000 + n


def test_make_loader_batches_and_seeded_shuffle():
    tokens = np.arange(200, dtype=np.uint16)

    def order(seed: int) -> list[list[int]]:  # the first token of each window, batch by batch
        return [x[:, 0].tolist() for x, _ in make_loader(tokens, 4, 10, 5, True, True, seed=seed)]

    first, again, other = order(0), order(0), order(1)
    assert first == again and first != other
    batches = list(make_loader(tokens, 4, 10, 5, shuffle=False, drop_last=True))
    n_windows = len(range(0, 200 - 10, 5))
    assert len(batches) == n_windows // 4
    x, y = batches[0]
    assert x.shape == (4, 10) and x.dtype == torch.int64 and torch.equal(y, x + 1)
    starts = [v for b in first for v in b]  # each window once, in another order
    assert len(set(starts)) == len(starts) == n_windows // 4 * 4 and all(v % 5 == 0 for v in starts)
    assert starts != sorted(starts)


def test_make_loader_too_few_tokens_says_how_many_are_needed():
    batch_size, max_length, stride = 4, 16, 8
    needed = (batch_size - 1) * stride + max_length + 1
    assert len(seed_windows(list(range(needed)), max_length, stride)[0]) == batch_size  # the formula is right
    assert len(seed_windows(list(range(needed - 1)), max_length, stride)[0]) == batch_size - 1
    make_loader(np.arange(needed), batch_size, max_length, stride, shuffle=False, drop_last=True)
    with pytest.raises(DataError) as err:
        make_loader(np.arange(needed - 1), batch_size, max_length, stride, shuffle=False, drop_last=True)
    msg = str(err.value)
    assert f"{needed - 1} tokens" in msg and f"need {needed}" in msg and "--context-length" in msg
    with pytest.raises(DataError, match=f"need {max_length + 1}"):
        make_loader(np.arange(max_length), batch_size, max_length, stride, shuffle=False, drop_last=False)


def test_create_dataloader_like_the_seed():
    assert data.create_dataloader_v1 is create_dataloader
    txt = "One story.<|endoftext|>Another story, a bit longer than the first one."
    ids = enc("One story.") + [EOT] + enc("Another story, a bit longer than the first one.")
    loader = create_dataloader(txt, batch_size=2, max_length=6, stride=4, shuffle=False, tokenizer=ByteTokenizer())
    inputs, targets = seed_windows(ids, 6, 4)
    got_x = [row for x, _ in loader for row in x.tolist()]
    got_y = [row for _, y in loader for row in y.tolist()]
    assert got_x == inputs[:len(inputs) // 2 * 2] and got_y == targets[:len(got_y)]
    assert EOT in [t for row in got_x for t in row]


# ---------------------------------------------------------------------------------------------------------------
# What users break: links, damaged and stale cache files, interruptions, empty or impossible arguments
# ---------------------------------------------------------------------------------------------------------------

def test_broken_and_looping_links_are_skipped_and_each_real_file_is_read_once(tmp_path, cache, caplog):
    d = tmp_path / "d"
    text = "the only real document. " * 20
    write(d / "real.txt", text)
    os.symlink("loop.txt", d / "loop.txt")  # a link to itself
    os.symlink("nowhere.txt", d / "dangling.txt")
    os.symlink("real.txt", d / "alias.txt")  # the same file under a second name
    os.symlink("..", d / "sub")  # d/sub -> d: a cycle
    expected = enc(text) + [EOT]
    for source in (str(d), str(d / "**" / "*.txt")):
        with caplog.at_level(logging.WARNING):
            train, val, info = load_token_splits(source, ByteTokenizer(), cache_dir=cache)
        assert both(train, val) == expected and info["n_docs"] == 1, source
        assert "skipping 2 broken link(s)" in caplog.text


def test_a_linked_folder_is_followed(tmp_path, cache):
    write(tmp_path / "elsewhere" / "b.txt", "linked in")
    write(tmp_path / "d" / "a.txt", "own text")
    os.symlink(tmp_path / "elsewhere", tmp_path / "d" / "more")
    train, val, info = load_token_splits(str(tmp_path / "d"), ByteTokenizer(), cache_dir=cache, train_ratio=0.5)
    assert both(train, val) == enc("own text") + [EOT] + enc("linked in") + [EOT] and info["n_docs"] == 2


def test_empty_data_is_an_error_not_the_default(cache):
    for empty in ("", "   "):
        with pytest.raises(DataError, match="--data is empty"):
            load_token_splits(empty, ByteTokenizer(), cache_dir=cache)


def test_cache_dir_under_a_file_is_one_line(tmp_path):
    blocker = write(tmp_path / "file", "not a folder")
    for where in (blocker, blocker / "sub"):
        with pytest.raises(DataError, match="a file is in the way.* pass another --cache-dir") as e:
            load_token_splits("stories", ByteTokenizer(), max_docs=5, cache_dir=str(where))
        assert "\n" not in str(e.value)


def test_damaged_cache_is_detected_and_tokenized_again(tmp_path, cache, caplog):
    f = write(tmp_path / "a.txt", "words to be cached " * 30)
    train, val, info = load_token_splits(str(f), ByteTokenizer(), cache_dir=cache)
    good = both(train, val)
    path = info["cache"][0]
    with open(path, "r+b") as fh:  # overwrite some ids with 0xFFFF, far outside the 257-id vocabulary
        fh.seek(20)
        fh.write(b"\xff" * 8)
    spy = Spy()
    with caplog.at_level(logging.WARNING):
        train, val, info = load_token_splits(str(f), spy, cache_dir=cache)
    assert spy.calls > 0 and info["cached"] is False and both(train, val) == good
    assert "is damaged (it holds id 65535, the vocabulary has 257)" in caplog.text


def test_cache_and_its_metadata_follow_the_umask(tmp_path, cache):
    old = os.umask(0o022)
    try:
        _, _, info = load_token_splits("stories", ByteTokenizer(), max_docs=5, cache_dir=cache)
    finally:
        os.umask(old)
    for path in (info["cache"][0], info["cache"][0] + ".json"):
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o644), path


def test_an_edited_source_replaces_its_old_cache_entry(tmp_path, cache):
    root = tmp_path / "docs"
    for i in range(3):
        write(root / f"{i}.txt", f"document {i} " * 10)
    first = load_token_splits(str(root), ByteTokenizer(), cache_dir=cache)[2]["cache"][0]
    fewer = load_token_splits(str(root), ByteTokenizer(), cache_dir=cache, max_docs=2)[2]["cache"][0]
    write(root / "2.txt", "edited, and longer than it was " * 10)
    edited = load_token_splits(str(root), ByteTokenizer(), cache_dir=cache)[2]["cache"][0]
    entries = {n for n in os.listdir(cache) if n.endswith(".bin")}
    # the old version of the same files is gone; another selection of them (max_docs) is another entry and stays
    assert entries == {os.path.basename(edited), os.path.basename(fewer)} and first != edited


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path, cache):
    import fcntl

    os.makedirs(cache)
    stale, young, locked = (os.path.join(cache, f".e-{n}.bin.x{n}.tmp") for n in ("stale", "young", "locked"))
    for path in (stale, young, locked):
        open(path, "wb").close()
    long_ago = time.time() - 3600
    os.utime(stale, (long_ago, long_ago))
    os.utime(locked, (long_ago, long_ago))
    holder = open(locked, "rb")  # another writer, still alive, holds its lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        load_token_splits("stories", ByteTokenizer(), max_docs=5, cache_dir=cache)
    finally:
        holder.close()
    assert not os.path.exists(stale) and os.path.exists(young) and os.path.exists(locked)


SLOW_TOKENIZING = """
import sys, time
sys.path.insert(0, {root!r})
from minigpt import data
from minigpt.tokenizer import ByteTokenizer

class Slow(ByteTokenizer):
    def encode_batch(self, texts):
        print("tokenizing", flush=True)
        time.sleep(0.2)
        return super().encode_batch(texts)

data.BATCH_PIECES = 1
data.get_tokenizer = lambda name: Slow()
sys.exit(data.main([{corpus!r}, "--cache-dir", {cache!r}]))
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_tokenizing_removes_the_partial_file_and_says_so_in_one_line(tmp_path, cache, sig, code):
    root = tmp_path / "docs"
    for i in range(50):
        write(root / f"{i:02d}.txt", f"document {i} " * 5)
    script = SLOW_TOKENIZING.format(root=str(ROOT), corpus=str(root), cache=cache)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(3):  # in the middle of writing the cache
        assert proc.stdout.readline().strip() == "tokenizing"
    assert leftovers(cache), "the temporary file should exist while tokenizing"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err.strip().splitlines()[-1].startswith(f"interrupted ({sig.name}) while tokenizing")
    assert "Traceback" not in err
    assert cache_files(cache) == []


# ---------------------------------------------------------------------------------------------------------------
# What the data is not, a cache that cannot be written, and two processes after one entry
# ---------------------------------------------------------------------------------------------------------------

def test_a_device_or_a_fifo_as_data_is_named_and_refused(tmp_path, cache, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, kind in (("/dev/zero", "a character device"), (str(fifo), "a FIFO")):
        with pytest.raises(DataError, match=f"{path} is {kind}.* only regular .txt files and folders of them"):
            load_token_splits(path, ByteTokenizer(), cache_dir=cache)
        assert data.main([path, "--tokenizer", "bytes", "--cache-dir", cache]) == 1  # before any tokenizer
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path} is {kind}") and "\n" not in err and "no such file" not in err


class _FullDisk:
    """A file whose writes fail as on a full disk, after ``room`` bytes."""

    def __init__(self, f, room: int, errno_: int):
        self.f, self.room, self.errno = f, room, errno_

    def write(self, b: bytes) -> int:
        if len(b) > self.room:
            raise OSError(self.errno, os.strerror(self.errno))  # as f.write raises it: no file name
        self.room -= len(b)
        return self.f.write(b)


def _disk_fills(monkeypatch, room: int, errno_: int = 28, suffix: str = ".bin") -> None:
    """Make the cache writer's files named ``*suffix`` fail after ``room`` bytes."""
    real = data.atomic_open

    @contextlib.contextmanager
    def atomic_open(path):
        with real(path) as f:
            yield _FullDisk(f, room, errno_) if str(path).endswith(suffix) else f

    monkeypatch.setattr(data, "atomic_open", atomic_open)


@pytest.mark.parametrize("suffix", [".bin", ".json"])
def test_a_full_disk_while_tokenizing_is_one_line_naming_the_folder(tmp_path, cache, monkeypatch, capsys, suffix):
    monkeypatch.setattr(data, "BATCH_PIECES", 2)
    _disk_fills(monkeypatch, room=100, suffix=suffix)
    with pytest.raises(DataError) as e:
        load_token_splits("stories", ByteTokenizer(), max_docs=20, cache_dir=cache)
    message = str(e.value)
    assert message.startswith(f"cannot write the token cache in {cache}: the disk is full — nothing was cached")
    assert "--cache-dir" in message and "MINIGPT_CACHE" in message and "\n" not in message
    assert leftovers(cache) == [] and not any(n.endswith(".bin.json") for n in os.listdir(cache))
    assert data.main(["stories", "--max-docs", "20", "--tokenizer", "bytes", "--cache-dir", cache]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {message}"
    monkeypatch.undo()  # space again: the next run tokenizes from the start and succeeds
    _, _, info = load_token_splits("stories", ByteTokenizer(), max_docs=20, cache_dir=cache)
    assert info["cached"] is False and info["n_docs"] == 20


def test_a_file_size_limit_while_tokenizing_is_one_line(tmp_path, cache):
    """A real RLIMIT_FSIZE (Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing it)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-m", "minigpt.data", "stories", "--max-docs", "200", "--tokenizer",
                             "bytes", "--cache-dir", cache], cwd=ROOT, env=env, preexec_fn=limit,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot write the token cache in {cache}: a file-size limit was reached (see `ulimit -f`)")
    assert leftovers(cache) == [] and cache_files(cache) == []


def test_an_unreadable_source_file_is_not_blamed_on_the_cache(tmp_path, cache, monkeypatch):
    write(tmp_path / "a.txt", "text")

    def failing(paths):
        yield "half a document", False
        raise OSError(5, "Input/output error", paths[0])

    monkeypatch.setattr(data, "_file_pieces", failing)
    with pytest.raises(DataError, match=r"cannot read the data .*a\.txt.*: Input/output error") as e:
        load_token_splits(str(tmp_path / "a.txt"), ByteTokenizer(), cache_dir=cache)
    assert "token cache" not in str(e.value) and cache_files(cache) == []


def _start_slow_tokenizing(tmp_path, cache, n_docs: int) -> tuple[subprocess.Popen, str]:
    root = tmp_path / "docs"
    for i in range(n_docs):
        write(root / f"{i:02d}.txt", f"document {i} " * 5)
    script = SLOW_TOKENIZING.format(root=str(ROOT), corpus=str(root), cache=cache)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "tokenizing"  # it holds the entry's lock now
    return proc, str(root)


def test_a_second_process_waits_for_the_first_then_reads_its_cache(tmp_path, cache, caplog):
    proc, corpus = _start_slow_tokenizing(tmp_path, cache, n_docs=4)
    with caplog.at_level(logging.WARNING):
        train, val, info = load_token_splits(corpus, Spy(refuse=True), cache_dir=cache)  # waits, never tokenizes
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert info["cached"] is True and info["n_docs"] == 4
    assert f"waiting for process {proc.pid}, which is tokenizing the same data into {cache}" in caplog.text


def test_a_waiting_process_tokenizes_itself_when_the_first_one_is_killed(tmp_path, cache):
    import threading

    proc, corpus = _start_slow_tokenizing(tmp_path, cache, n_docs=30)
    spy, result = Spy(), {}
    waiter = threading.Thread(target=lambda: result.update(
        info=load_token_splits(corpus, spy, cache_dir=cache)[2]))
    waiter.start()
    time.sleep(0.5)
    assert spy.calls == 0  # still waiting
    proc.kill()  # kill -9: the kernel drops its lock
    proc.communicate(timeout=60)
    waiter.join(timeout=60)
    assert not waiter.is_alive() and spy.calls > 0 and result["info"]["n_docs"] == 30
