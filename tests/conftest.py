import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which is chosen when a kernel is decorated, i.e.
# when kernels/*.py is first imported: set it before any test module can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

# The attention kernels' tile tuner (kernels/launch.py) picks tiles by timing them, so which tiles run would vary
# from run to run: tests use the default tiles, and test the tuner and every alternative explicitly.
os.environ.setdefault("MINIGPT_AUTOTUNE", "0")

# Keep every test offline and its files inside pytest's temporary folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Where the triton backend can take tensors in this process. CPU tensors only in Triton's interpreter, which is off
# where CUDA is available (the kernels are compiled for the GPU there, and kernels/launch.py refuses CPU tensors);
# CUDA tensors only with the compiled kernels. `TRITON_INTERPRET=1 pytest` on a GPU machine runs the CPU half.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not _INTERPRETING, reason="the triton backend takes CPU tensors only in Triton's interpreter, which is off "
                                  "where CUDA is available (set TRITON_INTERPRET=1 to run this)")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or _INTERPRETING, reason="needs a CUDA GPU (and compiled kernels)")),
]


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "token-cache"))
