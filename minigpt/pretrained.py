"""GPT-2's own weights in minigpt's model: ``GPTModel.from_pretrained("gpt2")``.

minigpt is GPT-2's architecture with the original notebook's parameter names, so OpenAI's released weights (124M, 355M,
774M and 1558M parameters, as Hugging Face publishes them) fit it after renaming and three small changes:

    Hugging Face GPT-2 key                 shape          minigpt key                          shape
    wte.weight                             (V, C)         tok_emb.weight  (and out_head.weight) (V, C)
    wpe.weight                             (P, C)         pos_emb.weight                       (T, C), T <= P
    h.{i}.ln_1.weight / .bias              (C,)           trf_blocks.{i}.norm1.scale / .shift  (C,)
    h.{i}.attn.c_attn.weight / .bias       (C, 3C)        att.W_query / W_key / W_value        3 x (C, C)
    h.{i}.attn.c_proj.weight / .bias       (C, C)         att.out_proj                         (C, C)
    h.{i}.ln_2.weight / .bias              (C,)           norm2.scale / .shift                 (C,)
    h.{i}.mlp.c_fc.weight / .bias          (C, 4C)        ff.layers.0                          (4C, C)
    h.{i}.mlp.c_proj.weight / .bias        (4C, C)        ff.layers.2                          (C, 4C)
    ln_f.weight / .bias                    (C,)           final_norm.scale / .shift            (C,)

1. GPT-2's linear layers are ``Conv1D`` modules that store their weight as (in, out) and compute ``x @ W``;
   ``nn.Linear`` stores (out, in) and computes ``x @ W.T``. Every weight matrix is transposed.
2. GPT-2 computes queries, keys and values with one (C, 3C) matrix, ``c_attn``; minigpt has three (C, C) ones.
   Its columns are [queries | keys | values], so splitting them in three gives ours (biases likewise).
3. GPT-2 has no output matrix of its own: the head reuses the token embedding ("tied" weights). minigpt's head is
   a separate parameter; it gets a copy of the same values (see ``_convert``).

Keys may carry Hugging Face's "transformer." prefix or not; the "attn.bias" / "attn.masked_bias" entries are
GPT-2's causal-mask buffers, not weights, and are ignored (minigpt masks by position).

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)``: a weights file can hold tensors only,
never code to run. The hub is reached through ``huggingface_hub`` (imported only when a hub name is asked for);
offline, a model downloaded before is found in its cache.
"""
from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import torch

from kernels.definitions import EPS

from .checkpoint import CheckpointError
from .config import ConfigError, GPTConfig
from .model import GPTModel

# The four sizes OpenAI released, under the names Hugging Face uses, and the repositories that hold them.
HUB_MODELS = {
    "gpt2": "openai-community/gpt2",  # 124M parameters (GPT-2 counts the tied head once)
    "gpt2-medium": "openai-community/gpt2-medium",  # 355M
    "gpt2-large": "openai-community/gpt2-large",  # 774M
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M
}
HUB_FILES = ["config.json", "model.safetensors"]  # what is downloaded: the config and the weights, nothing else
# A folder's weights, in the order they are looked for. The index files list the shards of a large model.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # GPT-2's causal-mask buffers: not weights
LAYER_NORM_EPS = EPS  # GPT-2's layer_norm_epsilon (1e-5), and the one minigpt's LayerNorm uses
DEFAULT_DROP_RATE = 0.1  # GPT-2's resid_pdrop / embd_pdrop / attn_pdrop, used when config.json lacks resid_pdrop
OVERRIDABLE = ("drop_rate", "context_length")  # the fields that do not change the shape of any weight

# config.json settings that change GPT-2's computation in ways minigpt's blocks do not implement, with the values
# they have in the four released models. Anything else is refused instead of loaded into a model that computes
# something else.
SUPPORTED = {
    "model_type": ("gpt2",),
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both are GELU's tanh form, minigpt's GELU
    "scale_attn_weights": (True,),  # scores divided by sqrt(head_dim)
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
}


class PretrainedError(CheckpointError):
    """Pretrained weights that cannot be found, downloaded or read, or that do not fit their config.json."""


# ---------------------------------------------------------------------------------------------------------------
# Where the files are


