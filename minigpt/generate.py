"""Text generation: the sampling loop, and ``python -m minigpt.generate``.

    python -m minigpt.generate --checkpoint out/checkpoint.pt --prompt "Once upon a time"
    python -m minigpt.generate --checkpoint model.pth --preset gpt2-124m      # a seed notebook's model.pth
    python -m minigpt.generate --pretrained gpt2 --prompt "The meaning of life is"   # GPT-2's own weights
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from .checkpoint import (
    CheckpointError,
    is_minigpt_checkpoint,
    load_model_state,
    load_torch,
)
from .config import PRESETS, ConfigError, GPTConfig, get_preset
from .model import GPTModel, KVCache


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + new).

    temperature 0 picks the most likely token (greedy, the seed's ``generate_text_simple``); otherwise the logits
    are divided by the temperature, cut to the ``top_k`` most likely tokens and/or the smallest set whose
    probability reaches ``top_p`` (nucleus sampling), and a token is drawn. Stops early when every sequence has just
    produced ``eos_id``. The model sees at most the last ``context_size`` tokens. ``use_cache=False`` runs the
    whole window through the model for every token (the seed's loop); the cache gives the same tokens, faster
    (see ``generate_tokens``).
    """
    new = list(generate_tokens(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id,
                               generator, use_cache))
    return torch.cat([idx, *new], dim=1)


@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, top_p=None, eos_id=None,
                    generator=None, use_cache=True):
    """``generate``, one token at a time: yields each new (B, 1) column of ids as soon as it is chosen.

    With the cache (``model.KVCache``), the first step runs the prompt through the model (the prefill) and every
    later step runs only the newest token, whose query attends to the cached keys and values: a step costs one
    position's worth of matmuls (about 2 x parameters FLOPs per token) plus reading the cache, instead of a
    forward over the whole window.

    Past ``context_size`` tokens the window slides: the model has learned ABSOLUTE positions, so once the oldest
    token drops out every remaining token moves down one position and every cached key and value (computed at the
    old positions) is stale. The cache is then rebuilt from the last ``context_size`` tokens (a re-prefill),
    which is exactly what the uncached loop computes. So the cache saves the work of the first
    ``context_size - prompt length`` tokens; from then on each token costs a full-window forward, as without it.
    """
    # a model without our forward(..., kv_cache=) (the seed's own GPTModel, say) gets the uncached loop
    use_cache = use_cache and isinstance(getattr(model, "cfg", None), GPTConfig)
    kv_cache = KVCache(model.cfg, batch_size=idx.shape[0], max_len=context_size) if use_cache else None
    for step in range(max_new_tokens):
        if kv_cache is None:  # the seed's loop: the whole window, every step
            logits = model(idx[:, -context_size:])
        elif step == 0 or kv_cache.length == context_size:  # the prefill, or a re-prefill once the window slides
            kv_cache.reset()
            # last_only: the head runs on the last position alone, (B, 1, V), the only logits sampling reads
            logits = model(idx[:, -context_size:], kv_cache=kv_cache, last_only=True)
        else:  # one decoding step: only the newest token goes through the model
            logits = model(idx[:, -1:], kv_cache=kv_cache)  # (B, 1, V)
        idx_next = choose_next_token(logits[:, -1, :].float(), temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next
        if eos_id is not None and bool((idx_next == eos_id).all()):
            return


def choose_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each sequence from its logits (B, V) -> (B, 1) ids (see ``generate``)."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)  # greedy
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), num_samples=1, generator=generator).to(logits.device)


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text), dtype=torch.long).unsqueeze(0)  # (1, T)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    return tokenizer.decode(token_ids.squeeze(0).tolist())


def sample_text(model, tokenizer, device, start_context: str, max_new_tokens: int = 50) -> str:
    """Greedy continuation of ``start_context`` (the seed's sample after each evaluation), on one line."""
    was_training = model.training
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate(model, encoded, max_new_tokens, context_size, eos_id=tokenizer.eot_token)
    model.train(was_training)
    return token_ids_to_text(token_ids, tokenizer).replace("\n", " ")


