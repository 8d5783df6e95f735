"""Windows of a token array and the loaders that batch them: what a training step reads.

Window ``i`` (the original notebook's ``GPTDatasetV1``) is ``tokens[i*stride : i*stride + max_length]``, and its
target is the same window shifted by one token. ``make_loader`` batches them for evaluation and for
``create_dataloader`` (the original notebook's ``create_dataloader_v1``); ``WindowSampler`` picks the training
windows of one rank, epoch by epoch, so that several processes (minigpt/distributed.py) each read their own slice
of every global batch and a resumed run continues where it stopped. ``training_loaders`` puts these together for a
training run.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data_sources import DataError
from .tokenizer import EOT_TEXT, get_tokenizer

__all__ = ["TokenWindows", "TrainingLoaders", "WindowSampler", "create_dataloader", "create_dataloader_v1",
           "document_ids", "make_loader", "training_loaders"]


class TokenWindows(Dataset):
    """Sliding windows over a 1-D token array, as the original notebook's ``GPTDatasetV1``.

    Item ``i`` is ``(input, target)``: ``input = tokens[i*stride : i*stride + max_length]`` and ``target`` the
    same window shifted one token to the right, both LongTensors of shape (max_length,). The windows start at
    ``range(0, len(tokens) - max_length, stride)``, exactly the original notebook's loop. Ids are converted from the
    cache's uint16 per item, so a memory-mapped corpus is never copied whole.
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


def document_ids(idx: torch.Tensor, eot_token: int) -> torch.Tensor:
    """The document of each position of windows ``idx`` (B, T) of token ids -> (B, T) int64, numbered 0, 1, 2, ...
    from each window's start: what ``causal_attention(..., doc_ids=)`` reads to keep attention inside a document.

    The token cache writes the end-of-text id between documents, and here it OPENS the document that follows, as a
    beginning-of-sequence token would: ``ids[b, t]`` counts the end-of-text tokens in ``idx[b, :t + 1]``, less the
    count at the window's first position. Counting makes the ids non-decreasing along each row by construction.

        idx   the cat <eot> a dog <eot> <eot> hi
        ids    0   0    1   1  1    2     3    3

    Why the end-of-text opens a document rather than closes one: no prediction then reads across a boundary — a
    document's last token predicts the end-of-text from its own document, and the end-of-text predicts the next
    document's first token from nothing but itself — and every document starts as generation does, from the
    end-of-text token that an empty prompt is. A window that starts inside a document starts with it (id 0).

    Why here and from the window itself, not emitted by the loaders: the window holds every end-of-text token its
    documents need, so the ids are a cumulative sum over it, computed on the device where the batch already is.
    Every data path (a file, a folder, generated stories, a Hugging Face dataset) reaches the model as the same
    (input, target) windows, and none of them, nor the sampler's resume position, has to carry a second tensor.
    """
    count = (idx == eot_token).to(torch.int64).cumsum(dim=-1)  # end-of-text tokens up to and including t
    return count - count[..., :1]


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
    """The original notebook's ``create_dataloader_v1``: windows over one text, for readers coming from it.

    As the original notebook (which encoded with ``allowed_special={"<|endoftext|>"}``), "<|endoftext|>" in ``txt``
    becomes the end-of-text id. ``tokenizer`` defaults to ``get_tokenizer("auto")``; shuffling is seeded (seed 0).
    """
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer("auto")
    ids: list[int] = []
    for k, part in enumerate(txt.split(EOT_TEXT)):
        if k:
            ids.append(tokenizer.eot_token)
        ids.extend(tokenizer.encode(part))
    return make_loader(np.asarray(ids, dtype=np.int64), batch_size, max_length, stride, shuffle, drop_last,
                       num_workers=num_workers)


create_dataloader_v1 = create_dataloader  # the original notebook's name


