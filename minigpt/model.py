"""The GPT: token + position embeddings -> n pre-LayerNorm transformer blocks -> final LayerNorm -> output head.

The architecture and every parameter name are the original notebook's (GPT-2's design as taught in LLMs-from-scratch),
so a ``model.pth`` saved there loads here verbatim. What is new: the four ops a GPT needs besides its other
matmuls — LayerNorm, GELU, causal attention and the loss — are not hard-wired. The model asks a kernels backend for
them (``kernels.get_backend``): plain PyTorch, or our Triton kernels. The model never knows which one it got.

Training asks the model for its loss, ``model(idx, targets=targets)``, not for logits: the backend's
``linear_cross_entropy`` fuses the output head with the cross-entropy and never holds the (B*T, V) logits, which
at GPT-2's vocabulary are the largest activation of the whole model.

Generation reuses work through a KV cache (``KVCache`` below): the keys and values of the tokens already seen are
kept, so each new token runs the model over ONE position instead of the whole context. The caller says at which
position new tokens go (``input_pos``); the cache writes there and nothing advances behind the caller's back.
minigpt/generate.py's ``prefill`` and ``decode_one`` are the two steps that use it.

Packed documents: a training window holds the end of one document and the start of the next. ``doc_ids`` (one
document number per position, minigpt.token_windows.document_ids) keeps each query's attention inside its own
document (``--doc-mask``); without it, attention crosses document boundaries, as in the original notebook.

Shapes: B = batch, T = tokens, C = emb_dim, H = n_heads, D = head_dim = C / H, V = vocab_size.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

import kernels
from kernels.definitions import EPS

from .config import GPTConfig


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with the original notebook's parameter names (``scale``, ``shift``) and eps."""

    def __init__(self, emb_dim: int, backend, eps: float = EPS):  # GPT-2's and the original notebook's epsilon, 1e-5
        super().__init__()
        self.backend = backend
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.layer_norm(x, self.scale, self.shift, self.eps)


class FeedForward(nn.Module):
    """Linear(C -> 4C) -> GELU (tanh form, as GPT-2) -> Linear(4C -> C). ``layers`` keeps the original notebook's key
    names."""

    def __init__(self, cfg: GPTConfig, backend):
        super().__init__()
        self.backend = backend
        self.layers = nn.ModuleList([
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),  # layers.0
            nn.Identity(),  # layers.1: the original notebook's GELU module sat here; we call the backend's gelu instead
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),  # layers.2
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers[0](x)  # (B, T, 4C)
        x = self.backend.gelu(x, approximate="tanh")
        return self.layers[2](x)  # (B, T, C)


