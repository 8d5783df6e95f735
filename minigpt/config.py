"""Model configuration: the ``GPTConfig`` dataclass and the named presets.

The field names are the original notebook's dictionary keys, so ``GPTConfig(**GPT_CONFIG_124M)`` and
``GPTConfig.from_any(GPT_CONFIG_124M)`` both work, and ``asdict(cfg)`` gives the original notebook's dictionary back.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from kernels.errors import MinigptError


class ConfigError(MinigptError, ValueError):
    """A configuration that cannot build a model (the message says what to change)."""


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's BPE vocabulary; the training CLI sets it from the tokenizer
    context_length: int = 256  # longest sequence the position embedding covers
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1  # one rate for embeddings, attention weights and residual branches, as the original notebook
    qkv_bias: bool = False  # as the original notebook: no query/key/value biases (GPT-2's own weights have them)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ConfigError(
                f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}) — "
                f"e.g. --n-heads {_divisor_near(self.emb_dim, self.n_heads)}"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {self.drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict:
        """The original notebook's plain dictionary form."""
        return asdict(self)

    @classmethod
    def from_any(cls, cfg: "GPTConfig | dict") -> "GPTConfig":
        """Accept a GPTConfig or the original notebook's dict (unknown keys are an error that lists the known ones)."""
        if isinstance(cfg, GPTConfig):
            return cfg
        if isinstance(cfg, dict):
            known = {f.name for f in fields(cls)}
            unknown = set(cfg) - known
            if unknown:
                raise ConfigError(f"unknown config keys {sorted(unknown)} — known keys: {sorted(known)}")
            return cls(**cfg)
        raise ConfigError(f"expected a GPTConfig or a dict, got {type(cfg).__name__}")

    def with_overrides(self, **overrides) -> "GPTConfig":
        """A copy with the given fields changed (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - target))


# The original notebook's configurations, verbatim.
GPT_CONFIG_124M = dict(vocab_size=50257, context_length=256, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.1,
                       qkv_bias=False)
GPT_CONFIG_SMALL = dict(vocab_size=50257, context_length=128, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.1,
                        qkv_bias=False)
GPT_CONFIG_LARGE = dict(vocab_size=50257, context_length=512, emb_dim=1024, n_heads=16, n_layers=24, drop_rate=0.1,
                        qkv_bias=False)

PRESETS: dict[str, GPTConfig] = {
    "gpt2-124m": GPTConfig(**GPT_CONFIG_124M),
    "small": GPTConfig(**GPT_CONFIG_SMALL),
    "large": GPTConfig(**GPT_CONFIG_LARGE),
    # For CPU demos and tests: 4 layers of width 128 train a few hundred steps on 2 cores in minutes.
    "tiny": GPTConfig(vocab_size=50257, context_length=128, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.0,
                      qkv_bias=False),
    # GPT-2's four released sizes (its config.json files), whose weights GPTModel.from_pretrained loads. From
    # scratch they train like any preset; qkv_bias on, as GPT-2's c_attn has a bias.
    "gpt2": GPTConfig(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.1,
                      qkv_bias=True),
    "gpt2-medium": GPTConfig(vocab_size=50257, context_length=1024, emb_dim=1024, n_heads=16, n_layers=24,
                             drop_rate=0.1, qkv_bias=True),
    "gpt2-large": GPTConfig(vocab_size=50257, context_length=1024, emb_dim=1280, n_heads=20, n_layers=36,
                            drop_rate=0.1, qkv_bias=True),
    "gpt2-xl": GPTConfig(vocab_size=50257, context_length=1024, emb_dim=1600, n_heads=25, n_layers=48,
                         drop_rate=0.1, qkv_bias=True),
}


def get_preset(name: str) -> GPTConfig:
    """The preset called ``name`` (a ConfigError listing the choices otherwise)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} — choose one of: {', '.join(PRESETS)}") from None
