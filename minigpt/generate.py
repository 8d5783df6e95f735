"""Text generation: the two steps of cached generation (``prefill``, then ``decode_one`` per token), the sampling
loop around them, and ``python -m minigpt.generate``.

    python -m minigpt.generate --checkpoint out/checkpoint.pt --prompt "Once upon a time"
    python -m minigpt.generate --checkpoint model.pth --preset gpt2-124m      # the original notebook's model.pth
    python -m minigpt.generate --pretrained gpt2 --prompt "The meaning of life is"   # GPT-2's own weights
"""
from __future__ import annotations

import argparse
import codecs
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointError,
    is_minigpt_checkpoint,
    load_model_state,
    load_torch,
)
from .config import PRESETS, ConfigError, GPTConfig, get_preset
from .model import GPTModel, KVCache

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_length: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + new).

    temperature 0 picks the most likely token (greedy, the original notebook's ``generate_text_simple``); otherwise the
    logits are divided by the temperature, cut to the ``top_k`` most likely tokens and/or the smallest set whose
    probability reaches ``top_p`` (nucleus sampling), and a token is drawn. Stops early when every sequence has just
    produced ``eos_id``. The model sees at most the last ``context_length`` tokens. ``use_cache=False`` runs the
    whole window through the model for every token (the original notebook's loop); the cache gives the same tokens,
    faster (see ``generate_tokens``).
    """
    new = list(generate_tokens(model, idx, max_new_tokens, context_length, temperature, top_k, top_p, eos_id,
                               generator, use_cache))
    return torch.cat([idx, *new], dim=1)


@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens, context_length, temperature=0.0, top_k=None, top_p=None, eos_id=None,
                    generator=None, use_cache=True):
    """``generate``, one token at a time: yields each new (B, 1) column of ids as soon as it is chosen.

    With the cache (``model.KVCache``), the first step runs the prompt through the model (``prefill``) and every
    later step runs only the newest token (``decode_one``), whose query attends to the cached keys and values: a
    step costs one position's worth of matmuls (about 2 x parameters FLOPs per token) plus reading the cache,
    instead of a forward over the whole window.

    Past ``context_length`` tokens the window slides: the model has learned ABSOLUTE positions, so once the oldest
    token drops out every remaining token moves down one position and every cached key and value (computed at the
    old positions) is stale. The cache is then rebuilt from the last ``context_length`` tokens (a re-prefill),
    which is exactly what the uncached loop computes. So the cache saves the work of the first
    ``context_length - prompt length`` tokens; from then on each token costs a full-window forward, as without it.
    """
    # a model without our forward(..., kv_cache=, input_pos=) (the original notebook's own GPTModel, say) gets the
    # uncached loop
    use_cache = use_cache and isinstance(getattr(model, "cfg", None), GPTConfig)
    cache = KVCache(model.cfg, batch_size=idx.shape[0], max_len=context_length) if use_cache else None
    pos = 0  # tokens in the cache: the position the next decoded token is written at
    for step in range(max_new_tokens):
        if cache is None:  # the original notebook's loop: the whole window, every step
            logits = model(idx[:, -context_length:])[:, -1, :]  # (B, V)
        elif step == 0 or pos == context_length:  # the prefill, or a re-prefill once the window slides
            window = idx[:, -context_length:]
            logits = prefill(model, window, cache)
            pos = window.shape[1]
        else:  # the token chosen last step goes in at position pos
            logits = decode_one(model, idx[:, -1:], cache, pos)
            pos += 1
        idx_next = choose_next_token(logits.float(), temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next
        if eos_id is not None and bool((idx_next == eos_id).all()):
            return


@torch.no_grad()
def prefill(model: GPTModel, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The first step of cached generation: the prompt ``idx`` (B, T) at positions 0 .. T - 1, its keys and values
    written into ``cache`` -> the logits (B, V) of its last position, the next token's. The output head runs on
    that position alone: the only logits sampling reads."""
    return model(idx, kv_cache=cache, input_pos=0, last_only=True)[:, -1, :]


@torch.no_grad()
def decode_one(model: GPTModel, token: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
    """Every later step: one token (B, 1) at position ``pos`` (the number of tokens already in ``cache``), its key
    and value written there, its query attending to positions 0 .. pos -> the logits (B, V) of the token after it.
    The caller counts the positions; the cache only writes where it is told."""
    return model(token, kv_cache=cache, input_pos=pos)[:, -1, :]


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
    """Greedy continuation of ``start_context`` (the original notebook's sample after each evaluation), on one line."""
    was_training = model.training
    model.eval()
    context_length = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate(model, encoded, max_new_tokens, context_length, eos_id=tokenizer.eot_token)
    model.train(was_training)
    return token_ids_to_text(token_ids, tokenizer).replace("\n", " ")


def generate_and_print_sample(model, tokenizer, device, start_context: str, max_new_tokens: int = 50) -> None:
    """The original notebook's function of the same name."""
    print(sample_text(model, tokenizer, device, start_context, max_new_tokens))


def load_for_inference(checkpoint: str, preset: str | None = None, kernels: str = "auto", device: str = "cpu",
                       tokenizer: str | None = None, n_heads: int | None = None):
    """(model, tokenizer) from our ``checkpoint.pt`` or a plain ``model.pth`` (a state dict, as the original
    notebook and ``minigpt.train`` save it). A state dict's shapes give every field of its config but the number of
    heads; those come from the run's own ``checkpoint.pt`` beside it, else from ``n_heads`` or ``preset``, else from the
    preset whose shape it has, with a note (see ``_config_for_state_dict``). CheckpointError, one line, for a file that
    cannot be loaded."""
    from .tokenizer import get_tokenizer, tokenizer_from_name

    obj = load_torch(checkpoint)
    if is_minigpt_checkpoint(obj):
        cfg = _recorded_config(obj, checkpoint)
        _check_flags_fit_checkpoint(cfg, obj.get("preset"), preset, n_heads, checkpoint)
        state, tok_name = obj.get("model"), tokenizer or obj.get("tokenizer")
        if not isinstance(state, dict) or not isinstance(tok_name, str):
            missing = "model" if not isinstance(state, dict) else "tokenizer"
            raise CheckpointError(f"{checkpoint} has no {missing!r} entry — the file is damaged: use an earlier "
                                  "checkpoint, or the model.pth the run wrote beside it")
    elif isinstance(obj, dict) and "tok_emb.weight" in obj:  # a plain state dict, as the original notebook's model.pth
        cfg, recorded_tok = _config_for_state_dict(obj, preset, n_heads, checkpoint)
        state = obj
        tok_name = tokenizer or recorded_tok or ("gpt2" if cfg.vocab_size == 50257 else "bytes")
    else:
        raise CheckpointError(f"{checkpoint} is neither a minigpt checkpoint nor a GPT state dict")
    tok = tokenizer_from_name(tok_name) if tok_name != "auto" else get_tokenizer("auto")
    if tok.n_vocab != cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer {tok.name!r} has {tok.n_vocab} tokens but the model has vocab_size {cfg.vocab_size} — "
            "pass the --tokenizer the model was trained with"
        )
    model = GPTModel(cfg, kernels=kernels)
    _check_state_fits(state, model, checkpoint)
    load_model_state(model, state, checkpoint)
    return model.to(device).eval(), tok


def _recorded_config(ckpt: dict, path) -> GPTConfig:
    """The config a checkpoint records (CheckpointError when it is missing or cannot build a model)."""
    if "config" not in ckpt:
        raise CheckpointError(f"{path} has no 'config' entry — the file is damaged: use an earlier checkpoint")
    try:
        return GPTConfig.from_any(ckpt["config"])
    except (ConfigError, TypeError) as e:
        reason = str(e).split(" — ")[0]  # its fix names flags; the file, not a flag, is what is wrong
        raise CheckpointError(f"{path} records a config no model can have ({reason}) — the file is damaged: use "
                              "an earlier checkpoint") from None


def _check_state_fits(state: dict, model: torch.nn.Module, path) -> None:
    """Every tensor of ``model`` is in ``state`` with its shape and finite values, and nothing else is (the original
    notebook's causal-mask buffers aside). The config came from the same file, so a mismatch is the file's fault, not a
    flag's: the message names the tensor."""
    expected = model.state_dict()
    masks = {k.removesuffix("out_proj.bias") + "mask" for k in expected if k.endswith(".att.out_proj.bias")}
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{path} has no {missing[0]} ({len(missing)} tensors missing) — the file is damaged "
                              "or incomplete: use another checkpoint, or train again")
    unknown = [k for k in state if k not in expected and k not in masks]
    if unknown:
        raise CheckpointError(f"{path} holds {unknown[0]}, which this model does not have ({len(unknown)} "
                              "unexpected entries) — is it a GPT state dict? use the model.pth or checkpoint.pt "
                              "a run wrote")
    for key, want in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != want.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{key} in {path} has shape {got}, but the file's other tensors imply "
                                  f"{tuple(want.shape)} — the file is damaged: use another checkpoint, or train "
                                  "again")
        # A NaN or an infinity in one weight makes every logit NaN (and sampling fail): refused while the tensor
        # and the file can still be named. One pass over each tensor, cheaper than reading it from disk.
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{key} in {path} holds NaN or infinite values — the weights are damaged (a "
                                  "diverged run?): use an earlier checkpoint")


