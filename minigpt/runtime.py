"""The machine a run is on: which device, which precision, what the hardware can do, and its random state."""
from __future__ import annotations

import os
import random

import torch

from .config import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# Dense bf16 tensor-core peaks from the vendors' data sheets, for the MFU shown while training. (The benchmarks
# measure the real ceiling instead; this is only a label.)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                   "4090": 165e12, "3090": 71e12}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} — use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is visible — use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("--dtype fp16 needs a CUDA GPU (a CPU computes fp16 slowly and without loss scaling) — "
                          "use --dtype bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support — use --dtype fp16")
    return DTYPES[name]


def cpu_threads(ranks_here: int) -> int:
    """torch's threads for a run on the CPU, set now and returned: as OMP_NUM_THREADS says when it is set (by the
    user, or by torchrun, which sets 1 for several processes); else torch's default, one per physical core, shared
    out between the ``ranks_here`` processes on this machine, so that they never run ranks x cores threads between
    them (each would otherwise take one per core, and they would wait for each other's)."""
    if not os.environ.get("OMP_NUM_THREADS") and ranks_here > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // ranks_here))
    return torch.get_num_threads()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; staying below 2**63 leaves room for the per-rank offset


def check_seed(seed: int) -> None:
    """A ``--seed`` every generator of a run accepts, or a ConfigError saying the range."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and 2**63 - 1 ({MAX_SEED}), got {seed}")


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
