"""minigpt: a GPT from scratch in PyTorch, with our own Triton kernels behind a pluggable kernels backend.

    from minigpt import GPTModel, GPTConfig
    model = GPTModel(GPTConfig(), kernels="auto")   # or GPTModel(GPT_CONFIG_124M) with the original notebook's dict

Heavy or optional packages (datasets, tiktoken, matplotlib, triton) are imported where they are used.
"""
import kernels as _kernels

if not callable(getattr(_kernels, "get_backend", None)):  # found a `kernels` package, and it is not ours
    raise ImportError(
        f"the package `kernels` at {getattr(_kernels, '__file__', None) or _kernels.__path__} is not minigpt's own "
        "(Hugging Face's `kernels`, which transformers >= 5.25 installs, has the same name) — `pip uninstall "
        "kernels` and `pip install \"transformers<5.25\"`, or give minigpt a virtual environment of its own")

from .config import (
           GPT_CONFIG_124M,
           GPT_CONFIG_LARGE,
           GPT_CONFIG_SMALL,
           PRESETS,
           GPTConfig,
           get_preset,
)
from kernels.errors import MinigptError

from .model import GPTModel, KVCache

__version__ = "0.1.0"
__all__ = ["GPTModel", "KVCache", "GPTConfig", "PRESETS", "get_preset", "GPT_CONFIG_124M", "GPT_CONFIG_SMALL",
           "GPT_CONFIG_LARGE", "MinigptError", "__version__"]