def source_name(name_or_path: str | os.PathLike) -> str:
    """How a source is recorded (in a training checkpoint): a hub name as it is, a folder as its absolute path."""
    name = str(name_or_path)
    return name if name in HUB_MODELS else str(Path(name).resolve())


def find_folder(name_or_path: str | os.PathLike) -> Path:
    """The folder holding ``config.json`` and the weights: a hub name's copy in Hugging Face's cache (downloaded
    first when it is not there), or ``name_or_path`` itself. The four names always mean the hub; a local folder
    called "gpt2" is ``./gpt2``."""
    name = str(name_or_path)
    if name in HUB_MODELS:
        return _from_hub(name)
    path = Path(name)
    if path.is_dir():
        return path
    if path.exists():
        raise PretrainedError(f"{path} is a file — pass the folder holding it (config.json and model.safetensors)")
    raise PretrainedError(f"{name!r} is neither a GPT-2 model name ({', '.join(HUB_MODELS)}) nor a folder — pass one "
                          "of those names, or a folder in Hugging Face's GPT-2 format (config.json and "
                          "model.safetensors or pytorch_model.bin)")


def _from_hub(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import LocalEntryNotFoundError
    except ImportError:
        raise PretrainedError(f"downloading {name} needs huggingface_hub — pip install huggingface_hub, or pass a "
                              "local folder in GPT-2's format") from None
    repo = HUB_MODELS[name]
    try:  # the cache first: GPT-2's files never change, so a copy there needs no network at all
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:  # raised for "no network" and for HF_HUB_OFFLINE=1 alike
        raise PretrainedError(
            f"{name}'s weights are not in the Hugging Face cache and the hub cannot be reached (offline) — run once "
            "with internet access to download them, or pass a local folder in GPT-2's format (config.json and "
            "model.safetensors)") from None
    except Exception as e:  # an HTTP error, a full disk, an interrupted transfer: the same advice for each
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise PretrainedError(f"could not download {name} from {repo} ({reason}) — try again, or pass a local "
                              "folder in GPT-2's format") from None


# ---------------------------------------------------------------------------------------------------------------
# config.json -> GPTConfig


def read_hf_config(folder: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a folder in Hugging Face's GPT-2 format (PretrainedError when it is missing,
    not JSON, or describes a model minigpt's blocks do not compute)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise PretrainedError(f"no config.json in {folder} — a GPT-2 folder holds config.json and "
                              "model.safetensors (or pytorch_model.bin), as save_pretrained writes them")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path} is not valid JSON ({e}) — restore the file") from None
    if not isinstance(hf, dict):
        raise PretrainedError(f"{path} is not a model config (a JSON object expected) — restore the file")
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        if not isinstance(hf.get(key), int) or isinstance(hf[key], bool):
            raise PretrainedError(f"{path} has no integer {key!r} — is it a GPT-2 config.json?")
        if hf[key] < 1:
            raise PretrainedError(f"{path} has {key} {hf[key]}, but a model needs at least 1 — the file is damaged: "
                                  "restore it")
    # Checked here, where the file can be named: GPTConfig's own message for this would suggest a --n-heads flag,
    # which neither --pretrained nor --init-from takes (the heads are the weights' and only this file knows them).
    if hf["n_embd"] % hf["n_head"] != 0:
        raise PretrainedError(f"{path} has n_embd {hf['n_embd']} and n_head {hf['n_head']}, but the width must split "
                              "evenly into the heads — the file is damaged or another model's: restore it")
    drop = hf.get("resid_pdrop", DEFAULT_DROP_RATE)
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
        raise PretrainedError(f"{path} has resid_pdrop {drop!r}, not a dropout rate in [0, 1) — the file is damaged: "
                              "restore it")
    for key, allowed in SUPPORTED.items():
        if key in hf and hf[key] not in allowed:
            raise PretrainedError(f"{path} has {key} {hf[key]!r}; minigpt's blocks compute "
                                  f"{' or '.join(repr(a) for a in allowed)} only — this is not a GPT-2 model it "
                                  "can load")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):  # None means 4 * n_embd, minigpt's feed-forward width
        raise PretrainedError(f"{path} has n_inner {hf['n_inner']}; minigpt's feed-forward is 4 * n_embd = "
                              f"{4 * hf['n_embd']} wide — this is not a GPT-2 model it can load")
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    # Every GPT-2 uses 1e-5. A GPTConfig field for it would add a key to the original notebook's config dictionary (and
    # to every checkpoint) for a value that never varies, so another epsilon is refused rather than configured.
    if eps != LAYER_NORM_EPS:
        raise PretrainedError(f"{path} has layer_norm_epsilon {eps}; minigpt's LayerNorm uses {LAYER_NORM_EPS} "
                              "(GPT-2's) — this model cannot be loaded")
    return hf