def load_pretrained_for_inference(config: GenerateConfig, device):
    """(model, GPT-2's tokenizer) for ``config.pretrained``; settings that describe another model are refused."""
    from .pretrained import gpt2_tokenizer

    for flag, value in (("--checkpoint", config.checkpoint), ("--preset", config.preset),
                        ("--n-heads", config.n_heads)):
        if value is not None:
            raise ConfigError(f"{flag} and --pretrained both name a model — give one of them")
    if config.tokenizer not in (None, "gpt2"):
        raise ConfigError(f"--tokenizer {config.tokenizer}: GPT-2's weights need GPT-2's tokenizer — drop "
                          "--tokenizer")
    tok = gpt2_tokenizer()  # first: without the BPE files the weights are of no use
    model = GPTModel.from_pretrained(config.pretrained, kernels=config.kernels)
    if model.cfg.vocab_size != tok.n_vocab:
        raise CheckpointError(f"{config.pretrained} has vocab_size {model.cfg.vocab_size}, GPT-2's tokenizer "
                              f"{tok.n_vocab} tokens — --pretrained takes models with GPT-2's vocabulary")
    return model.to(device).eval(), tok


SHAPE = ("emb_dim", "n_layers", "context_length")  # what a state dict's weights say of its config


def _describe(shape: dict) -> str:
    return f"emb_dim {shape['emb_dim']}, {shape['n_layers']} layers, context {shape['context_length']}"


