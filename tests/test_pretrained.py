"""GPT-2's weights in minigpt, checked against Hugging Face transformers' own GPT-2 (an independent implementation).

Small random GPT-2s are saved by transformers in GPT-2's format, loaded with ``GPTModel.from_pretrained``, and
must give transformers' logits and greedy tokens. Everything runs offline: no hub, no tiktoken download.
"""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from minigpt import GPTModel  # noqa: E402
from minigpt.config import ConfigError  # noqa: E402
from minigpt.generate import generate  # noqa: E402
from minigpt.pretrained import PretrainedError, gpt2_tokenizer  # noqa: E402
from minigpt.tokenizer import TokenizerError  # noqa: E402
from minigpt.train import build_parser, main, train  # noqa: E402
from tests.data_helpers import small_bpe  # noqa: E402

SHAPE = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64)
SMALL_VOCAB = 265  # small_bpe(): 256 bytes + 8 merges + end-of-text


def make_hf_model(vocab_size: int, seed: int = 0):
    """A random GPT-2 of SHAPE. initializer_range 0.2 (GPT-2: 0.02) spreads the logits, so that greedy picks are
    not near-ties that rounding could flip. No end-of-text id: generation runs for every token asked."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, initializer_range=0.2, bos_token_id=None,
                                  eos_token_id=None, **SHAPE)
    return transformers.GPT2LMHeadModel(cfg).eval()


def save_as_bin(hf, folder):
    """The layout of the hub's original pytorch_model.bin: keys without "transformer.", the causal-mask buffers
    included, no lm_head (tied). (transformers 5 saves only safetensors, so the file is written by hand.)"""
    folder.mkdir(parents=True)
    sd = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, folder / "pytorch_model.bin")
    hf.config.to_json_file(folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def gpt2_vocab(tmp_path_factory):
    """(transformers model, its save_pretrained folder) with GPT-2's full vocabulary."""
    hf = make_hf_model(50257)
    folder = tmp_path_factory.mktemp("gpt2-vocab")
    hf.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return hf, folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(transformers model, safetensors folder, pytorch_model.bin folder) with small_bpe()'s vocabulary."""
    hf = make_hf_model(SMALL_VOCAB, seed=1)
    st = tmp_path_factory.mktemp("small-st")
    hf.save_pretrained(st)
    return hf, st, save_as_bin(hf, tmp_path_factory.mktemp("small-bin") / "model")


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------------------------------------------
# The same model as transformers'


def test_logits_match_transformers_with_gpt2_vocabulary(gpt2_vocab):
    hf, folder = gpt2_vocab
    model = GPTModel.from_pretrained(folder, kernels="torch")
    assert not model.training  # eval mode, as transformers' from_pretrained
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)
    assert ours.dtype == torch.float32
    assert (ours - hf_logits(hf, idx)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_both_file_formats_load_the_same_model(small, fmt):
    hf, st, bin_folder = small
    model = GPTModel.from_pretrained(st if fmt == "safetensors" else bin_folder, kernels="torch")
    idx = torch.randint(0, SMALL_VOCAB, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-4


def test_config_head_and_dropout(small):
    hf, folder, _ = small
    model = GPTModel.from_pretrained(folder, kernels="torch")
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.qkv_bias) == \
           (SMALL_VOCAB, 64, 64, 4, 2, True)
    assert cfg.drop_rate == hf.config.resid_pdrop == 0.1  # GPT-2's rate unless overridden
    # the head starts as the token embedding (GPT-2 ties them) but is its own parameter, in its own memory
    assert torch.equal(model.out_head.weight, model.tok_emb.weight)
    assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    assert len(list(model.parameters())) == len(model.state_dict())
    assert GPTModel.from_pretrained(folder, kernels="torch", drop_rate=0.0).cfg.drop_rate == 0.0


def test_greedy_tokens_match_transformers_generate(gpt2_vocab):
    hf, folder = gpt2_vocab
    model = GPTModel.from_pretrained(folder, kernels="torch")
    prompt = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(2))
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                         pad_token_id=0)
    ours = generate(model, prompt, 40, context_length=model.cfg.context_length)  # temperature 0: greedy
    assert ours.shape == (2, 46)
    assert ours.tolist() == theirs.tolist()


