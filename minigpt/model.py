"""The GPT: token + position embeddings -> n pre-LayerNorm transformer blocks -> final LayerNorm -> output head.

The architecture and every parameter name are the seed notebook's (GPT-2's design as taught in LLMs-from-scratch),
so a ``model.pth`` saved there loads here verbatim. What is new: the three ops a GPT needs besides matmuls —
LayerNorm, GELU and causal attention — are not hard-wired. The model asks an ops backend for them
(``kernels.get_backend``): plain PyTorch, or our Triton kernels. The model never knows which one it got.

Shapes: B = batch, T = tokens, C = emb_dim, H = n_heads, D = head_dim = C / H, V = vocab_size.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

import kernels

from .config import GPTConfig


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with the seed's parameter names (``scale``, ``shift``) and eps."""

    def __init__(self, emb_dim: int, ops, eps: float = 1e-5):  # 1e-5: GPT-2's and the seed's epsilon
        super().__init__()
        self.ops = ops
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.scale, self.shift, self.eps)


class FeedForward(nn.Module):
    """Linear(C -> 4C) -> GELU (tanh form, as GPT-2) -> Linear(4C -> C). ``layers`` keeps the seed's key names."""

    def __init__(self, cfg: GPTConfig, ops):
        super().__init__()
        self.ops = ops
        self.layers = nn.ModuleList([
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),  # layers.0
            nn.Identity(),  # layers.1: the seed's GELU module sat here; we call the backend's gelu instead
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),  # layers.2
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers[0](x)  # (B, T, 4C)
        x = self.ops.gelu(x, approximate="tanh")
        return self.layers[2](x)  # (B, T, C)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention; the attention itself (softmax(QK^T/sqrt(D)) V with dropout on the
    weights) is the backend's ``causal_attention``, which never materializes the (T, T) matrix on the fast paths."""

    def __init__(self, cfg: GPTConfig, ops):
        super().__init__()
        self.ops = ops
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        self.dropout_p = cfg.drop_rate
        self.W_query = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        # The seed registers a (context_length x context_length) causal-mask buffer here. We do not allocate it
        # (the kernels mask by position), and a seed checkpoint's copy is dropped on load (_load_from_state_dict).

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, d_out = x.shape  # (B, T, C)
        # (B, T, C) -> (B, T, H, D) -> (B, H, T, D)
        queries = self.W_query(x).view(b, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)

        dropout_p = self.dropout_p if self.training else 0.0
        context_vec = self.ops.causal_attention(queries, keys, values, dropout_p=dropout_p)  # (B, H, T, D)

        # (B, H, T, D) -> (B, T, H, D) -> (B, T, C)
        context_vec = context_vec.transpose(1, 2).reshape(b, num_tokens, d_out)
        return self.out_proj(context_vec)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "mask", None)  # the seed's causal-mask buffer: accepted and ignored
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(attn(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, cfg: GPTConfig, ops):
        super().__init__()
        self.att = MultiHeadAttention(cfg, ops)
        self.ff = FeedForward(cfg, ops)
        self.norm1 = LayerNorm(cfg.emb_dim, ops)
        self.norm2 = LayerNorm(cfg.emb_dim, ops)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        x = self.att(x)
        x = self.drop_shortcut(x)
        x = x + shortcut

        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_shortcut(x)
        x = x + shortcut
        return x  # (B, T, C)


class GPTModel(nn.Module):
    """GPT-2-style language model.

    ``cfg``: a GPTConfig or the seed's plain dict. ``kernels``: "auto" (Triton kernels for CUDA tensors when Triton
    is installed, PyTorch otherwise), "torch", "triton", or a backend object.
    """

    def __init__(self, cfg: GPTConfig | dict, kernels: str | object = "auto"):
        super().__init__()
        cfg = GPTConfig.from_any(cfg)
        self.cfg = cfg
        ops = _resolve_backend(kernels)
        self.ops = ops
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg, ops) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim, ops)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("att.out_proj.weight", "ff.layers.2.weight")):
                # GPT-2: each residual branch adds to the same stream, so scale its last projection by
                # 1/sqrt(2 * n_layers) to keep the stream's variance from growing with depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases (LayerNorm keeps scale 1, shift 0).

        The seed notebook kept PyTorch's defaults (N(0, 1) embeddings, uniform Linear weights); GPT-2's start
        trains noticeably faster. Loading a checkpoint overwrites all of it anyway.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def kernels(self) -> str:
        """Name of the ops backend in use."""
        return self.ops.name

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        """in_idx: LongTensor (B, T) of token ids, T <= context_length -> logits (B, T, V)."""
        batch_size, seq_len = in_idx.shape
        if seq_len > self.cfg.context_length:
            raise ValueError(
                f"sequence of {seq_len} tokens is longer than context_length {self.cfg.context_length} — "
                "crop the input to the last context_length tokens"
            )
        tok_embeds = self.tok_emb(in_idx)  # (B, T, C)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))  # (T, C)
        x = tok_embeds + pos_embeds
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        logits = self.out_head(x)  # (B, T, V)
        return logits

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (optionally without the position embedding, as GPT-2's papers count)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls of forward+backward, plus the causal attention term
        (6 * n_layers * T * C: QK^T and PV, forward and backward, halved for causality)."""
        T = seq_len or self.cfg.context_length
        n = self.num_params(non_embedding=True) - self.tok_emb.weight.numel()  # lookups do no FLOPs
        return 6 * n + 6 * self.cfg.n_layers * T * self.cfg.emb_dim


def _resolve_backend(kernels_arg):
    if isinstance(kernels_arg, str):
        return kernels.get_backend(kernels_arg)
    for op in ("layer_norm", "gelu", "causal_attention"):
        if not callable(getattr(kernels_arg, op, None)):
            raise TypeError(f"kernels backend object is missing the method {op}() — see kernels/__init__.py")
    return kernels_arg


def seed_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The state dict as the seed notebook's model has it, including each block's causal-mask buffer, so a
    ``model.pth`` written from this loads in the notebook with ``load_state_dict`` (strict) too."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    T = model.cfg.context_length
    mask = torch.triu(torch.ones(T, T), diagonal=1)
    out = {}
    for k, v in sd.items():
        out[k] = v
        if k.endswith(".att.out_proj.bias"):
            out[k[: -len("out_proj.bias")] + "mask"] = mask
    return out