def _presets_with(shape: dict) -> list[str]:
    return [n for n, p in PRESETS.items() if all(getattr(p, f) == shape[f] for f in SHAPE)]


def _check_flags_fit_checkpoint(cfg: GPTConfig, recorded: str | None, preset: str | None, n_heads: int | None,
                                path: str, record: str = "a checkpoint records its config") -> None:
    """A checkpoint.pt records its config: --preset / --n-heads may only repeat it. ``record`` ends the message."""
    if preset is not None:
        p = get_preset(preset)
        if preset != recorded and any(getattr(p, f) != getattr(cfg, f) for f in (*SHAPE, "n_heads")):
            raise CheckpointError(f"--preset {preset} does not fit {path}, a {recorded or 'custom'} model "
                                  f"({_describe(cfg.to_dict())}, {cfg.n_heads} heads) — drop --preset: {record}")
    if n_heads is not None and n_heads != cfg.n_heads:
        raise CheckpointError(f"--n-heads {n_heads} does not fit {path}, which has {cfg.n_heads} heads — drop "
                              f"--n-heads: {record}")


def _shape_of_state_dict(sd: dict, path) -> dict:
    """What a state dict's tensors say of its config: every field but ``n_heads`` (and the dropout rate)."""
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path} holds entries that are not named tensors — it is not a GPT state dict: use "
                              "the model.pth or checkpoint.pt a run wrote")
    tok_emb, pos_emb = sd["tok_emb.weight"], sd.get("pos_emb.weight")
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("trf_blocks.")})
    if pos_emb is None:
        what = "has no pos_emb.weight"
    elif tok_emb.dim() != 2 or pos_emb.dim() != 2 or pos_emb.shape[1] != tok_emb.shape[1] or 0 in tok_emb.shape:
        what = (f"has tok_emb.weight {tuple(tok_emb.shape)} and pos_emb.weight {tuple(pos_emb.shape)}, not "
                "(vocab, width) and (context, width)")
    elif n_layers == 0 or pos_emb.shape[0] == 0:
        what = "has no transformer blocks" if n_layers == 0 else "has an empty pos_emb.weight"
    else:
        return dict(vocab_size=tok_emb.shape[0], emb_dim=tok_emb.shape[1], context_length=pos_emb.shape[0],
                    n_layers=n_layers, qkv_bias="trf_blocks.0.att.W_query.bias" in sd)
    raise CheckpointError(f"{path} {what} — the file is damaged or not a GPT state dict: use another checkpoint, "
                          "or train again")