def config_from_hf(hf: dict, source: str = "the pretrained model", **overrides) -> GPTConfig:
    """The GPTConfig of a GPT-2 ``config.json`` (as parsed by ``read_hf_config``), with ``overrides``.

    Only ``drop_rate`` and ``context_length`` (at most the ``n_positions`` it was trained with) may change; any
    other field must repeat the weights' value. ``None`` values are ignored. Raises ConfigError naming the field.
    """
    cfg = GPTConfig(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=hf["n_embd"],
                    n_heads=hf["n_head"], n_layers=hf["n_layer"],
                    # minigpt has one dropout rate where GPT-2 has three (all 0.1 in its releases)
                    drop_rate=hf.get("resid_pdrop", DEFAULT_DROP_RATE), qkv_bias=True)  # c_attn has a bias
    known = {f.name for f in fields(GPTConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"unknown override {key!r} — a pretrained model takes {' and '.join(OVERRIDABLE)} "
                              "(its shape comes from the weights)")
        if value is None or key in OVERRIDABLE:
            continue
        if value != getattr(cfg, key):
            raise ConfigError(f"{key}={value!r} contradicts {source}, whose weights have {key} "
                              f"{getattr(cfg, key)!r} — drop it: a pretrained model's shape comes from its weights")
    context_length = overrides.get("context_length")
    if context_length is not None and context_length > cfg.context_length:
        raise ConfigError(f"context_length={context_length} is longer than the {cfg.context_length} positions "
                          f"{source} was trained with — use at most {cfg.context_length}")
    return cfg.with_overrides(**{k: overrides.get(k) for k in OVERRIDABLE})


# ---------------------------------------------------------------------------------------------------------------
# The weights file -> minigpt's state dict


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5",
                                                                     ".msgpack", ".safetensors"))
    found = f" (found {', '.join(others)}: another format)" if others else ""
    raise PretrainedError(f"no weights in {folder}{found} — expected model.safetensors or pytorch_model.bin, as "
                          "Hugging Face's save_pretrained writes them")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one file, by safetensors or torch.load(weights_only=True): neither can run code from it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise PretrainedError(f"reading {path} needs safetensors — pip install safetensors") from None
    except Exception as e:  # truncated, not a weights file, a pickle of something else than tensors, ...
        raise PretrainedError(f"{path} is not a readable weights file ({type(e).__name__}) — download it again "
                              "or save it with save_pretrained") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PretrainedError(f"{path} is not a state dict of tensors — expected the file save_pretrained writes")
    return sd