class WindowSampler(Sampler[int]):
    """Indices of training windows for one rank, epoch by epoch, resumable mid-epoch.

    The epoch's order is a permutation seeded by (seed, epoch), the same on every rank. It is cut into global
    batches of ``batch_size * world_size`` windows; rank r takes the r-th slice of ``batch_size`` from each.
    With gradient accumulation (``accum`` micro-batches per optimizer step) an epoch keeps only whole steps.
    ``set_epoch(epoch, start)`` skips the first ``start`` windows of the epoch's order (already trained on), which
    is how a resumed run continues with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, num_windows: int, batch_size: int, world_size: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, accum: int = 1):
        self.num_windows, self.batch_size, self.accum = num_windows, batch_size, accum
        self.world_size, self.rank = world_size, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> torch.Tensor:
        if self.shuffle:
            # modulo 2**64, the range of a generator's seed (a no-op for every seed below 1.8e14)
            g = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**64)
            order = torch.randperm(self.num_windows, generator=g)
        else:
            order = torch.arange(self.num_windows)
        return order[self.start:]

    def __iter__(self):
        order = self._order()
        g = self.batch_size * self.world_size
        # drop_last: only whole optimizer steps (accum global batches); else every window once
        n_global = len(order) // (g * self.accum) * self.accum if self.drop_last else -(-len(order) // g)
        for i in range(n_global):
            chunk = order[i * g:(i + 1) * g]
            yield from chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        remaining = max(self.num_windows - self.start, 0)
        g = self.batch_size * self.world_size
        if self.drop_last:
            return remaining // (g * self.accum) * self.accum * self.batch_size
        full, rest = divmod(remaining, g)
        return full * self.batch_size + min(max(rest - self.rank * self.batch_size, 0), self.batch_size)


@dataclass
class TrainingLoaders:
    """What a training run reads, and the sizes its schedule is counted in."""

    train: DataLoader  # this rank's micro-batches, in the sampler's order
    sampler: WindowSampler  # set_epoch(epoch, windows done) before each epoch: how a resumed run continues
    train_eval: DataLoader  # fixed training batches for the train-loss estimate, shared across ranks
    val: DataLoader
    steps_per_epoch: int  # whole optimizer steps in one pass over the training windows
    tokens_per_step: int  # over every rank and micro-batch


def training_loaders(train_tokens, val_tokens, context_length: int, batch_size: int, grad_accum: int,
                     eval_iters: int, world_size: int = 1, rank: int = 0, seed: int = 0) -> TrainingLoaders:
    """The loaders of a training run: non-overlapping windows (stride = context_length, as the original notebook's
    loaders), ``batch_size`` per micro-batch and rank. Raises DataError, saying which flag to change, when the training
    split does not fill one optimizer step or the validation split one window."""
    train_windows = TokenWindows(train_tokens, context_length, context_length)
    val_windows = TokenWindows(val_tokens, context_length, context_length)
    global_batch = batch_size * world_size * grad_accum
    if len(train_windows) < global_batch:
        need = (global_batch - 1) * context_length + context_length + 1
        raise DataError(
            f"the training split has {len(train_tokens):,} tokens: {len(train_windows)} windows of "
            f"{context_length}, but one step needs {global_batch} ({need:,} tokens) — use more data (--max-docs), "
            "a smaller --context-length or a smaller --batch-size / --grad-accum")
    if len(val_windows) < 1:
        raise DataError(
            f"the validation split has {len(val_tokens):,} tokens, fewer than the {context_length + 1} one window "
            f"of context {context_length} needs — use more data (--max-docs) or a smaller --context-length")
    sampler = WindowSampler(len(train_windows), batch_size, world_size, rank, shuffle=True, seed=seed,
                            drop_last=True, accum=grad_accum)

    # Each DataLoader draws a seed when it is iterated; a private generator keeps that draw out of the global
    # random stream, so dropout masks do not depend on how often loaders were started (exact resume).
    def loader(dataset, **kw):
        return DataLoader(dataset, batch_size=batch_size, generator=torch.Generator(), **kw)

    # Evaluation reads fixed batches (the same ones every time, so the curve is smooth), shared across ranks.
    eval_n = min(len(train_windows), eval_iters * batch_size * world_size)
    return TrainingLoaders(train=loader(train_windows, sampler=sampler), sampler=sampler,
                           train_eval=loader(torch.utils.data.Subset(train_windows, range(eval_n))),
                           val=loader(val_windows), steps_per_epoch=len(train_windows) // global_batch,
                           tokens_per_step=global_batch * context_length)