def _run_record_beside(path, shape: dict):
    """(config, preset, tokenizer, its path) recorded in the ``checkpoint.pt`` beside a ``model.pth`` when its
    model has the state dict's ``shape`` (the run that wrote both); None when there is none, it is unreadable or
    it is another model's. Only the small "config" entry is read: ``mmap`` maps the file's tensors without
    reading them."""
    record_path = Path(path).parent / "checkpoint.pt"
    if Path(path).name == "checkpoint.pt" or not record_path.is_file():
        return None
    try:
        ckpt = torch.load(record_path, map_location="cpu", weights_only=True, mmap=True)
        cfg = GPTConfig.from_any(ckpt["config"]) if is_minigpt_checkpoint(ckpt) else None
    except Exception:  # damaged, another format, a config of another version: not this file's record
        return None
    if cfg is None or any(getattr(cfg, f) != v for f, v in shape.items()):
        return None
    tok_name = ckpt.get("tokenizer")
    return cfg, ckpt.get("preset"), tok_name if isinstance(tok_name, str) else None, record_path


def _config_for_state_dict(sd: dict, preset: str | None, n_heads: int | None, path) -> tuple[GPTConfig, str | None]:
    """(config, tokenizer name or None) of a plain state dict, which stores no config: its shapes give every field
    but the number of heads, and any divisor of the width would fit those shapes. The heads come, in this order,
    from the run's own ``checkpoint.pt`` beside it (which flags may only repeat), ``n_heads``, ``preset``, or the
    one preset with its shape; that last is a guess (a run may override a preset's heads), so it is made only
    where a file of the original notebook's kind must keep loading, and said in a note. Otherwise: CheckpointError."""
    shape = _shape_of_state_dict(sd, path)
    record = _run_record_beside(path, shape)
    if record is not None:
        cfg, recorded_preset, tok_name, record_path = record
        _check_flags_fit_checkpoint(cfg, recorded_preset, preset, n_heads, path,
                                    f"the run's {record_path} beside it records its config")
        return cfg, tok_name
    fitting = _presets_with(shape)
    if preset is not None:
        p = get_preset(preset)
        if any(getattr(p, f) != shape[f] for f in SHAPE):
            fix = (f"use --preset {fitting[0]}" if fitting else
                   "no preset has that shape: pass --n-heads (the number of heads it was trained with)")
            raise CheckpointError(f"--preset {preset} ({_describe(p.to_dict())}) does not fit {path} "
                                  f"({_describe(shape)}) — {fix}")
    elif n_heads is None:
        heads = {PRESETS[n].n_heads for n in fitting}
        if len(heads) != 1:
            raise CheckpointError(f"{path} is a plain state dict ({_describe(shape)}) that does not record its "
                                  "number of heads, with no checkpoint.pt of its run beside it, and no preset has "
                                  "that shape — pass --n-heads (the number of heads it was trained with)")
        # The original notebook's model.pth (gpt2-124m's shape) loads this way, as the README promises.
        preset = fitting[0]
        log.warning("note: %s does not record its number of heads: assuming %d, as the %s preset of its shape "
                    "has — pass --n-heads if it was trained with another number", path, heads.pop(), preset)
    heads = n_heads if n_heads is not None else get_preset(preset).n_heads
    return GPTConfig(n_heads=heads, drop_rate=0.0, **shape), None


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


