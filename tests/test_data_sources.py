"""Data sources, offline: .txt files, folders and globs, the generated stories, hf: datasets and TinyStories'
fallback."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from minigpt import data_sources, token_cache
from minigpt.data import DataError, load_token_splits
from minigpt.stories import generate_stories
from minigpt.tokenizer import ByteTokenizer
from tests.data_helpers import EOT, Spy, both, cache, cache_files, enc, small_bpe, write


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
    monkeypatch.setattr(data_sources, "CHUNK_CHARS", 200)
    monkeypatch.setattr(token_cache, "BATCH_PIECES", 3)
    pieces = list(data_sources._file_pieces([str(f)]))
    assert len(pieces) > 10 and "".join(p for p, _ in pieces) == text
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    train, val, _ = load_token_splits(str(f), bpe, cache_dir=cache)
    assert both(train, val) == bpe.encode(text) + [bpe.eot_token]  # the cuts changed no token


def test_file_without_spaces_is_still_cut(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(data_sources, "CHUNK_CHARS", 64)
    text = "abcdefghij" * 200
    f = write(tmp_path / "long.txt", text)
    assert len(list(data_sources._file_pieces([str(f)]))) > 2
    train, val, _ = load_token_splits(str(f), ByteTokenizer(), cache_dir=cache)
    assert both(train, val) == enc(text) + [EOT]


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


def test_an_unreadable_source_file_is_not_blamed_on_the_cache(tmp_path, cache, monkeypatch):
    write(tmp_path / "a.txt", "text")

    def failing(paths):
        yield "half a document", False
        raise OSError(5, "Input/output error", paths[0])

    monkeypatch.setattr(data_sources, "_file_pieces", failing)
    with pytest.raises(DataError, match=r"cannot read the data .*a\.txt.*: Input/output error") as e:
        load_token_splits(str(tmp_path / "a.txt"), ByteTokenizer(), cache_dir=cache)
    assert "token cache" not in str(e.value) and cache_files(cache) == []


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
    monkeypatch.setattr(data_sources, "can_reach", lambda url, timeout=None: True)
    calls = record_load_dataset(monkeypatch, redirect=hf_folder)
    _, val, info = load_token_splits("tinystories", ByteTokenizer(), max_docs=20, cache_dir=cache)
    assert calls[0][0] == "roneneldan/TinyStories" and calls[0][2]["streaming"] is True
    assert info["source"] == "tinystories" and (info["train_docs"], info["val_docs"]) == (20, 2)
    assert val.tolist() == enc("held-out story 0.") + [EOT] + enc("held-out story 1.") + [EOT]


def test_tinystories_falls_back_to_stories_when_the_hub_fails(cache, monkeypatch, caplog):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(data_sources, "can_reach", lambda url, timeout=None: True)

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
    monkeypatch.setattr(data_sources, "can_reach", lambda url, timeout=None: False)
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
