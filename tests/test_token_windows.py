"""Windows and loaders: the original notebook's GPTDatasetV1 loop, seeded batches, and the sampler that shards training
windows across ranks."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from minigpt.data_sources import DataError
from minigpt.token_windows import TokenWindows, WindowSampler, create_dataloader, create_dataloader_v1, make_loader
from minigpt.tokenizer import ByteTokenizer
from tests.data_helpers import EOT, enc


def notebook_windows(token_ids, max_length, stride):
    """The original notebook's GPTDatasetV1 loop, written out."""
    inputs, targets = [], []
    for i in range(0, len(token_ids) - max_length, stride):
        inputs.append(token_ids[i:i + max_length])
        targets.append(token_ids[i + 1:i + max_length + 1])
    return inputs, targets


@pytest.mark.parametrize("n,max_length,stride", [(50, 8, 3), (50, 8, 8), (50, 4, 11), (9, 8, 1), (8, 8, 2),
                                                 (3, 8, 2)])
def test_windows_match_the_notebook_loop(tmp_path, n, max_length, stride):
    ids = np.random.default_rng(n + stride).integers(0, 50257, size=n).astype(np.uint16)
    path = tmp_path / "t.bin"
    ids.tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(n,))
    ds = TokenWindows(tokens, max_length, stride)
    inputs, targets = notebook_windows(ids.tolist(), max_length, stride)
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
    assert len(notebook_windows(list(range(needed)), max_length, stride)[0]) == batch_size  # the formula is right
    assert len(notebook_windows(list(range(needed - 1)), max_length, stride)[0]) == batch_size - 1
    make_loader(np.arange(needed), batch_size, max_length, stride, shuffle=False, drop_last=True)
    with pytest.raises(DataError) as err:
        make_loader(np.arange(needed - 1), batch_size, max_length, stride, shuffle=False, drop_last=True)
    msg = str(err.value)
    assert f"{needed - 1} tokens" in msg and f"need {needed}" in msg and "--context-length" in msg
    with pytest.raises(DataError, match=f"need {max_length + 1}"):
        make_loader(np.arange(max_length), batch_size, max_length, stride, shuffle=False, drop_last=False)


def test_create_dataloader_like_the_notebook():
    assert create_dataloader_v1 is create_dataloader
    txt = "One story.<|endoftext|>Another story, a bit longer than the first one."
    ids = enc("One story.") + [EOT] + enc("Another story, a bit longer than the first one.")
    loader = create_dataloader(txt, batch_size=2, max_length=6, stride=4, shuffle=False, tokenizer=ByteTokenizer())
    inputs, targets = notebook_windows(ids, 6, 4)
    got_x = [row for x, _ in loader for row in x.tolist()]
    got_y = [row for _, y in loader for row in y.tolist()]
    assert got_x == inputs[:len(inputs) // 2 * 2] and got_y == targets[:len(got_y)]
    assert EOT in [t for row in got_x for t in row]


def test_window_sampler_gives_each_rank_its_slice_of_every_global_batch():
    ranks = [WindowSampler(20, batch_size=3, world_size=2, rank=r, shuffle=False) for r in (0, 1)]
    assert list(ranks[0]) == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert list(ranks[1]) == [3, 4, 5, 9, 10, 11, 15, 16, 17]  # 18, 19: not a whole global batch
    assert [len(s) for s in ranks] == [9, 9]
    # Without drop_last every window is read once, the last global batch cut short.
    ranks = [WindowSampler(7, batch_size=2, world_size=2, rank=r, shuffle=False, drop_last=False) for r in (0, 1)]
    assert (list(ranks[0]), list(ranks[1])) == ([0, 1, 4, 5], [2, 3, 6])
    assert [len(s) for s in ranks] == [4, 3]


def test_window_sampler_is_seeded_per_epoch_and_resumes_mid_epoch():
    sampler = WindowSampler(20, batch_size=2, seed=7)
    sampler.set_epoch(3)
    whole = list(sampler)
    assert sorted(whole) == list(range(20)) and whole != list(range(20))
    assert list(sampler) == whole  # the same (seed, epoch), the same order
    sampler.set_epoch(4)
    assert list(sampler) != whole
    sampler.set_epoch(3, start=6)  # resumed after 6 windows: exactly the rest of the uninterrupted epoch
    assert list(sampler) == whole[6:] and len(sampler) == 14


def test_window_sampler_keeps_whole_optimizer_steps():
    sampler = WindowSampler(20, batch_size=2, accum=3, shuffle=False)  # a step is 3 batches of 2 windows
    assert list(sampler) == list(range(18)) and len(sampler) == 18