def check_prompt(prompt: str, flag: str = "--prompt") -> None:
    """Refuse a prompt that is no text: bytes that are not UTF-8 reach ``sys.argv`` as lone surrogates
    (U+DC80..U+DCFF, Python's "surrogateescape"), which no tokenizer can encode and no terminal can print. An empty
    prompt is text: generation then starts from end-of-text."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(prompt[e.start])
        what = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
        raise ConfigError(f"{flag} is not valid UTF-8 ({what} at character {e.start + 1}) — pass it as UTF-8 text "
                          "(is the terminal or the file it came from in another encoding?), or '' to start from "
                          "end-of-text") from None


@dataclass(frozen=True)
class GenerateConfig:
    """Every setting of ``python -m minigpt.generate``, built once from the command line (``resolve_config``);
    the code below the CLI reads this, never the parsed flags."""

    checkpoint: str | None = None  # our checkpoint.pt or a plain model.pth; None: out/checkpoint.pt
    pretrained: str | None = None  # GPT-2's weights (a name or a folder) instead of a checkpoint
    preset: str | None = None  # the config of a plain model.pth whose run did not record it
    n_heads: int | None = None  # the heads of such a model.pth; None: its run's record, the preset's, or a guess
    tokenizer: str | None = None  # None: the one the checkpoint records
    prompt: str = "Once upon a time"
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = DEFAULT_TOP_K  # sample among the k most likely tokens; None: among all of them
    top_p: float | None = None  # nucleus sampling; None: off
    num_samples: int = 1
    seed: int = 123
    use_cache: bool = True  # False runs the whole window through the model for every token, to compare
    kernels: str = "auto"
    device: str = "auto"  # resolved to the machine's when the model is loaded


def resolve_config(args: argparse.Namespace) -> tuple[GenerateConfig, list[str]]:
    """The parsed command line -> (its GenerateConfig, notes on flags that will have no effect). ConfigError for
    impossible flags. ``args`` is only read: ``--top-k`` not given becomes DEFAULT_TOP_K here, and 0 (every token)
    becomes None, so nothing below needs to know which flags were given."""
    notes = check_sampling_args(args)
    config = GenerateConfig(
        checkpoint=args.checkpoint, pretrained=args.pretrained, preset=args.preset, n_heads=args.n_heads,
        tokenizer=args.tokenizer, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=DEFAULT_TOP_K if args.top_k is None else (args.top_k or None),
        top_p=args.top_p, num_samples=args.num_samples, seed=args.seed, use_cache=not args.no_cache,
        kernels=args.kernels, device=args.device,
    )
    return config, notes


def check_sampling_args(args) -> list[str]:
    """Refuse impossible sampling flags (ConfigError); return notes on flags that will have no effect. ``args`` is
    only read."""
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
    check_prompt(args.prompt)
    notes = []
    if args.temperature == 0:
        ignored = [f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p)) if v is not None]
        if ignored:
            notes.append(f"--temperature 0 is greedy decoding: {' and '.join(ignored)} "
                         f"{'have' if len(ignored) > 1 else 'has'} no effect (give a --temperature above 0 to sample)")
        if args.num_samples > 1:
            notes.append(f"--temperature 0 is greedy decoding: the {args.num_samples} samples will be the same text")
    return notes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigpt.generate", description="Generate text with a trained GPT.")
    p.add_argument("--checkpoint", default=None,
                   help="our checkpoint.pt, or the original notebook's model.pth (default: out/checkpoint.pt)")
    p.add_argument("--pretrained", default=None, metavar="NAME|PATH",
                   help="GPT-2's own weights instead of a checkpoint: gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                        "(Hugging Face hub, or its cache offline) or a folder in that format")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="config of a plain model.pth (n_heads is not stored in it) with no checkpoint.pt of its run "
                        "beside it; default: the preset of its shape, with a note")
    p.add_argument("--n-heads", type=int, default=None,
                   help="number of heads of a plain model.pth with no checkpoint.pt of its run beside it")
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
    """The command line. Exits with ``kernels.cli.run_cli``'s status when it is not 0: 1 after an error (one line on
    stderr), 130 on Ctrl-C, 141 when the output was closed early (``| head``)."""
    from kernels.cli import run_cli

    args = build_parser().parse_args(argv)
    status = run_cli(lambda: _generate(*resolve_config(args)))
    if status:
        sys.exit(status)


def _generate(config: GenerateConfig, notes: list[str]) -> None:
    from .runtime import resolve_device

    device = resolve_device(config.device)
    if config.pretrained is not None:
        model, tok = load_pretrained_for_inference(config, device)
    else:
        model, tok = load_for_inference(config.checkpoint or "out/checkpoint.pt", config.preset, config.kernels,
                                        device, config.tokenizer, config.n_heads)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    ids = tok.encode(config.prompt)
    if not ids:
        ids = [tok.eot_token]  # an empty prompt starts from end-of-text, as GPT-2 does
    context_length = model.cfg.context_length
    if len(ids) > context_length:
        print(f"note: the prompt is {len(ids)} tokens, longer than the model's context of {context_length}: it sees "
              f"only the last {context_length}", file=sys.stderr)
    _print_samples(config, model, tok, ids, device)  # a closed or full stdout is run_cli's to report


def _print_samples(config: GenerateConfig, model, tok, ids: list[int], device) -> None:
    gen = torch.Generator().manual_seed(config.seed)
    for i in range(config.num_samples):
        if config.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(config.prompt, end="", flush=True)
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        tokens = generate_tokens(model, idx, config.max_new_tokens, model.cfg.context_length, config.temperature,
                                 config.top_k, config.top_p, eos_id=tok.eot_token, generator=gen,
                                 use_cache=config.use_cache)
        for piece in stream_text((t.item() for t in tokens), tok):
            print(piece, end="", flush=True)
        print(flush=True)


def stream_text(token_ids, tok):
    """Yield the text of a stream of token ids piece by piece, as soon as it is whole, up to end-of-text.

    A character may span several tokens (a byte tokenizer spends 2 to 4 on any non-ASCII letter, GPT-2's BPE
    sometimes 2). Each token's bytes go into one incremental UTF-8 decoder, which keeps the first bytes of a
    character until a later token completes it, or shows that it never will: bytes that form no character come out
    as U+FFFD at once, as ``tok.decode`` makes them (``errors="replace"``). So the pieces joined are exactly
    ``tok.decode`` of all the ids before end-of-text, and each token is decoded once: the work grows linearly with
    the tokens (decoding all the text so far at every step would grow with their square).
    """
    token_bytes = _token_bytes(tok)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_ids:
        if token == tok.eot_token:
            break
        piece = decoder.decode(token_bytes(token))
        if piece:
            yield piece
    rest = decoder.decode(b"", final=True)  # a character cut off at the end: U+FFFD, as tok.decode gives
    if rest:
        yield rest


def _token_bytes(tok):
    """The function from a token id to the bytes it stands for, for minigpt's two kinds of tokenizer (both decode a
    list of ids as the UTF-8 text of their bytes joined). A tokenizer of another kind has its ids decoded one at a
    time, which is exact when each of its tokens is whole characters."""
    from .tokenizer import ByteTokenizer, TiktokenTokenizer

    if isinstance(tok, TiktokenTokenizer):
        return tok.encoding.decode_single_token_bytes
    if isinstance(tok, ByteTokenizer):
        # an id outside the 256 bytes (end-of-text stops before) gets decode's error, which names it
        return lambda token: bytes((token,)) if 0 <= token < 256 else tok.decode([token]).encode("utf-8")
    return lambda token: tok.decode([token]).encode("utf-8")


if __name__ == "__main__":
    main()