class KVCache:
    """The keys and values of the tokens a model has already seen, one pair of buffers per layer.

    Why: a token's key and value in layer l depend only on that token and the ones before it (causality), so when
    generation appends a token, every earlier key and value stays what it was. Keeping them turns each step from
    a forward over the whole context (T positions) into a forward over the one new position, whose query attends
    to the cached keys: attention with fewer queries than keys, which both kernels backends support.

    The buffers are allocated once, (B, H, max_len, D) per layer, and filled in place as tokens arrive — no
    growing ``torch.cat``, which would copy the whole cache at every step. The cache never chooses a position:
    every call says where its tokens go (``input_pos``), as gpt-fast's ``KVCache.update(input_pos, k, v)`` does.

        cache = KVCache(model.cfg, batch_size=1)
        logits = model(prompt_ids, kv_cache=cache, input_pos=0)   # prefill: positions 0 .. T - 1
        logits = model(next_id, kv_cache=cache, input_pos=T)      # one decode step: position T
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int | None = None):
        self.shape = (batch_size, cfg.n_heads, max_len or cfg.context_length, cfg.emb_dim // cfg.n_heads)
        self.keys: list[torch.Tensor | None] = [None] * cfg.n_layers  # (B, H, max_len, D) each, once allocated
        self.values: list[torch.Tensor | None] = [None] * cfg.n_layers
        # Per layer, how many positions hold keys and values written since the last write at an earlier position.
        # Not a cursor (the caller gives every position): it only lets update() refuse a write that would leave
        # unwritten positions for a query to attend to.
        self.filled = [0] * cfg.n_layers

    @property
    def max_len(self) -> int:
        return self.shape[2]

    def update(self, layer: int, input_pos: int, new_keys: torch.Tensor, new_values: torch.Tensor):
        """Write the new tokens' keys and values (B, H, T_new, D) of ``layer`` at positions input_pos ..
        input_pos + T_new - 1; return the keys and values of positions 0 .. input_pos + T_new - 1, views
        (B, H, input_pos + T_new, D) of the buffers. Positions after those are forgotten: writing at 0 starts over."""
        end = input_pos + new_keys.shape[2]
        if input_pos < 0 or input_pos > self.filled[layer]:
            raise ValueError(f"input_pos {input_pos} is not a position the KV cache can write at: positions 0 .. "
                             f"{self.filled[layer] - 1} are filled — pass the number of tokens already in it "
                             "(0 to prefill)")
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions: {new_keys.shape[2]} new at position "
                             f"{input_pos} do not fit — prefill the last {self.max_len} tokens again at position 0")
        if self.keys[layer] is None or self.keys[layer].dtype != new_keys.dtype:
            # allocated at the first update, in the dtype the layer produces (the model's, or autocast's)
            self.keys[layer] = new_keys.new_zeros(self.shape)
            self.values[layer] = new_values.new_zeros(self.shape)
        self.keys[layer][:, :, input_pos:end] = new_keys
        self.values[layer][:, :, input_pos:end] = new_values
        self.filled[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention; the attention itself (softmax(QK^T/sqrt(D)) V with dropout on the
    weights) is the backend's ``causal_attention``, which never materializes the (T, T) matrix on the fast paths."""

    def __init__(self, cfg: GPTConfig, backend, layer: int = 0):
        super().__init__()
        self.backend = backend
        self.layer = layer  # which of the KV cache's layers is ours
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        self.dropout_p = cfg.drop_rate
        self.W_query = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        # The original notebook registers a (context_length x context_length) causal-mask buffer here. We do not
        # allocate it (the kernels mask by position), and the copy in its checkpoints is dropped on load
        # (_load_from_state_dict).

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, input_pos: int = 0,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, num_tokens, d_out = x.shape  # (B, T, C)
        # (B, T, C) -> (B, T, H, D) -> (B, H, T, D)
        queries = self.W_query(x).view(b, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            # the new tokens' keys and values join the cached ones: (B, H, input_pos + T, D). The T queries are
            # the last T positions of those, which is how causal_attention aligns them (bottom-right).
            keys, values = kv_cache.update(self.layer, input_pos, keys, values)

        dropout_p = self.dropout_p if self.training else 0.0
        if doc_ids is None:
            context_vec = self.backend.causal_attention(queries, keys, values, dropout_p=dropout_p)  # (B, H, T, D)
        else:  # (B, T) document ids: a query also does not see the keys of another document
            context_vec = self.backend.causal_attention(queries, keys, values, dropout_p=dropout_p, doc_ids=doc_ids)

        # (B, H, T, D) -> (B, T, H, D) -> (B, T, C)
        context_vec = context_vec.transpose(1, 2).reshape(b, num_tokens, d_out)
        return self.out_proj(context_vec)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "mask", None)  # the original notebook's causal-mask buffer: accepted and ignored
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(attn(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, cfg: GPTConfig, backend, layer: int = 0):
        super().__init__()
        self.att = MultiHeadAttention(cfg, backend, layer)
        self.ff = FeedForward(cfg, backend)
        self.norm1 = LayerNorm(cfg.emb_dim, backend)
        self.norm2 = LayerNorm(cfg.emb_dim, backend)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, input_pos: int = 0,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        x = self.att(x, kv_cache, input_pos, doc_ids)
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

    ``cfg``: a GPTConfig or the original notebook's plain dict. ``kernels``: "auto" (Triton kernels for CUDA tensors
    when Triton is installed, PyTorch otherwise), "torch", "triton", or a backend object.
    """

    def __init__(self, cfg: GPTConfig | dict, kernels: str | object = "auto"):
        super().__init__()
        cfg = GPTConfig.from_any(cfg)
        self.cfg = cfg
        backend = _resolve_backend(kernels)
        self.backend = backend
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg, backend, layer) for layer in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim, backend)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(input_major(module.weight.detach()))
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("att.out_proj.weight", "ff.layers.2.weight")):
                # GPT-2: each residual branch adds to the same stream, so scale its last projection by
                # 1/sqrt(2 * n_layers) to keep the stream's variance from growing with depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases (LayerNorm keeps scale 1, shift 0).

        The original notebook kept PyTorch's defaults (N(0, 1) embeddings, uniform Linear weights); GPT-2's start
        trains noticeably faster. Loading a checkpoint overwrites all of it anyway.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def kernels(self) -> str:
        """Name of the kernels backend in use (what ``kernels=`` chose); the object itself is ``self.backend``."""
        return self.backend.name

    def forward(
        self,
        in_idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        last_only: bool = False,
        input_pos: int | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """in_idx: LongTensor (B, T) of token ids. Four calls, three paths below (prefill and decode share one):

            model(idx, targets=targets)                   training: the mean cross-entropy, a scalar
            model(idx)                                    logits (B, T, V) of positions 0 .. T - 1
            model(idx, kv_cache=cache, input_pos=0)       prefill: the prompt's keys and values go into the cache
            model(token, kv_cache=cache, input_pos=pos)   decode: one token at position ``pos``, its query
                                                          attending to the cached positions 0 .. pos

        ``targets``: LongTensor (B, T) of the next token at each position -> the mean cross-entropy, a float32
        scalar (float64 for a float64 model), from the backend's ``linear_cross_entropy``: the logits are never
        materialized. Positions whose target is -100 are left out of the mean (F.cross_entropy's ``ignore_index``).
        Not with ``kv_cache``: a loss is a training-time quantity, and a cache is for generation.

        ``kv_cache`` with ``input_pos``: the tokens are positions input_pos .. input_pos + T - 1; their keys and
        values are written there and their queries attend to everything before. The cache writes where it is told
        and never moves on by itself: the caller counts (minigpt/generate.py's ``prefill`` and ``decode_one``).
        Prefill and decode run the same code; they differ only in the position and the number of tokens.

        ``last_only``: logits of the last position only, (B, 1, V): all that sampling the next token reads.

        ``doc_ids``: (B, T) integers, non-decreasing along each row, the document of each position
        (minigpt.token_windows.document_ids): each position attends only to itself and the positions before it in
        its own document, in every layer. With the loss or the logits, not with ``kv_cache``: generation continues one
        text, and the cached keys would need ids of their own. None (the default) is the plain causal attention,
        the very calls the model makes without documents. The position embeddings stay those of the window
        (0 .. T - 1): a document's tokens keep the positions they have in it.
        """
        if doc_ids is not None:
            self._check_doc_ids(in_idx, doc_ids, kv_cache)
        if targets is not None:
            return self._training_loss(in_idx, targets, generation_args=kv_cache is not None or last_only,
                                       doc_ids=doc_ids)
        if kv_cache is not None:
            if input_pos is None or input_pos < 0:
                raise ValueError(f"model(idx, kv_cache=...) needs input_pos >= 0, the position of idx's first token "
                                 f"(got {input_pos}): the cache writes where it is told — 0 to prefill, the number "
                                 "of tokens already in it to decode")
            return self._cached_logits(in_idx, kv_cache, input_pos, last_only)
        if input_pos is not None:
            raise ValueError("input_pos says where a KV cache writes — pass kv_cache too, or leave input_pos out "
                             "(without a cache the tokens are positions 0 .. T - 1)")
        return self._logits(in_idx, last_only, doc_ids)

    @staticmethod
    def _check_doc_ids(in_idx: torch.Tensor, doc_ids: torch.Tensor, kv_cache: KVCache | None) -> None:
        """The model's part of the checks (the backend's check_doc_ids looks at the dtype, device and order)."""
        if kv_cache is not None:
            raise ValueError("doc_ids keeps attention inside each document of a training window — call the model "
                             "without kv_cache to use it; generation (with a cache) continues one text and takes "
                             "no doc_ids")
        if doc_ids.shape != in_idx.shape:
            raise ValueError(f"doc_ids must have in_idx's shape {tuple(in_idx.shape)} (one document id per position), "
                             f"got {tuple(doc_ids.shape)} — make it with minigpt.token_windows.document_ids(in_idx, "
                             "eot_token)")

    # The paths of forward. Each runs the same trunk (embeddings -> blocks -> final norm) and reads it its own way.

    def _training_loss(self, in_idx: torch.Tensor, targets: torch.Tensor, generation_args: bool,
                       doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Training: the mean cross-entropy over every position, the logits never materialized."""
        if generation_args:
            raise ValueError("model(idx, targets=...) computes the training loss over every position — call it "
                             "without kv_cache and last_only (those are for generation)")
        if targets.shape != in_idx.shape:
            raise ValueError(f"targets must have in_idx's shape {tuple(in_idx.shape)} (the next token at each "
                             f"position), got {tuple(targets.shape)}")
        x = self._trunk(in_idx, start=0, doc_ids=doc_ids)  # (B, T, C)
        # (B, T, C) -> (B*T, C): the head's matmul and the cross-entropy in one op, chunk by chunk
        return self._linear_cross_entropy(x.flatten(0, 1), self.out_head.weight, targets.flatten())

    def _logits(self, in_idx: torch.Tensor, last_only: bool, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """No cache: positions 0 .. T - 1 -> logits (B, T, V), or (B, 1, V) with ``last_only``."""
        x = self._trunk(in_idx, start=0, last_only=last_only, doc_ids=doc_ids)
        return self.out_head(x)

    def _cached_logits(self, in_idx: torch.Tensor, kv_cache: KVCache, input_pos: int, last_only: bool):
        """Prefill or decode: positions input_pos .. input_pos + T - 1, written into ``kv_cache`` -> logits."""
        x = self._trunk(in_idx, start=input_pos, kv_cache=kv_cache, last_only=last_only)
        return self.out_head(x)

    def _trunk(self, in_idx: torch.Tensor, start: int, kv_cache: KVCache | None = None,
               last_only: bool = False, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) at positions start .. start + T - 1 -> the final norm's output (B, T, C), or (B, 1, C)
        of the last position with ``last_only``; ``doc_ids`` (B, T): attention inside each document."""
        seq_len = in_idx.shape[1]
        if start + seq_len > self.cfg.context_length:
            cached = f" ({start} in the KV cache + {seq_len} new)" if start else ""
            raise ValueError(
                f"sequence of {start + seq_len} tokens{cached} is longer than context_length "
                f"{self.cfg.context_length} — crop the input to the last context_length tokens"
            )
        tok_embeds = self.tok_emb(in_idx)  # (B, T, C)
        pos_embeds = self.pos_emb(torch.arange(start, start + seq_len, device=in_idx.device))  # (T, C)
        x = tok_embeds + pos_embeds
        x = self.drop_emb(x)
        for block in self.trf_blocks:
            x = block(x, kv_cache, start, doc_ids)  # (B, T, C)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C): the norm and the head then run on one position
        return self.final_norm(x)

    def _linear_cross_entropy(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The backend's loss op, or the torch backend's when a user's backend object has only the other three."""
        op = getattr(self.backend, "linear_cross_entropy", None)
        if op is None:
            op = kernels.get_backend("torch").linear_cross_entropy
        return op(x, weight, targets)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding=True`` leaves out the position embedding (a convention from nanoGPT).

        Why "gpt2-124m" has 162.4M parameters here: GPT-2 ties its output head to the token embedding (one
        50,257 x 768 matrix, 38.6M, used twice) and counts it once, with a 1024-position embedding: 85.0M in the
        blocks + 38.6M + 0.8M = 124.4M. This model, like the original notebook's, has an untied head (its own 38.6M) and
        a 256-position embedding (0.2M): 85.0M + 2 x 38.6M + 0.2M = 162.4M. nanoGPT's non-embedding count drops
        only the position embedding because its tied matrix still does work as the head; with an untied head the
        token embedding is a lookup that does no FLOPs, which is why ``flops_per_token`` subtracts it too.
        """
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls of forward+backward, plus the causal attention term
        (6 * n_layers * T * C: QK^T and PV, forward and backward, halved for causality)."""
        T = seq_len or self.cfg.context_length
        n = self.num_params(non_embedding=True) - self.tok_emb.weight.numel()  # lookups do no FLOPs
        return 6 * n + 6 * self.cfg.n_layers * T * self.cfg.emb_dim

    @classmethod
    def from_pretrained(cls, name_or_path: str, kernels: str | object = "auto", **overrides) -> "GPTModel":
        """GPT-2's released weights in this model, in eval mode: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"
        (Hugging Face hub, or its cache offline) or a folder in Hugging Face's GPT-2 format. ``overrides``:
        ``drop_rate``, and ``context_length`` up to the weights' 1024. The conversion is minigpt/pretrained.py."""
        from .pretrained import from_pretrained

        return from_pretrained(name_or_path, kernels=kernels, **overrides)


def input_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in), the same values in the same shape, stored as the transpose of a contiguous (in, out)
    array (a no-op when it already is).

    Why: generating a token multiplies ONE row of activations by every weight matrix, a matrix-vector product that
    reads each weight once, and PyTorch's CPU kernels stream an (in, out) array faster than nn.Linear's own
    (out, in) one (the measurement: benchmarks/README.md, "Generation on the CPU"). A GPU's matmul reads either
    order through a transpose flag, without a copy. The state dict's entries keep their
    shapes, so checkpoints load both ways; only the bytes' order in memory differs.
    """
    return weight if weight.t().is_contiguous() else weight.t().contiguous().t()


def _resolve_backend(kernels_arg):
    """A backend by name, or a user's object checked for the ops. ``linear_cross_entropy`` may be left out — the
    model then computes its loss with the torch backend's — so a backend written for the first three ops keeps
    working; the other three are required (the model cannot run without them)."""
    if isinstance(kernels_arg, str):
        return kernels.get_backend(kernels_arg)
    for op in ("layer_norm", "gelu", "causal_attention"):
        if not callable(getattr(kernels_arg, op, None)):
            raise TypeError(f"kernels backend object is missing the method {op}() — see kernels/__init__.py")
    loss_op = getattr(kernels_arg, "linear_cross_entropy", None)
    if loss_op is not None and not callable(loss_op):
        raise TypeError("kernels backend object's linear_cross_entropy is not a method — define it as one, or leave "
                        "it out to use the torch backend's (see kernels/__init__.py)")
    return kernels_arg


def notebook_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The state dict as the original notebook's model has it, including each block's causal-mask buffer, so a
    ``model.pth`` written from this loads in the original notebook with ``load_state_dict`` (strict) too."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    T = model.cfg.context_length
    mask = torch.triu(torch.ones(T, T), diagonal=1)
    out = {}
    for k, v in sd.items():
        out[k] = v
        if k.endswith(".att.out_proj.bias"):
            out[k[: -len("out_proj.bias")] + "mask"] = mask
    return out

