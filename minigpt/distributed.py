"""Several processes, one model: DistributedDataParallel through ``torchrun`` (the data's sharding:
``WindowSampler`` in minigpt/token_windows.py).

    torchrun --nproc_per_node=4 -m minigpt.train --preset gpt2-124m

torchrun starts one process per GPU and sets RANK / LOCAL_RANK / WORLD_SIZE; with none of them set everything here
degrades to a single process. Each rank reads its own slice of every global batch, DDP averages the gradients, so
``N ranks x batch b`` trains exactly like ``1 rank x batch N*b``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_joined_a_group = False  # whether this process has been one of a multi-process run's workers (see end_process)


def init_distributed(device_arg: str) -> tuple[DistInfo, str]:
    """Join the process group when launched by torchrun; returns (info, device string for this rank)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo(), device_arg
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"]))
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
        device_arg = f"cuda:{info.local_rank}"
    elif device_arg == "auto":
        device_arg = "cpu"
    # torch's default timeout (minutes) is kept on purpose: the other ranks wait in a collective while rank 0
    # tokenizes a corpus, compiles, or writes a large checkpoint, each of which can take minutes. A rank that
    # stops at once does not make the others wait for it: see abandon_distributed().
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    global _joined_a_group
    _joined_a_group = True
    return info, device_arg


def was_a_worker() -> bool:
    """Whether this process joined a multi-process run's process group (destroyed since, or not)."""
    return _joined_a_group


def wait_for_all_ranks() -> None:
    """Wait for every rank at the end of a run. Without it a rank that finishes first can destroy the process group
    while another is still saving, and gloo may then abort the slower process (benchmarks/NOTES.md has the
    message and the torch version it was seen with)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_process(status: int) -> None:
    """End a command-line run with exit ``status`` (0: return, as a normal end).

    A process that was one of a multi-process run's workers ends here and now, without the interpreter's teardown:
    after its process group was destroyed, the teardown of torch's objects still raced with gloo's threads and, about
    once in a dozen stopped 2-process CPU runs on a loaded machine (torch 2.13), aborted the process with "terminate
    called without an active exception" — an exit status of SIGABRT for a run that had saved and left cleanly.
    Nothing is lost by skipping the teardown: every file was written and fsync'd, the progress bar and TensorBoard
    closed, and what is still buffered in stdout and stderr is flushed first."""
    if was_a_worker():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe has nothing left to say
                pass
        os._exit(status)
    if status:
        sys.exit(status)


def abandon_distributed() -> None:
    """Leave the process group now, for a rank that stops at once (in the middle of a step). It must not then wait
    in a collective (the final barrier) that the other ranks, still in their step, never reach. With gloo the
    others' next collective fails as soon as this process's connections close; with NCCL they fail at the group's
    timeout, unless the launcher stops them first (torchrun does when this process exits with an error status)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agreed_stop_signal(local_signal: int, info: DistInfo, device) -> int:
    """The largest signal number any rank has received (0: none), the same on every rank.

    Each rank gets its own signals, at its own moment (or alone: `kill` of one worker), so a rank that stopped on
    its own would leave the others waiting in the next gradient all-reduce while it saves. Calling this once per
    step on every rank makes stopping a decision they all take after the same step. The cost is one all-reduce of
    one int per step, on the device because NCCL only reduces device tensors (DDP's gradient all-reduce runs inside
    backward and cannot carry it), and one more wait for the GPU per step when reading it, beside the two a step
    already has (its loss and gradient norm). MAX: ranks that got different signals all exit with the same status.
    """
    if not info.enabled:
        return local_signal
    flag = torch.full((1,), local_signal, dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def all_reduce_mean(values: list[float], counts: list[float], info: DistInfo, device) -> list[float]:
    """sum(values) / sum(counts) over all ranks, element by element (for evaluation losses)."""
    t = torch.tensor(values + counts, dtype=torch.float64, device=device)
    if info.enabled:
        dist.all_reduce(t)
    n = len(values)
    return [(t[i] / t[n + i]).item() if t[n + i] > 0 else float("nan") for i in range(n)]


def all_ranks_ok(ok: bool, info: DistInfo, device) -> bool:
    """Whether ``ok`` holds on every rank (one all-reduce): a step that can fail on one rank (rank 0 opening
    --out-dir) tells every rank, so that none waits for a rank that gave up."""
    if not info.enabled:
        return ok
    failed = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    return failed.item() == 0