def generate_and_print_sample(model, tokenizer, device, start_context: str, max_new_tokens: int = 50) -> None:
    """The seed's function of the same name."""
    print(sample_text(model, tokenizer, device, start_context, max_new_tokens))


def load_for_inference(checkpoint: str, preset: str | None = None, kernels: str = "auto", device: str = "cpu",
                       tokenizer: str | None = None, n_heads: int | None = None):
    """(model, tokenizer) from our ``checkpoint.pt`` or a seed ``model.pth`` (a plain state dict: its number of
    heads comes from ``n_heads``, else from ``preset``, else from the preset whose shape it has)."""
    from .tokenizer import get_tokenizer, tokenizer_from_name

    obj = load_torch(checkpoint)
    if is_minigpt_checkpoint(obj):
        cfg = GPTConfig.from_any(obj["config"])
        _check_flags_fit_checkpoint(cfg, obj.get("preset"), preset, n_heads, checkpoint)
        state, tok_name = obj["model"], tokenizer or obj["tokenizer"]
    elif isinstance(obj, dict) and "tok_emb.weight" in obj:  # a plain state dict, as the seed saves model.pth
        cfg = _config_for_state_dict(obj, preset, n_heads, checkpoint)
        state, tok_name = obj, tokenizer or ("gpt2" if cfg.vocab_size == 50257 else "bytes")
    else:
        raise CheckpointError(f"{checkpoint} is neither a minigpt checkpoint nor a GPT state dict")
    tok = tokenizer_from_name(tok_name) if tok_name != "auto" else get_tokenizer("auto")
    if tok.n_vocab != cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer {tok.name!r} has {tok.n_vocab} tokens but the model has vocab_size {cfg.vocab_size} — "
            "pass the --tokenizer the model was trained with"
        )
    model = GPTModel(cfg, kernels=kernels)
    load_model_state(model, state, checkpoint)
    return model.to(device).eval(), tok


def load_pretrained_for_inference(args, device):
    """(model, GPT-2's tokenizer) for ``--pretrained``; flags that describe another model are refused."""
    from .pretrained import gpt2_tokenizer

    for flag, value in (("--checkpoint", args.checkpoint), ("--preset", args.preset), ("--n-heads", args.n_heads)):
        if value is not None:
            raise ConfigError(f"{flag} and --pretrained both name a model — give one of them")
    if args.tokenizer not in (None, "gpt2"):
        raise ConfigError(f"--tokenizer {args.tokenizer}: GPT-2's weights need GPT-2's tokenizer — drop --tokenizer")
    tok = gpt2_tokenizer()  # first: without the BPE files the weights are of no use
    model = GPTModel.from_pretrained(args.pretrained, kernels=args.kernels)
    if model.cfg.vocab_size != tok.n_vocab:
        raise CheckpointError(f"{args.pretrained} has vocab_size {model.cfg.vocab_size}, GPT-2's tokenizer "
                              f"{tok.n_vocab} tokens — --pretrained takes models with GPT-2's vocabulary")
    return model.to(device).eval(), tok


SHAPE = ("emb_dim", "n_layers", "context_length")  # what a state dict's weights say of its config


def _describe(shape: dict) -> str:
    return f"emb_dim {shape['emb_dim']}, {shape['n_layers']} layers, context {shape['context_length']}"


def _presets_with(shape: dict) -> list[str]:
    return [n for n, p in PRESETS.items() if all(getattr(p, f) == shape[f] for f in SHAPE)]


def _check_flags_fit_checkpoint(cfg: GPTConfig, recorded: str | None, preset: str | None, n_heads: int | None,
                                path: str) -> None:
    """A checkpoint.pt records its config: --preset / --n-heads may only repeat it."""
    if preset is not None:
        p = get_preset(preset)
        if preset != recorded and any(getattr(p, f) != getattr(cfg, f) for f in (*SHAPE, "n_heads")):
            raise CheckpointError(f"--preset {preset} does not fit {path}, a {recorded or 'custom'} model "
                                  f"({_describe(cfg.to_dict())}, {cfg.n_heads} heads) — drop --preset: a checkpoint "
                                  "records its config")
    if n_heads is not None and n_heads != cfg.n_heads:
        raise CheckpointError(f"--n-heads {n_heads} does not fit {path}, which has {cfg.n_heads} heads — drop "
                              "--n-heads: a checkpoint records its config")