def test_shorter_context_crops_the_position_embedding(small):
    hf, folder, _ = small
    model = GPTModel.from_pretrained(folder, kernels="torch", context_length=16)
    assert model.cfg.context_length == 16 and model.pos_emb.weight.shape == (16, 64)
    idx = torch.randint(0, SMALL_VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-4


def test_sharded_safetensors_load(small, tmp_path):
    hf, _, _ = small
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = GPTModel.from_pretrained(tmp_path / "sharded", kernels="torch")
    idx = torch.randint(0, SMALL_VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line that names the problem and the fix


def one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


@pytest.mark.parametrize("override, parts", [
    (dict(emb_dim=32), ["emb_dim=32 contradicts", "emb_dim 64"]),
    (dict(n_heads=8), ["n_heads=8 contradicts"]),
    (dict(n_layers=3), ["n_layers=3 contradicts"]),
    (dict(vocab_size=50257), ["vocab_size=50257 contradicts"]),
    (dict(qkv_bias=False), ["qkv_bias=False contradicts"]),
    (dict(context_length=65), ["context_length=65 is longer than the 64 positions", "at most 64"]),
    (dict(dropout=0.2), ["unknown override 'dropout'", "drop_rate and context_length"]),
])
def test_overrides_that_contradict_the_weights(small, override, parts):
    with pytest.raises(ConfigError) as e:
        GPTModel.from_pretrained(small[1], kernels="torch", **override)
    one_line(e, *parts)


def test_overrides_that_repeat_the_weights_are_fine(small):
    model = GPTModel.from_pretrained(small[1], kernels="torch", emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)
    assert model.cfg.emb_dim == 64


def test_folder_without_weights_or_config(small, tmp_path):
    _, folder, _ = small
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(folder / "config.json", no_weights)
    with pytest.raises(PretrainedError) as e:
        GPTModel.from_pretrained(no_weights)
    one_line(e, f"no weights in {no_weights}", "model.safetensors or pytorch_model.bin")
    (no_weights / "flax_model.msgpack").write_bytes(b"\x00")  # another framework's format
    with pytest.raises(PretrainedError) as e:
        GPTModel.from_pretrained(no_weights)
    one_line(e, "flax_model.msgpack: another format")
    no_config = copy_folder(folder, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    with pytest.raises(PretrainedError) as e:
        GPTModel.from_pretrained(no_config)
    one_line(e, f"no config.json in {no_config}")
    with pytest.raises(PretrainedError) as e:
        GPTModel.from_pretrained(folder / "model.safetensors")
    one_line(e, "is a file", "pass the folder")


@pytest.mark.parametrize("changes, parts", [
    (dict(n_embd=128, n_head=4), ["wte.weight in", "has shape (265, 64)", "implies (265, 128)"]),
    (dict(vocab_size=300), ["has shape (265, 64)", "implies (300, 64)"]),
    (dict(n_positions=128), ["wpe.weight", "implies (128, 64)"]),
    (dict(n_layer=3), ["has no h.2.", "3 layers"]),
    (dict(n_layer=1), ["has h.1.", "config.json does not describe"]),
])
def test_weights_that_disagree_with_config_json(small, tmp_path, changes, parts):
    folder = copy_folder(small[1], tmp_path / "m")
    edit_config(folder, **changes)
    with pytest.raises(PretrainedError) as e:
        GPTModel.from_pretrained(folder, kernels="torch")
    one_line(e, str(folder / "model.safetensors"), *parts)


@pytest.mark.parametrize("changes, parts", [
    (dict(activation_function="relu"), ["activation_function 'relu'", "not a GPT-2 model it can load"]),
    (dict(layer_norm_epsilon=1e-6), ["layer_norm_epsilon 1e-06", "minigpt's LayerNorm uses 1e-05"]),
    (dict(model_type="llama"), ["model_type 'llama'"]),
    (dict(n_inner=100), ["n_inner 100"]),
])
def test_config_json_of_a_model_minigpt_does_not_compute(small, tmp_path, changes, parts):
    folder = copy_folder(small[1], tmp_path / "m")
    edit_config(folder, **changes)
    with pytest.raises(PretrainedError) as e:
        GPTModel.from_pretrained(folder)
    one_line(e, *parts)


@pytest.mark.parametrize("changes, parts", [
    (dict(n_head=5), ["has n_embd 64 and n_head 5, but the width must split evenly into the heads", "restore it"]),
    (dict(n_layer=0), ["has n_layer 0, but a model needs at least 1", "restore it"]),
    (dict(n_head=True), ["has no integer 'n_head'"]),
    (dict(resid_pdrop=1.5), ["has resid_pdrop 1.5, not a dropout rate in [0, 1)"]),
    (dict(resid_pdrop="0.1"), ["has resid_pdrop '0.1', not a dropout rate"]),
])
def test_a_config_json_no_model_can_have_names_the_file_not_a_flag(small, tmp_path, changes, parts):
    folder = copy_folder(small[1], tmp_path / "m")
    edit_config(folder, **changes)
    with pytest.raises(PretrainedError) as e:  # GPTConfig's own message suggested --n-heads, which no loader takes
        GPTModel.from_pretrained(folder, kernels="torch")
    one_line(e, str(folder / "config.json"), *parts)
    assert "--n-heads" not in str(e.value)


def test_config_json_heads_that_do_not_divide_the_width_from_the_command_lines(small, corpus, tmp_path,
                                                                                 bpe_as_gpt2, capsys):
    from tests.test_generate import cli_error

    folder = copy_folder(small[1], tmp_path / "m")
    edit_config(folder, n_head=5)
    msg = cli_error(["--pretrained", str(folder), "--device", "cpu", "--kernels", "torch"], capsys)
    assert msg.startswith(f"error: {folder / 'config.json'} has n_embd 64 and n_head 5") and "--n-heads" not in msg
    with pytest.raises(SystemExit) as e:
        main(finetune_args(corpus, folder, tmp_path / "out"))
    one_line(e, f"error: {folder / 'config.json'} has n_embd 64 and n_head 5")
    assert "--n-heads" not in str(e.value)


def test_damaged_files(small, tmp_path):
    folder = copy_folder(small[1], tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(PretrainedError) as e:
        GPTModel.from_pretrained(folder)
    one_line(e, "is not a readable weights file")
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(PretrainedError) as e:
        GPTModel.from_pretrained(folder)
    one_line(e, "is not valid JSON")


def test_a_pickle_is_never_run(small, tmp_path):
    folder = copy_folder(small[2], tmp_path / "m")
    torch.save({"h.0.ln_1.weight": torch.ones(64), "payload": print}, folder / "pytorch_model.bin")
    with pytest.raises(PretrainedError) as e:  # torch.load(weights_only=True) refuses the function
        GPTModel.from_pretrained(folder)
    one_line(e, "is not a readable weights file")


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_shard_index_cannot_name_a_file_outside_its_folder(small, tmp_path, where):
    hf, _, _ = small
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="100KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "outside").mkdir()
    shutil.move(folder / shard, tmp_path / "outside" / shard)  # a whole, readable shard: only its place is wrong
    entry = f"../outside/{shard}" if where == "parent" else str(tmp_path / "outside" / shard)
    index["weight_map"] = {k: entry if v == shard else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(PretrainedError) as e:
        GPTModel.from_pretrained(folder, kernels="torch")
    one_line(e, f"{index_path} lists the shard {entry!r}, which is outside {folder}", "restore the index file")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_weights_that_are_not_finite(small, tmp_path, value):
    from safetensors.torch import load_file, save_file

    folder = copy_folder(small[1], tmp_path / "m")
    sd = load_file(folder / "model.safetensors")
    key = next(k for k in sd if k.endswith("h.1.mlp.c_fc.weight"))
    sd[key][3, 5] = value  # one value among 16384
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PretrainedError) as e:
        GPTModel.from_pretrained(folder, kernels="torch")
    one_line(e, f"h.1.mlp.c_fc.weight in {folder / 'model.safetensors'} holds NaN or infinite values",
             "download it again")


def test_unknown_name_and_the_hub_offline(tmp_path, monkeypatch):
    with pytest.raises(PretrainedError) as e:
        GPTModel.from_pretrained("gpt3")
    one_line(e, "'gpt3' is neither a GPT-2 model name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) nor a folder")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(PretrainedError) as e:
        GPTModel.from_pretrained("gpt2-medium")
    one_line(e, "gpt2-medium's weights are not in the Hugging Face cache and the hub cannot be reached",
             "run once with internet access", "pass a local folder")


def test_gpt2_tokenizer_missing_is_one_line_with_no_byte_fallback(tmp_path, monkeypatch):
    import minigpt.tokenizer as T

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-tiktoken-cache"))
    monkeypatch.setattr(T, "can_reach", lambda url, timeout=0: False)
    with pytest.raises(TokenizerError) as e:
        gpt2_tokenizer()
    one_line(e, "GPT-2's weights need GPT-2's BPE tokenizer", "TIKTOKEN_CACHE_DIR", "README 'Offline'")
    assert "bytes" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# python -m minigpt.train --init-from FOLDER


@pytest.fixture
def bpe_as_gpt2(monkeypatch):
    """GPT-2's tiktoken files cannot be downloaded here: small_bpe() stands in for them, under the name gpt2,
    so the real path (gpt2_tokenizer -> tokenizer_from_name -> tiktoken encoding) runs."""
    import minigpt.tokenizer as T

    encoding = small_bpe().encoding
    monkeypatch.setattr(T, "_load_gpt2_encoding", lambda: encoding)
    return encoding


@pytest.fixture
def corpus(tmp_path):
    from minigpt.stories import generate_stories

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(generate_stories(60)), encoding="utf-8")
    return path


def finetune_args(corpus, folder, out, *extra):
    return ["--data", str(corpus), "--init-from", str(folder), "--context-length", "32", "--batch-size", "4",
            "--eval-iters", "2", "--no-progress", "--device", "cpu", "--kernels", "torch", "--out-dir", str(out),
            *extra]


def test_init_from_folder_fine_tunes_records_its_source_and_resumes(small, corpus, tmp_path, bpe_as_gpt2, capsys):
    from minigpt.train import Trainer

    _, folder, _ = small
    out = tmp_path / "out"
    args = build_parser().parse_args(finetune_args(corpus, folder, out, "--max-steps", "6", "--eval-interval", "3",
                                                   "--lr", "1e-3"))
    trainer = Trainer(args)
    trainer.setup()
    # the run starts from the pretrained weights, cropped to 32 positions, with GPT-2's tokenizer
    start = GPTModel.from_pretrained(folder, kernels="torch", context_length=32).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in trainer.raw_model.state_dict().items())
    assert trainer.raw_model.training and trainer.tokenizer.name == "gpt2" and args.lr == 1e-3
    summary = trainer.fit()
    rows = summary["metrics"]
    assert [r["step"] for r in rows] == [0, 3, 6] and rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert "initialised from" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["init_from"] == str(folder.resolve()) and ckpt["tokenizer"] == "gpt2"
    assert ckpt["config"]["context_length"] == 32 and ckpt["config"]["qkv_bias"] is True

    # resuming with the same --init-from continues the run (the weights are the checkpoint's)
    resumed = train(build_parser().parse_args(finetune_args(corpus, folder, out, "--max-steps", "8",
                                                            "--resume", "auto")))
    assert resumed["steps"] == 8
    assert torch.load(out / "checkpoint.pt", weights_only=True)["init_from"] == str(folder.resolve())
    # ... a different one contradicts it, and a fresh run refuses to replace it
    with pytest.raises(SystemExit) as e:
        main(finetune_args(corpus, small[2], out, "--max-steps", "10", "--resume", "auto"))
    one_line(e, f"error: --init-from {small[2]} contradicts", f"initialised from {folder.resolve()}")
    with pytest.raises(SystemExit) as e:
        main(finetune_args(corpus, folder, out, "--max-steps", "10"))
    one_line(e, "already holds a checkpoint at step 8")


def test_default_fine_tuning_settings(small, corpus, tmp_path, bpe_as_gpt2):
    from minigpt.train import Trainer
    from minigpt.train_config import FINETUNE_DEFAULTS

    args = build_parser().parse_args(["--data", str(corpus), "--init-from", str(small[1]), "--device", "cpu",
                                      "--kernels", "torch", "--no-progress", "--out-dir", str(tmp_path / "o"),
                                      "--batch-size", "2"])
    trainer = Trainer(args)
    trainer.setup()  # no GPU and no --preset, but not the CPU demo: the model is the pretrained one
    config = trainer.config
    assert config.lr == FINETUNE_DEFAULTS["lr"] and config.max_steps is None and config.max_docs is None
    assert trainer.cfg.context_length == 64 and trainer.cfg.drop_rate == 0.1 and trainer.preset is None


@pytest.mark.parametrize("flag, parts", [
    (["--emb-dim", "32"], ["--emb-dim 32 contradicts --init-from", "emb_dim 64"]),
    (["--n-heads", "2"], ["--n-heads 2 contradicts --init-from"]),
    (["--n-layers", "1"], ["--n-layers 1 contradicts --init-from"]),
    (["--context-length", "128"], ["--context-length 128 is longer than the 64 positions"]),
    (["--preset", "tiny"], ["--preset tiny contradicts --init-from", "emb_dim 64"]),
    (["--preset", "gpt2"], ["--preset gpt2 contradicts --init-from", "emb_dim 64"]),
    (["--tokenizer", "bytes"], ["--tokenizer bytes contradicts --init-from", "GPT-2's tokenizer"]),
    (["--drop-rate", "1.5"], ["--drop-rate must be in [0, 1)"]),
])
def test_init_from_flags_that_contradict_the_weights(small, corpus, tmp_path, bpe_as_gpt2, flag, parts):
    with pytest.raises(SystemExit) as e:
        main(finetune_args(corpus, small[1], tmp_path / "out", *flag))
    assert str(e.value).startswith("error: ")
    one_line(e, *parts)


def test_init_from_needs_gpt2s_tokenizer_and_vocabulary(small, gpt2_vocab, corpus, tmp_path, monkeypatch):
    import minigpt.tokenizer as T

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-tiktoken-cache"))
    monkeypatch.setattr(T, "can_reach", lambda url, timeout=0: False)
    with pytest.raises(SystemExit) as e:  # offline, no tiktoken files: an error, never the byte tokenizer
        main(finetune_args(corpus, small[1], tmp_path / "out"))
    one_line(e, "error: GPT-2's weights need GPT-2's BPE tokenizer", "TIKTOKEN_CACHE_DIR")
    monkeypatch.setattr(T, "_load_gpt2_encoding", lambda: small_bpe().encoding)
    with pytest.raises(SystemExit) as e:  # a tokenizer whose vocabulary is not the model's
        main(finetune_args(corpus, gpt2_vocab[1], tmp_path / "out"))
    one_line(e, "has vocab_size 50257, but GPT-2's tokenizer has 265 tokens")


def test_resume_of_a_run_from_scratch_refuses_init_from(small, tmp_path, bpe_as_gpt2):
    from tests.test_train import TINY

    out = str(tmp_path / "out")
    main(TINY + ["--out-dir", out, "--max-steps", "2", "--eval-interval", "2"])
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out-dir", out, "--max-steps", "4", "--resume", "auto", "--init-from", str(small[1])])
    one_line(e, "--init-from", "contradicts", "trained from scratch")


# ---------------------------------------------------------------------------------------------------------------
# python -m minigpt.generate --pretrained FOLDER


def test_generate_cli_with_pretrained_weights_prints_transformers_greedy_text(small, bpe_as_gpt2, capsys):
    from minigpt.generate import main as generate_main

    hf, folder, _ = small
    prompt = "the band and the"
    ids = bpe_as_gpt2.encode_ordinary(prompt)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)[0, len(ids):]
    eot = bpe_as_gpt2.eot_token
    expected = theirs.tolist()[: theirs.tolist().index(eot)] if eot in theirs.tolist() else theirs.tolist()
    for cache in ([], ["--no-cache"]):
        generate_main(["--pretrained", str(folder), "--prompt", prompt, "--max-new-tokens", "12", "--temperature",
                       "0", "--device", "cpu", "--kernels", "torch", *cache])
        assert capsys.readouterr().out == prompt + bpe_as_gpt2.decode(expected) + "\n"


@pytest.mark.parametrize("flags, match", [
    (["--preset", "tiny"], "--preset and --pretrained both name a model"),
    (["--checkpoint", "x.pt"], "--checkpoint and --pretrained both name a model"),
    (["--tokenizer", "bytes"], "GPT-2's weights need GPT-2's tokenizer"),
])
def test_generate_cli_pretrained_bad_input(small, bpe_as_gpt2, flags, match, capsys):
    from tests.test_generate import cli_error

    assert match in cli_error(["--pretrained", str(small[1]), "--device", "cpu", *flags], capsys)


def test_generate_cli_pretrained_needs_gpt2s_vocabulary(gpt2_vocab, bpe_as_gpt2, capsys):
    from tests.test_generate import cli_error

    assert "has vocab_size 50257, GPT-2's tokenizer 265 tokens" in cli_error(
        ["--pretrained", str(gpt2_vocab[1]), "--device", "cpu"], capsys)


# ---------------------------------------------------------------------------------------------------------------
# The triton backend, its kernels imported for the first time inside from_pretrained

# Run in a fresh Python: from_pretrained builds its model under ``with torch.device("meta")``, and the triton backend's
# modules are imported there when nothing imported them before. A tensor made at their import would be a meta
# tensor, and the logits garbage; in this test process earlier tests have imported them already, which hides that.
TRITON_FIRST = """
import os
import sys
import torch

from minigpt.pretrained import from_pretrained

folder, out = sys.argv[1], sys.argv[2]
assert "kernels.triton_backend" not in sys.modules, "the triton backend was imported before from_pretrained"
device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
idx = torch.randint(0, {vocab}, (2, 24), generator=torch.Generator().manual_seed(5)).to(device)
logits = {{}}
for kernels in ("triton", "torch"):  # triton first: its modules are imported inside this call
    model = from_pretrained(folder, kernels=kernels).to(device)
    if kernels == "triton":
        assert "kernels.attention" in sys.modules
    with torch.no_grad():
        logits[kernels] = model(idx).cpu()
torch.save(logits, out)
"""


def run_fresh_python(script, *args):
    """``script`` in a new interpreter at the repository root, with Triton's interpreter where there is no GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # as tests/conftest.py does, before anything imports Triton
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_triton_backend_loads_gpt2_weights_like_the_torch_backend(small, tmp_path):
    pytest.importorskip("triton")
    _, folder, _ = small
    run_fresh_python(TRITON_FIRST.format(vocab=SMALL_VOCAB), folder, tmp_path / "logits.pt")
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.isfinite(logits["triton"]).all()
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)


TRAIN_TRITON_FIRST = """
import sys
import torch

import minigpt.tokenizer as T
from minigpt.train import build_parser, train
from tests.data_helpers import small_bpe

corpus, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
assert "kernels.triton_backend" not in sys.modules, "the triton backend was imported before the run"
encoding = small_bpe().encoding
T._load_gpt2_encoding = lambda: encoding  # GPT-2's tiktoken files cannot be downloaded here (see bpe_as_gpt2)
runs = {{}}
for kernels in ("triton", "torch"):  # triton first: its modules are imported inside from_pretrained
    args = build_parser().parse_args([
        "--data", corpus, "--init-from", folder, "--kernels", kernels, "--device", "{device}",
        "--out-dir", out + "/" + kernels, "--max-steps", "2", "--eval-interval", "2", "--eval-iters", "1",
        "--context-length", "16", "--batch-size", "2", "--drop-rate", "0", "--no-progress"])
    summary = train(args)
    runs[kernels] = [[row["train_loss"], row["val_loss"]] for row in summary["metrics"]]
torch.save({{k: torch.tensor(v) for k, v in runs.items()}}, out + "/losses.pt")
"""


def test_fine_tuning_on_the_triton_backend_follows_the_torch_backend(small, corpus, tmp_path):
    pytest.importorskip("triton")
    _, folder, _ = small
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_fresh_python(TRAIN_TRITON_FIRST.format(device=device), corpus, folder, tmp_path)
    losses = torch.load(tmp_path / "losses.pt", weights_only=True)
    assert losses["triton"].shape == (2, 2) and torch.isfinite(losses["triton"]).all()  # steps 0 and 2
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-4, atol=1e-4)
    ckpts = {k: torch.load(tmp_path / k / "checkpoint.pt", weights_only=True) for k in ("triton", "torch")}
    assert [ckpts[k]["args"]["kernels"] for k in ckpts] == ["triton", "torch"]
    ours, torch_weights = ckpts["triton"]["model"], ckpts["torch"]["model"]
    assert ours.keys() == torch_weights.keys()
    for name in torch_weights:  # the weights after two optimizer steps
        torch.testing.assert_close(ours[name], torch_weights[name], rtol=1e-4, atol=1e-4, msg=name)