def read_weights(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """GPT-2's tensors from ``folder`` under their names without the "transformer." prefix, mask buffers left
    out, each checked finite; and the file they came from (a sharded model's index file lists its shards, all
    read, each inside ``folder``)."""
    path = _weights_file(Path(folder))
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PretrainedError(f"{path} is not a shard index (no weight_map) — restore the file") from None
        files = [_shard_file(path, shard) for shard in shards]
    else:
        files = [path]
    out = {}
    for file in files:
        for key, tensor in _read_file(file).items():
            key = key.removeprefix("transformer.")
            if key.endswith(MASK_BUFFERS):
                continue
            # A NaN or an infinity in one weight spreads to every logit (the next LayerNorm mixes it into the whole
            # row, attention into every later position), so a damaged file is refused here, where the tensor and
            # its file can still be named. One pass over each tensor, far cheaper than reading it from disk.
            if not torch.isfinite(tensor).all():
                raise PretrainedError(f"{key} in {file} holds NaN or infinite values — the file is damaged: "
                                      "download it again, or save the model again from weights that are finite")
            out[key] = tensor
    return out, path


def _shard_file(index: Path, shard: object) -> Path:
    """The file a shard index's ``weight_map`` names, which must lie inside the index's folder: an entry such as
    "../x.safetensors" or "/abs/x.safetensors" would otherwise read a file the folder does not hold.

    The path is normalised as written ("..", absolute paths), not through symbolic links: Hugging Face's cache
    keeps every file of a model as a link to a blob outside the model's folder, and those shards are the folder's.
    """
    folder = Path(os.path.normpath(index.parent.absolute()))
    if not isinstance(shard, str) or not Path(os.path.normpath(folder / shard)).is_relative_to(folder):
        raise PretrainedError(f"{index} lists the shard {shard!r}, which is outside {index.parent} — a shard index "
                              "names files in its own folder: restore the index file")
    if not (folder / shard).is_file():
        raise PretrainedError(f"{index} lists {shard}, which is not in {index.parent} — download it again")
    return index.parent / shard


def _expected_shapes(cfg: GPTConfig, n_positions: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 of this config has, with its shape as stored (Conv1D: (in, out))."""
    V, C, P = cfg.vocab_size, cfg.emb_dim, n_positions
    shapes = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(cfg.n_layers):
        shapes.update({
            f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
            f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_attn.bias": (3 * C,),
            f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
            f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
            f"h.{i}.mlp.c_fc.weight": (C, 4 * C), f"h.{i}.mlp.c_fc.bias": (4 * C,),
            f"h.{i}.mlp.c_proj.weight": (4 * C, C), f"h.{i}.mlp.c_proj.bias": (C,),
        })
    return shapes


def check_weights(sd: dict[str, torch.Tensor], cfg: GPTConfig, n_positions: int, path: Path) -> None:
    """Every tensor config.json implies is in ``sd`` with that shape, and nothing else is (PretrainedError)."""
    expected = _expected_shapes(cfg, n_positions)
    optional = {"lm_head.weight": (cfg.vocab_size, cfg.emb_dim)}  # present only when the head is not tied
    missing = [k for k in expected if k not in sd]
    if missing:
        raise PretrainedError(f"{path} has no {missing[0]} ({len(missing)} tensors missing) — config.json "
                              f"describes {cfg.n_layers} layers of width {cfg.emb_dim}: is it another model's "
                              "config.json, or a truncated download?")
    unknown = [k for k in sd if k not in expected and k not in optional]
    if unknown:
        raise PretrainedError(f"{path} has {unknown[0]}, which config.json does not describe ({len(unknown)} "
                              "unexpected tensors) — is config.json another model's?")
    for key, shape in {**expected, **optional}.items():
        if key in sd and tuple(sd[key].shape) != shape:
            raise PretrainedError(f"{key} in {path} has shape {tuple(sd[key].shape)}, but config.json implies "
                                  f"{shape} — the weights and config.json are from different models")


def _linear(w: torch.Tensor) -> torch.Tensor:
    """A Conv1D weight (in, out) as an nn.Linear weight (out, in): its transpose, in memory of its own that keeps
    the (in, out) order minigpt's Linear layers are stored in (``model.input_major``)."""
    return w.contiguous().t()


def _convert(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT-2's tensors (checked by ``check_weights``) -> minigpt's state dict. Pops from ``sd`` as it goes, so a
    large model is not held twice in memory."""
    C = cfg.emb_dim
    ours = {}
    wte = sd.pop("wte.weight")  # (V, C)
    ours["tok_emb.weight"] = wte
    # GPT-2 ties its head to the token embedding (logits = x @ wte.T). minigpt keeps them as two parameters with
    # the same starting values: every checkpoint, the original notebook's model.pth, the optimizer's groups and resuming
    # assume two tensors, and a tie would not survive any of them. Fine-tuning lets the two drift apart, and
    # costs V x C more parameters (38.6M for GPT-2's vocabulary at width 768). The clone matters: two
    # parameters sharing one tensor would each be updated by the optimizer, twice per step on the same memory.
    ours["out_head.weight"] = sd.pop("lm_head.weight", wte).t().contiguous().t()  # a copy, (C, V) in memory
    ours["pos_emb.weight"] = sd.pop("wpe.weight")[: cfg.context_length].clone()  # (T, C): a shorter context
    for i in range(cfg.n_layers):
        g, m = f"h.{i}.", f"trf_blocks.{i}."
        # c_attn: x @ W with W (C, 3C) = [W_q | W_k | W_v] -> three nn.Linear weights (C, C)
        q, k, v = sd.pop(g + "attn.c_attn.weight").split(C, dim=1)
        qb, kb, vb = sd.pop(g + "attn.c_attn.bias").split(C, dim=0)
        for name, w, b in (("W_query", q, qb), ("W_key", k, kb), ("W_value", v, vb)):
            ours[m + f"att.{name}.weight"] = _linear(w)
            ours[m + f"att.{name}.bias"] = b.clone()
        for gpt2_name, our_name in (("attn.c_proj", "att.out_proj"), ("mlp.c_fc", "ff.layers.0"),
                                    ("mlp.c_proj", "ff.layers.2")):
            ours[m + our_name + ".weight"] = _linear(sd.pop(g + gpt2_name + ".weight"))
            ours[m + our_name + ".bias"] = sd.pop(g + gpt2_name + ".bias")
        for gpt2_name, our_name in (("ln_1", "norm1"), ("ln_2", "norm2")):
            ours[m + our_name + ".scale"] = sd.pop(g + gpt2_name + ".weight")
            ours[m + our_name + ".shift"] = sd.pop(g + gpt2_name + ".bias")
    ours["final_norm.scale"] = sd.pop("ln_f.weight")
    ours["final_norm.shift"] = sd.pop("ln_f.bias")
    # minigpt computes in float32 (autocast makes bf16/fp16 copies where it runs); GPT-2's files are float32
    return {k: v.float() for k, v in ours.items()}


# ---------------------------------------------------------------------------------------------------------------
# The model, and the tokenizer it needs


def from_pretrained(name_or_path: str | os.PathLike, kernels: str | object = "auto", **overrides) -> GPTModel:
    """A GPTModel holding GPT-2's weights, on the CPU, in float32 and in eval mode (as Hugging Face's
    ``from_pretrained``; call ``.train()`` to fine-tune).

    ``name_or_path``: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" (Hugging Face hub; its cache offline), or a
    folder in Hugging Face's GPT-2 format. ``overrides``: ``drop_rate`` (default: config.json's resid_pdrop, 0.1
    for GPT-2) and ``context_length`` (at most n_positions; the position embedding keeps its first rows).
    Raises PretrainedError (files, hub) or ConfigError (overrides), each one line naming the fix.
    """
    folder = find_folder(name_or_path)
    hf = read_hf_config(folder)
    cfg = config_from_hf(hf, str(name_or_path), **overrides)
    sd, path = read_weights(folder)
    full = cfg.with_overrides(context_length=hf["n_positions"])  # what the file must hold: every position
    check_weights(sd, full, hf["n_positions"], path)
    state = _convert(sd, cfg)
    # Built on the meta device (shapes, no memory, no random init: the file provides every value), then the
    # loaded tensors become the parameters themselves (assign=True) instead of being copied into fresh ones.
    with torch.device("meta"):
        model = GPTModel(cfg, kernels=kernels)
    model.load_state_dict(state, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # a tensor GPTModel creates that no file provides (e.g. a new buffer): it must be made here
        raise PretrainedError(f"{left[0]} is not in GPT-2's weights and from_pretrained does not create it — "
                              "initialise it in minigpt/pretrained.py")
    return model.eval()


def gpt2_tokenizer():
    """GPT-2's BPE tokenizer (tiktoken), which every GPT-2 model needs; TokenizerError when tiktoken's files
    cannot be loaded. There is no fallback: the byte tokenizer's ids mean nothing to GPT-2's weights."""
    from .tokenizer import TokenizerError, tokenizer_from_name

    try:
        return tokenizer_from_name("gpt2")
    except TokenizerError as e:
        reason = str(e).split(" — ")[0]  # its fix offers the byte tokenizer, which a GPT-2 model cannot use
        raise TokenizerError(f"GPT-2's weights need GPT-2's BPE tokenizer, and tiktoken's files for it cannot be "
                             f"loaded ({reason}) — run once with internet access and TIKTOKEN_CACHE_DIR set, so that "
                             "tiktoken keeps them there, or point TIKTOKEN_CACHE_DIR at a copy of such a cache "
                             "(README 'Offline')") from None