def _config_for_state_dict(sd: dict, preset: str | None, n_heads: int | None, path: str) -> GPTConfig:
    """A seed state dict does not store its config: its shapes give every field but the number of heads."""
    vocab_size, emb_dim = sd["tok_emb.weight"].shape
    shape = dict(emb_dim=emb_dim, context_length=sd["pos_emb.weight"].shape[0],
                 n_layers=len({k.split(".")[1] for k in sd if k.startswith("trf_blocks.")}))
    fitting = _presets_with(shape)
    if preset is not None:
        p = get_preset(preset)
        if any(getattr(p, f) != shape[f] for f in SHAPE):
            fix = (f"use --preset {fitting[0]}" if fitting else
                   "no preset has that shape: pass --n-heads (the number of heads it was trained with)")
            raise CheckpointError(f"--preset {preset} ({_describe(p.to_dict())}) does not fit {path} "
                                  f"({_describe(shape)}) — {fix}")
    elif n_heads is None:
        # the heads of a preset with the same width and depth (the context may have been overridden)
        near = fitting or [n for n, p in PRESETS.items() if (p.emb_dim, p.n_layers) == (emb_dim, shape["n_layers"])]
        if not near:
            raise CheckpointError(f"{path} is a plain state dict ({_describe(shape)}) and no preset has that "
                                  "shape — pass --n-heads (the number of heads it was trained with)")
        preset = near[0]
    heads = n_heads if n_heads is not None else get_preset(preset).n_heads
    return GPTConfig(vocab_size=vocab_size, n_heads=heads, qkv_bias="trf_blocks.0.att.W_query.bias" in sd,
                     drop_rate=0.0, **shape)


DEFAULT_TOP_K = 50  # sampling among GPT-2's 50 most likely tokens, as GPT-2's own samples did
# The smallest temperature that samples. Sampling divides the logits by the temperature: a tiny one (1e-40) turns
# them into inf in float32, and softmax of inf is NaN. Long before that, sampling is greedy in all but name: at 1e-4
# a logit gap of 0.01 already weighs e^100 to 1, so a user who wants that wants --temperature 0.
MIN_TEMPERATURE = 1e-4


def check_float_flag(flag: str, value: float, low: float, high: float = math.inf, low_open: bool = False,
                     high_open: bool = False, also: str = "") -> None:
    """Refuse a float flag that is not a finite number between ``low`` and ``high`` (an open end excludes the bound
    itself) with a ConfigError naming the flag, the value and the range; ``also`` names any other allowed value.
    Every float flag goes through here because NaN fails every comparison: ``value < 0`` alone lets it through."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if math.isfinite(value) and above and below:
        return
    if math.isinf(high):
        allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ConfigError(f"{flag} must be {allowed}{also}, got {value}")


def check_sampling_args(args) -> list[str]:
    """Refuse impossible sampling flags (ConfigError); return notes on flags that will have no effect. Sets
    ``args.top_k`` to the number of tokens to keep (None = all)."""
    from .runtime import check_seed

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature != 0:
        check_float_flag("--temperature", args.temperature, MIN_TEMPERATURE, also=" or 0 (greedy)")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.top_k is not None and args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 = every token), got {args.top_k}")
    if args.top_p is not None:
        check_float_flag("--top-p", args.top_p, 0.0, 1.0, low_open=True)
    if args.n_heads is not None and args.n_heads < 1:
        raise ConfigError(f"--n-heads must be >= 1, got {args.n_heads}")
    check_seed(args.seed)
    notes = []
    if args.temperature == 0:
        ignored = [f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p)) if v is not None]
        if ignored:
            notes.append(f"--temperature 0 is greedy decoding: {' and '.join(ignored)} "
                         f"{'have' if len(ignored) > 1 else 'has'} no effect (give a --temperature above 0 to sample)")
        if args.num_samples > 1:
            notes.append(f"--temperature 0 is greedy decoding: the {args.num_samples} samples will be the same text")
    args.top_k = DEFAULT_TOP_K if args.top_k is None else (args.top_k or None)
    return notes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigpt.generate", description="Generate text with a trained GPT.")
    p.add_argument("--checkpoint", default=None,
                   help="our checkpoint.pt, or a seed notebook's model.pth (default: out/checkpoint.pt)")
    p.add_argument("--pretrained", default=None, metavar="NAME|PATH",
                   help="GPT-2's own weights instead of a checkpoint: gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                        "(Hugging Face hub, or its cache offline) or a folder in that format")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="config of a plain model.pth (n_heads is not stored in it); inferred when unambiguous")
    p.add_argument("--n-heads", type=int, default=None,
                   help="number of heads of a plain model.pth whose shape is no preset's")
    p.add_argument("--tokenizer", default=None, choices=["gpt2", "bytes"],
                   help="override the tokenizer recorded in the checkpoint")
    p.add_argument("--prompt", default="Once upon a time", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8,
                   help=f"0 = greedy (always the most likely token); sampling takes >= {MIN_TEMPERATURE:g}")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"sample among the k most likely tokens (0 = all; default {DEFAULT_TOP_K})")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with probability >= p")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--no-cache", action="store_true",
                   help="run the whole context through the model for every token (no KV cache), to compare")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    return p


def main(argv: list[str] | None = None) -> None:
    from kernels import BackendUnavailable

    from .runtime import resolve_device
    from .tokenizer import TokenizerError

    args = build_parser().parse_args(argv)
    try:
        notes = check_sampling_args(args)
        device = resolve_device(args.device)
        if args.pretrained is not None:
            model, tok = load_pretrained_for_inference(args, device)
        else:
            model, tok = load_for_inference(args.checkpoint or "out/checkpoint.pt", args.preset, args.kernels,
                                            device, args.tokenizer, args.n_heads)
    except (CheckpointError, ConfigError, TokenizerError, BackendUnavailable) as e:
        raise SystemExit(f"error: {e}") from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    ids = tok.encode(args.prompt)
    if not ids:
        ids = [tok.eot_token]  # an empty prompt starts from end-of-text, as GPT-2 does
    context = model.cfg.context_length
    if len(ids) > context:
        print(f"note: the prompt is {len(ids)} tokens, longer than the model's context of {context}: it sees only "
              f"the last {context}", file=sys.stderr)
    try:
        _print_samples(args, model, tok, ids, device)
    except KeyboardInterrupt:  # Ctrl-C stops generating, without a traceback
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


def _print_samples(args, model, tok, ids: list[int], device) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt, end="", flush=True)
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        tokens = generate_tokens(model, idx, args.max_new_tokens, model.cfg.context_length, args.temperature,
                                 args.top_k, args.top_p, eos_id=tok.eot_token, generator=gen,
                                 use_cache=not args.no_cache)
        for piece in stream_text((t.item() for t in tokens), tok):
            print(piece, end="", flush=True)
        print(flush=True)


def stream_text(token_ids, tok):
    """Yield the text of a stream of token ids piece by piece, as soon as it is whole, up to end-of-text.

    A character may span several tokens (a byte tokenizer spends 2 to 4 on any non-ASCII letter, GPT-2's BPE
    sometimes 2): while the text decoded so far ends in half a character (U+FFFD), nothing is shown, and the
    next token completes it.
    """
    new: list[int] = []
    shown = ""  # the part of the decoded text already yielded
    for token in token_ids:
        if token == tok.eot_token:
            break
        new.append(token)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
    rest = tok.decode(new)[len(shown):]
    if rest:
        yield rest


if __name__ == "__main__":
    main()
