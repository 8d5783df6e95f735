import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import GPTModel
from minigpt.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from minigpt.generate import MIN_TEMPERATURE, choose_next_token, generate, load_for_inference, main, stream_text
from minigpt.model import notebook_state_dict
from minigpt.tokenizer import ByteTokenizer

CFG = dict(vocab_size=257, context_length=8, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0, qkv_bias=False)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPTModel(CFG, kernels="torch").eval()


def cli_error(argv, capsys) -> str:
    """``main(argv)`` must exit with status 1 and print one line, ``error: ...``, on stderr: that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert e.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (e.value.code, err)
    return lines[0]


def _greedy_by_hand(model, ids, n, context_length):
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids[-context_length:]]))[0, -1]
        ids.append(int(torch.argmax(logits)))
    return ids


def test_greedy_matches_argmax_by_hand_and_crops_the_context(model):
    prompt = torch.randint(0, 257, (1, 11))  # longer than context_length: must be cropped, not fail
    out = generate(model, prompt, 6, context_length=8)
    assert out[0].tolist() == _greedy_by_hand(model, prompt[0].tolist(), 6, 8)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    prompt = torch.randint(0, 257, (2, 3))
    greedy = generate(model, prompt, 5, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, prompt, 5, 8, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(generate(model, prompt, 5, 8, temperature=1.0, top_p=1e-9, generator=g), greedy)


def test_sampling_is_seeded_and_respects_top_k(model):
    prompt = torch.randint(0, 257, (1, 3))
    a = generate(model, prompt, 8, 8, temperature=1.5, top_k=5, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 8, 8, temperature=1.5, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # every sampled token is among the 5 most likely at its step
    for t in range(3, a.shape[1]):
        with torch.no_grad():
            logits = model(a[:, max(0, t - 8):t])[0, -1]
        assert a[0, t].item() in torch.topk(logits, 5).indices.tolist()


def test_stops_at_end_of_text(model):
    prompt = torch.randint(0, 257, (1, 3))
    first = generate(model, prompt, 1, 8)[0, -1].item()
    out = generate(model, prompt, 20, 8, eos_id=first)
    assert out.shape[1] == 4


def _save_ckpt(model, path, tokenizer="bytes"):
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": model.state_dict(),
                "config": model.cfg.to_dict(), "tokenizer": tokenizer, "step": 0}, path)


def test_cli_generates_from_our_checkpoint_and_a_notebook_model_pth(model, tmp_path, capsys):
    _save_ckpt(model, tmp_path / "checkpoint.pt")
    main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--prompt", "Hi", "--max-new-tokens", "5",
          "--temperature", "0", "--device", "cpu"])
    new = _greedy_by_hand(model, list(b"Hi"), 5, 8)[2:]
    if 256 in new:  # generation stops at end-of-text, which is not printed
        new = new[: new.index(256)]
    out = capsys.readouterr().out
    assert out == "Hi" + bytes(new).decode("utf-8", errors="replace") + "\n"
    torch.save(notebook_state_dict(model), tmp_path / "model.pth")
    main(["--checkpoint", str(tmp_path / "model.pth"), "--prompt", "Hi", "--max-new-tokens", "5",
          "--temperature", "0", "--n-heads", "2", "--tokenizer", "bytes", "--device", "cpu"])
    out2 = capsys.readouterr().out
    assert out2 == out  # same weights, same greedy text, whichever file they came from


@pytest.mark.parametrize("case, match", [
    ("missing", "no checkpoint at"),
    ("truncated", "not a readable checkpoint"),
    ("mismatch", "has no trf_blocks.1.att.W_query.weight (13 tensors missing) — the file is damaged"),
    ("folder", "is a folder"),
])
def test_bad_checkpoints_get_one_line_errors(model, tmp_path, case, match, capsys):
    path = tmp_path / "checkpoint.pt"
    if case == "truncated":
        _save_ckpt(model, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "mismatch":
        _save_ckpt(model, path)
        ckpt = torch.load(path, weights_only=True)
        ckpt["config"]["n_layers"] = 2  # claims two blocks, holds one
        torch.save(ckpt, path)
    elif case == "folder":
        path = tmp_path
    msg = cli_error(["--checkpoint", str(path), "--device", "cpu", "--max-new-tokens", "1"], capsys)
    assert match in msg


def _plain_model_pth(path, **cfg):
    torch.manual_seed(0)
    model = GPTModel({**CFG, **cfg}, kernels="torch").eval()
    torch.save(notebook_state_dict(model), path)
    return model


def test_a_preset_that_does_not_fit_the_weights_is_refused_with_the_one_that_does(tmp_path, capsys):
    from minigpt.config import PRESETS

    tiny = PRESETS["tiny"]
    path = tmp_path / "model.pth"
    model = _plain_model_pth(path, emb_dim=tiny.emb_dim, n_layers=tiny.n_layers, n_heads=tiny.n_heads,
                             context_length=tiny.context_length)
    common = ["--checkpoint", str(path), "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"]
    for wrong in ("small", "large"):  # large: same layers' shapes would load with 16 heads instead of 4
        msg = cli_error(common + ["--preset", wrong], capsys)
        assert msg.startswith(f"error: --preset {wrong} (") and "does not fit" in msg and msg.endswith(
            "use --preset tiny") and "\n" not in msg
    outputs = []
    for right in ([], ["--preset", "tiny"], ["--n-heads", str(tiny.n_heads)]):
        main(common + right)
        outputs.append(capsys.readouterr().out)
    new = _greedy_by_hand(model, list(b"Once upon a time"), 3, tiny.context_length)[16:]
    if 256 in new:
        new = new[: new.index(256)]
    assert outputs == ["Once upon a time" + bytes(new).decode("utf-8", errors="replace") + "\n"] * 3


def test_a_shape_no_preset_has_needs_n_heads(tmp_path, capsys):
    path = tmp_path / "model.pth"
    _plain_model_pth(path)  # emb_dim 32, 1 layer: no preset
    for flags, match in (([], "no preset has that shape — pass --n-heads"),
                         (["--preset", "tiny"], "no preset has that shape: pass --n-heads"),
                         (["--n-heads", "3"], "divisible by n_heads")):
        assert re.search(match, cli_error(["--checkpoint", str(path), "--device", "cpu", "--max-new-tokens", "1",
                                           *flags], capsys))


def test_a_checkpoint_refuses_a_preset_or_heads_it_does_not_have(model, tmp_path, capsys):
    _save_ckpt(model, tmp_path / "checkpoint.pt")
    for flags, match in ((["--preset", "small"], "--preset small does not fit"),
                         (["--n-heads", "4"], "--n-heads 4 does not fit .* which has 2 heads")):
        assert re.search(match, cli_error(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--device", "cpu",
                                           "--max-new-tokens", "1", *flags], capsys))


@pytest.mark.parametrize("flags, match", [
    (["--top-k", "-3"], "--top-k must be >= 0"),
    (["--seed", "99999999999999999999"], "--seed must be between 0 and 2\\*\\*63 - 1"),
    (["--top-p", "1.5"], "--top-p must be in"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
])
def test_bad_sampling_flags_are_one_line(model, tmp_path, flags, match, capsys):
    _save_ckpt(model, tmp_path / "checkpoint.pt")
    assert re.search(match, cli_error(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--device", "cpu", *flags],
                                      capsys))


@pytest.mark.parametrize("flag, value", [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
    ("--temperature", "1e-40"),  # the logits / 1e-40 overflow to inf in float32: softmax gave NaN probabilities
    ("--temperature", "1e-5"),
    ("--top-p", "nan"), ("--top-p", "inf"), ("--top-p", "0"), ("--top-p", "1.5"),
])
def test_a_float_flag_that_is_not_finite_or_out_of_range_is_refused_before_loading(tmp_path, flag, value, capsys):
    # no checkpoint exists: a flag checked only after loading would get the missing file's error instead
    msg = cli_error(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--device", "cpu", f"{flag}={value}"], capsys)
    assert msg.startswith(f"error: {flag} must be ") and msg.endswith(f", got {float(value)}")


def test_the_smallest_temperature_samples_without_nan():
    logits = torch.tensor([[0.0, 30.0, 30.0 - 1e-3]])  # divided by 1e-4, the gap of 1e-3 weighs e^10 to 1
    ids = choose_next_token(logits, MIN_TEMPERATURE, generator=torch.Generator().manual_seed(0))
    assert ids.item() == 1


def test_a_temperature_error_from_the_command_line_is_one_line_without_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minigpt.generate", "--checkpoint", str(tmp_path / "checkpoint.pt"),
                        "--device", "cpu", "--temperature", "nan"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert r.stderr.splitlines() == ["error: --temperature must be a finite number >= 0.0001 or 0 (greedy), got nan"]


def test_greedy_says_which_sampling_flags_do_nothing(model, tmp_path, capsys):
    _save_ckpt(model, tmp_path / "checkpoint.pt")
    common = ["--checkpoint", str(tmp_path / "checkpoint.pt"), "--device", "cpu", "--max-new-tokens", "2",
              "--prompt", "Hi"]
    main(common + ["--temperature", "0", "--top-k", "5", "--top-p", "0.9", "--num-samples", "2"])
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: --temperature 0 is greedy decoding: --top-k and --top-p have no effect (give a "
                   "--temperature above 0 to sample)",
                   "note: --temperature 0 is greedy decoding: the 2 samples will be the same text"]
    main(common + ["--temperature", "0"])  # nothing asked that greedy ignores: no note
    main(common + ["--top-k", "5"])  # sampling: --top-k is used
    assert capsys.readouterr().err == ""



def test_the_command_line_becomes_one_frozen_config_and_the_flags_stay_as_parsed():
    import dataclasses

    from minigpt.generate import DEFAULT_TOP_K, GenerateConfig, build_parser, resolve_config

    args = build_parser().parse_args(["--temperature", "0", "--top-p", "0.9", "--no-cache"])
    before = vars(args).copy()
    config, notes = resolve_config(args)
    assert vars(args) == before  # read, not written
    assert config == GenerateConfig(temperature=0.0, top_p=0.9, use_cache=False)
    assert config.top_k == DEFAULT_TOP_K and notes == ["--temperature 0 is greedy decoding: --top-p has no effect "
                                                       "(give a --temperature above 0 to sample)"]
    assert resolve_config(build_parser().parse_args(["--top-k", "0"]))[0].top_k is None  # 0: every token
    assert resolve_config(build_parser().parse_args([]))[0] == GenerateConfig()  # the flags' defaults are its own
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 3


# ---------------------------------------------------------------------------------------------------------------
# The KV cache


def _model64(**cfg):
    torch.manual_seed(0)
    return GPTModel({**CFG, "context_length": 16, "n_layers": 2, **cfg}, kernels="torch").double().eval()


def test_cached_forward_in_chunks_equals_one_full_forward():
    from minigpt.model import KVCache

    model = _model64()
    idx = torch.randint(0, 257, (2, 13))
    full = model(idx)  # (2, 13, V): positions 0..12 in one forward, no cache
    cache = KVCache(model.cfg, batch_size=2)
    pieces, start = [], 0
    for size in (5, 1, 3, 1, 1, 2):  # a prefill, decode steps, a chunk: every way a cache is filled
        pieces.append(model(idx[:, start:start + size], kv_cache=cache, input_pos=start))
        start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-12, atol=1e-12)
    # preallocated once, (B, H, context_length, D) per layer, and filled in place
    assert all(k.shape == (2, 2, 16, 16) and k.dtype == torch.float64 for k in cache.keys)
    ptrs = [k.data_ptr() for k in cache.keys]
    model(idx[:, :3], kv_cache=cache, input_pos=13)  # positions 13..15: the cache is full
    assert [k.data_ptr() for k in cache.keys] == ptrs
    with pytest.raises(ValueError, match="17 tokens .16 in the KV cache \\+ 1 new. is longer than context_length"):
        model(idx[:, :1], kv_cache=cache, input_pos=16)


def test_prefill_and_decode_one_are_the_full_forwards_last_positions():
    from minigpt.generate import decode_one, prefill
    from minigpt.model import KVCache

    model = _model64()
    idx = torch.randint(0, 257, (2, 9))
    full = model(idx)  # (2, 9, V)
    cache = KVCache(model.cfg, batch_size=2)
    torch.testing.assert_close(prefill(model, idx[:, :5], cache), full[:, 4], rtol=1e-12, atol=1e-12)
    for pos in range(5, 9):
        torch.testing.assert_close(decode_one(model, idx[:, pos:pos + 1], cache, pos), full[:, pos],
                                   rtol=1e-12, atol=1e-12)


def test_the_cache_writes_where_it_is_told_and_advances_nothing():
    from minigpt.generate import decode_one, prefill
    from minigpt.model import KVCache

    model = _model64()
    idx = torch.randint(0, 257, (1, 6))
    cache = KVCache(model.cfg, batch_size=1)
    prefill(model, idx[:, :5], cache)
    # the same token at the same position twice: the same logits, as no call moved the cache on
    first, again = (decode_one(model, idx[:, 5:], cache, 5) for _ in range(2))
    assert torch.equal(first, again)
    # a new prefill at position 0 starts over in the same buffers, however much was written before
    torch.testing.assert_close(prefill(model, idx[:, :2], cache), model(idx[:, :2])[:, -1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="input_pos 4 is not a position the KV cache can write at: positions "
                                         "0 .. 1 are filled"):
        decode_one(model, idx[:, 5:], cache, 4)  # positions 2 and 3 were never written (since the last prefill)
    with pytest.raises(ValueError, match="needs input_pos >= 0"):
        model(idx[:, :1], kv_cache=cache)
    with pytest.raises(ValueError, match="needs input_pos >= 0"):
        model(idx[:, :1], kv_cache=cache, input_pos=-1)
    with pytest.raises(ValueError, match="pass kv_cache too"):
        model(idx, input_pos=0)
    small = KVCache(model.cfg, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="the KV cache holds 4 positions: 5 new at position 0 do not fit"):
        prefill(model, idx[:, :5], small)


@pytest.mark.parametrize("prompt_len, new", [(3, 6), (5, 30)])  # 5 + 30 > 16: the window slides past the context
def test_cache_gives_the_tokens_of_the_uncached_loop(prompt_len, new):
    model = _model64()
    prompt = torch.randint(0, 257, (2, prompt_len))
    plain = generate(model, prompt, new, 16, use_cache=False)
    assert torch.equal(generate(model, prompt, new, 16), plain)
    assert plain[0].tolist() == _greedy_by_hand(model, prompt[0].tolist(), new, 16)
    sampled = [generate(model, prompt, new, 16, temperature=1.0, top_k=20, use_cache=c,
                        generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert torch.equal(*sampled)


def test_a_decode_step_runs_one_position_through_the_model():
    model = _model64()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True)
    generate(model, torch.randint(0, 257, (1, 4)), 20, 16)  # 4 + 20 > 16
    # the prefill of 4; 12 single steps fill positions 4..15; then each step rebuilds the slid window of 16
    assert seen == [4] + [1] * 12 + [16] * 7
    seen.clear()
    generate(model, torch.randint(0, 257, (1, 4)), 5, 16, use_cache=False)
    assert seen == [4, 5, 6, 7, 8]


def test_streamed_text_is_whole_characters_and_all_of_the_text():
    from minigpt.generate import stream_text
    from minigpt.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    text = "héllo wörld — 日本 🙂"
    pieces = list(stream_text(iter(tok.encode(text) + [tok.eot_token, 65]), tok))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5  # streamed, not all at the end
    assert "".join(stream_text(iter(tok.encode("ab") + [0xC3]), tok)) == "ab\ufffd"  # cut mid-character: shown


def test_cli_with_and_without_the_cache_prints_the_same_text(model, tmp_path, capsys):
    _save_ckpt(model, tmp_path / "checkpoint.pt")
    outs = []
    for flags in ([], ["--no-cache"]):
        main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--prompt", "Hi", "--max-new-tokens", "12",
              "--device", "cpu", "--num-samples", "2", *flags])  # 2 + 12 > 8: slides past the context
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].count("--- sample") == 2


def test_a_prompt_longer_than_the_context_is_cropped_with_a_note(model, tmp_path, capsys):
    _save_ckpt(model, tmp_path / "checkpoint.pt")
    main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--prompt", "a long prompt", "--max-new-tokens", "1",
          "--device", "cpu"])
    assert "note: the prompt is 13 tokens, longer than the model's context of 8: it sees only the last 8" in (
        capsys.readouterr().err)
    assert "--max-new-tokens must be >= 1" in cli_error(["--checkpoint", str(tmp_path / "checkpoint.pt"),
                                                         "--max-new-tokens", "0", "--device", "cpu"], capsys)


# ---------------------------------------------------------------------------------------------------------------
# A run's model.pth: the number of heads, which a state dict does not store


@pytest.fixture(scope="module")
def run_8_heads(tmp_path_factory):
    """The out-dir of `python -m minigpt.train --preset tiny --n-heads 8` (tiny has 4): checkpoint.pt and the
    model.pth beside it, whose shapes are the tiny preset's."""
    from minigpt.train import build_parser, train

    out = tmp_path_factory.mktemp("run") / "out"
    with pytest.MonkeyPatch.context() as mp:  # the token cache stays in pytest's folders (conftest.py)
        mp.setenv("MINIGPT_CACHE", str(out.parent / "token-cache"))
        train(build_parser().parse_args([
            "--data", "stories", "--max-docs", "100", "--tokenizer", "bytes", "--preset", "tiny", "--n-heads", "8",
            "--max-steps", "2", "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2", "--lr", "1e-2",
            "--no-progress", "--device", "cpu", "--kernels", "torch", "--out-dir", str(out)]))
    return out


def _run_logits(out, kernels, idx):
    """Logits of the run's own model, built from the config and weights its checkpoint.pt records."""
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    model = GPTModel(ckpt["config"], kernels=kernels).eval()
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        return model(idx)


IDX = torch.tensor([list(b"Once upon a time")])


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_a_runs_model_pth_gets_the_heads_its_checkpoint_records(run_8_heads, kernels, caplog):
    if kernels == "triton":
        pytest.importorskip("triton")
    model, tok = load_for_inference(str(run_8_heads / "model.pth"), kernels=kernels)
    assert model.cfg.n_heads == 8 and tok.name == "bytes"
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), _run_logits(run_8_heads, kernels, IDX))
    assert "note:" not in caplog.text  # the heads are the run's record, not a guess


def test_a_model_pth_without_its_run_gets_a_presets_heads_only_with_a_note(run_8_heads, tmp_path, caplog):
    alone = tmp_path / "model.pth"
    alone.write_bytes((run_8_heads / "model.pth").read_bytes())
    theirs = _run_logits(run_8_heads, "torch", IDX)
    model, _ = load_for_inference(str(alone), kernels="torch")
    assert model.cfg.n_heads == 4  # tiny's: the guess a notebook-format file of that shape keeps loading with ...
    assert caplog.messages == [f"note: {alone} does not record its number of heads: assuming 4, as the tiny preset "
                               "of its shape has — pass --n-heads if it was trained with another number"]
    with torch.no_grad():
        assert (model(IDX) - theirs).abs().max() > 1e-3  # ... and it is wrong for this run, hence the note
    model, _ = load_for_inference(str(alone), kernels="torch", n_heads=8)
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), theirs)
    # a checkpoint.pt of another model beside it is not its record
    _save_ckpt(GPTModel(CFG, kernels="torch"), tmp_path / "checkpoint.pt")
    caplog.clear()
    assert load_for_inference(str(alone), kernels="torch")[0].cfg.n_heads == 4 and "assuming 4" in caplog.text


def test_flags_that_contradict_the_runs_record_are_refused(run_8_heads, capsys):
    common = ["--checkpoint", str(run_8_heads / "model.pth"), "--device", "cpu", "--max-new-tokens", "1"]
    record = f"the run's {run_8_heads / 'checkpoint.pt'} beside it records its config"
    assert cli_error(common + ["--n-heads", "4"], capsys) == (
        f"error: --n-heads 4 does not fit {run_8_heads / 'model.pth'}, which has 8 heads — drop --n-heads: {record}")
    assert cli_error(common + ["--preset", "small"], capsys).endswith(f"— drop --preset: {record}")
    for repeat in (["--n-heads", "8"], ["--preset", "tiny"]):  # the flags it was trained with are fine
        main(common + repeat)


def test_a_model_pth_of_no_presets_shape_needs_n_heads(tmp_path, capsys):
    from minigpt.config import PRESETS

    tiny = PRESETS["tiny"]
    path = tmp_path / "model.pth"
    # tiny's width and depth, another context: once guessed as tiny's 4 heads, silently
    _plain_model_pth(path, emb_dim=tiny.emb_dim, n_layers=tiny.n_layers, n_heads=8, context_length=64)
    msg = cli_error(["--checkpoint", str(path), "--device", "cpu", "--max-new-tokens", "1"], capsys)
    assert msg == (f"error: {path} is a plain state dict (emb_dim 128, 4 layers, context 64) that does not record "
                   "its number of heads, with no checkpoint.pt of its run beside it, and no preset has that shape — "
                   "pass --n-heads (the number of heads it was trained with)")
    main(["--checkpoint", str(path), "--device", "cpu", "--max-new-tokens", "1", "--n-heads", "8"])


# ---------------------------------------------------------------------------------------------------------------
# Hand-made and damaged files: one line each, naming what is wrong (the flags cannot fix a file)


def _edit_model_pth(sd, case):
    if case == "no pos_emb":
        del sd["pos_emb.weight"]
    elif case == "flat tok_emb":
        sd["tok_emb.weight"] = torch.zeros(257)
    elif case == "missing tensor":
        del sd["trf_blocks.0.ff.layers.0.weight"]
    elif case == "wrong shape":
        sd["trf_blocks.0.ff.layers.0.weight"] = torch.zeros(3, 3)
    elif case == "not a tensor":
        sd["final_norm.scale"] = 1.0
    elif case == "unexpected":
        sd["extra.weight"] = torch.zeros(2)
    elif case == "nan":
        sd["out_head.weight"][5, 3] = float("nan")


@pytest.mark.parametrize("case, match", [
    ("no pos_emb", "model.pth has no pos_emb.weight — the file is damaged or not a GPT state dict"),
    ("flat tok_emb", "model.pth has tok_emb.weight (257,) and pos_emb.weight (8, 32), not (vocab, width)"),
    ("missing tensor", "model.pth has no trf_blocks.0.ff.layers.0.weight (1 tensors missing) — the file is damaged"),
    ("wrong shape", "trf_blocks.0.ff.layers.0.weight in {path} has shape (3, 3), but the file's other tensors imply "
                    "(128, 32)"),
    ("not a tensor", "holds entries that are not named tensors — it is not a GPT state dict"),
    ("unexpected", "model.pth holds extra.weight, which this model does not have (1 unexpected entries)"),
    ("nan", "out_head.weight in {path} holds NaN or infinite values"),
])
def test_a_damaged_model_pth_is_one_line(model, tmp_path, capsys, case, match):
    path = tmp_path / "model.pth"
    sd = notebook_state_dict(model)
    _edit_model_pth(sd, case)
    torch.save(sd, path)
    msg = cli_error(["--checkpoint", str(path), "--n-heads", "2", "--device", "cpu", "--max-new-tokens", "2"], capsys)
    assert match.format(path=path) in msg and "--preset" not in msg


@pytest.mark.parametrize("case, match", [
    ("no config", "checkpoint.pt has no 'config' entry — the file is damaged"),
    ("no model", "checkpoint.pt has no 'model' entry — the file is damaged"),
    ("no tokenizer", "checkpoint.pt has no 'tokenizer' entry — the file is damaged"),
    ("config not a dict", "checkpoint.pt records a config no model can have (expected a GPTConfig or a dict, got str)"),
    ("heads do not divide", "checkpoint.pt records a config no model can have (emb_dim (32) must be divisible by "
                            "n_heads (3)) — the file is damaged"),
    ("missing tensor", "checkpoint.pt has no pos_emb.weight (1 tensors missing)"),
    ("wrong shape", "pos_emb.weight in {path} has shape (5,), but the file's other tensors imply (8, 32)"),
    ("nan", "trf_blocks.0.att.W_key.weight in {path} holds NaN or infinite values"),
])
def test_a_damaged_checkpoint_is_one_line(model, tmp_path, capsys, case, match):
    path = tmp_path / "checkpoint.pt"
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": dict(model.state_dict()),
            "config": model.cfg.to_dict(), "tokenizer": "bytes", "step": 0}
    if case.startswith("no "):
        del ckpt[case.removeprefix("no ")]
    elif case == "config not a dict":
        ckpt["config"] = "x"
    elif case == "heads do not divide":
        ckpt["config"]["n_heads"] = 3
    elif case == "missing tensor":
        del ckpt["model"]["pos_emb.weight"]
    elif case == "wrong shape":
        ckpt["model"]["pos_emb.weight"] = torch.zeros(5)
    elif case == "nan":
        ckpt["model"]["trf_blocks.0.att.W_key.weight"] = torch.full((32, 32), float("inf"))
    torch.save(ckpt, path)
    msg = cli_error(["--checkpoint", str(path), "--device", "cpu", "--max-new-tokens", "2"], capsys)
    # the config is the file's own: no flag can fix it, so none is suggested
    assert match.format(path=path) in msg and "--n-heads" not in msg and "--preset" not in msg


# ---------------------------------------------------------------------------------------------------------------
# The command line's edge: a bad prompt, output closed early or full, Ctrl-C while loading


def test_a_prompt_that_is_not_utf8_is_refused_before_loading(tmp_path, capsys):
    # the shell's $'\xff' reaches sys.argv as "\udcff" (surrogateescape); no checkpoint exists: checked first
    msg = cli_error(["--checkpoint", str(tmp_path / "none.pt"), "--prompt", "ab\udcff"], capsys)
    assert msg.startswith("error: --prompt is not valid UTF-8 (byte 0xff at character 3) — pass it as UTF-8 text")


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "minigpt.generate", *map(str, args)], cwd=ROOT, **kwargs)


def test_output_closed_early_ends_quietly_with_status_141(model, tmp_path):
    _save_ckpt(model, tmp_path / "checkpoint.pt")
    proc = _cli("--checkpoint", tmp_path / "checkpoint.pt", "--device", "cpu", "--kernels", "torch",
                "--prompt", "Hi", "--max-new-tokens", "50", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head -c 10` does once it has its bytes: every write from now on fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_output_is_one_line(model, tmp_path):
    _save_ckpt(model, tmp_path / "checkpoint.pt")
    with open("/dev/full", "w") as full:
        proc = _cli("--checkpoint", tmp_path / "checkpoint.pt", "--device", "cpu", "--kernels", "torch",
                    "--prompt", "Hi", "--max-new-tokens", "5", stdout=full, stderr=subprocess.PIPE, text=True)
        err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 1
    assert err.splitlines() == ["error: No space left on device: standard output — free some disk space or write "
                                "somewhere else"]


# load_torch made to block, so that Ctrl-C surely arrives while the model is loading
SLOW_LOAD = """
import sys
import time

import minigpt.generate as generate


def blocked_load(path, what="checkpoint"):
    print("loading", file=sys.stderr, flush=True)
    time.sleep(120)


generate.load_torch = blocked_load
generate.main(sys.argv[1:])
"""


def test_ctrl_c_while_loading_is_one_line_and_status_130(tmp_path):
    import signal

    proc = subprocess.Popen([sys.executable, "-c", SLOW_LOAD, "--checkpoint", str(tmp_path / "checkpoint.pt"),
                             "--device", "cpu", "--kernels", "torch"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline() == "loading\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out == "" and err.splitlines() == ["", "interrupted"]


# ---------------------------------------------------------------------------------------------------------------
# Streaming the text: each token decoded once, the same text as decoding all the ids


def _old_stream(ids, tok):
    """The pieces stream_text yielded before it decoded incrementally (all the text so far at every token): what it
    must still yield for valid text."""
    new, shown = [], ""
    for token in ids:
        new.append(token)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
    if tok.decode(new)[len(shown):]:
        yield tok.decode(new)[len(shown):]


def _random_byte_streams(n_streams=300, seed=0):
    """Byte sequences that mix valid text (1- to 4-byte characters) with every kind of invalid UTF-8: stray
    continuation bytes, bytes no character starts with, characters cut short, overlong forms, surrogates."""
    rng = torch.Generator().manual_seed(seed)
    valid = [c.encode() for c in "aZ é日本🙂\n—ß"]
    invalid = [b"\x80", b"\xbf", b"\xff", b"\xfe", b"\xc3", b"\xe6\x97", b"\xf0\x9f\x99", b"\xc0\xaf",
               b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe0\x80"]
    for _ in range(n_streams):
        parts = []
        for _ in range(int(torch.randint(1, 12, (1,), generator=rng))):
            pool = invalid if torch.rand(1, generator=rng) < 0.4 else valid
            parts.append(pool[int(torch.randint(len(pool), (1,), generator=rng))])
        yield b"".join(parts)


def test_streamed_text_equals_decoding_every_id_for_any_bytes():
    tok = ByteTokenizer()
    for data in _random_byte_streams():
        ids = list(data)
        assert "".join(stream_text(iter(ids), tok)) == tok.decode(ids), data
    text = "héllo wörld — 日本 🙂\n"
    assert list(stream_text(iter(tok.encode(text)), tok)) == list(_old_stream(tok.encode(text), tok))


def test_bytes_that_form_no_character_are_shown_at_once_not_held_back():
    taken = []

    def ids():
        for i in [0xFF] * 1000 + [ord("A")]:
            taken.append(i)
            yield i

    pieces = stream_text(ids(), ByteTokenizer())
    assert next(pieces) == "\ufffd" and len(taken) == 1  # 0xFF starts no character: it cannot be completed
    assert next(pieces) == "\ufffd" and len(taken) == 2


class _CountingByteTokenizer(ByteTokenizer):
    """A ByteTokenizer that counts the ids it decodes."""

    decoded = 0

    def decode(self, ids):
        ids = list(ids)
        self.decoded += len(ids)
        return super().decode(ids)


class _OnlyDecode:
    """A tokenizer of a kind stream_text does not know (only the interface: decode), counting the ids decoded."""

    def __init__(self, tok):
        self.inner, self.eot_token, self.decoded = tok, tok.eot_token, 0

    def decode(self, ids):
        ids = list(ids)
        self.decoded += len(ids)
        return self.inner.decode(ids)


def test_streaming_decodes_each_token_once():
    n = 3000
    ids = list(("once upon a time, é日🙂 " * n).encode())[:n]
    counting = _CountingByteTokenizer()
    assert "".join(stream_text(iter(ids), counting)) == ByteTokenizer().decode(ids)
    assert counting.decoded <= n  # decoding everything so far at every token: n * (n + 1) / 2
    other = _OnlyDecode(ByteTokenizer())
    list(stream_text(iter(ids), other))
    assert other.decoded <= 2 * n


def _split_char_encoding():
    """A BPE whose merges cut characters in two: "aéb" is the tokens b"a\\xc3" and b"\\xa9b"."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([b]): b for b in range(256)}
    for merged in (b"a\xc3", b"\xa9b", b" \xe6\x97", b"\xa5\xe6"):
        ranks[merged] = len(ranks)
    return tiktoken.Encoding(name="split-chars", pat_str=r" ?\p{L}+| ?[^\s\p{L}]+|\s+",
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})


def _bpe_tokenizers():
    """minigpt's BPE tokenizers that can be built here: small ones built in the test (always), GPT-2's when
    tiktoken's files for it are already cached (they cannot be downloaded in the tests)."""
    import os

    from minigpt.tokenizer import TiktokenTokenizer, gpt2_cache_paths, tokenizer_from_name
    from tests.data_helpers import small_bpe

    toks = [small_bpe(), TiktokenTokenizer(_split_char_encoding())]
    paths = gpt2_cache_paths()
    if paths and all(os.path.exists(p) for p in paths):
        toks.append(tokenizer_from_name("gpt2"))
    return toks


def test_streaming_bpe_tokens_gives_the_decoded_text():
    text = "aéb the band 日本語 🙂 — ü\n"
    for tok in _bpe_tokenizers():
        ids = tok.encode(text)
        if tok.name == "split-chars":
            assert tok.encoding.decode_single_token_bytes(ids[0]) == b"a\xc3"  # "é" is cut between two tokens
        pieces = list(stream_text(iter(ids + [tok.eot_token] + ids), tok))
        # the same text; a token that ends in half a character has its whole characters shown at once now
        assert "".join(pieces) == "".join(_old_stream(ids, tok)) == text, tok.name
        rng = torch.Generator().manual_seed(1)
        for _ in range(50):  # any ids, however the bytes they stand for join up
            ids = [i for i in torch.randint(tok.n_vocab, (40,), generator=rng).tolist() if i != tok.eot_token]
            assert "".join(stream_text(iter(ids), tok)) == tok.decode(ids), (tok.name, ids)


def test_streaming_bpe_decodes_each_token_once():
    from minigpt.tokenizer import TiktokenTokenizer

    class CountingEncoding:
        """tiktoken's encoding, counting the ids each of its decoding methods is given."""

        def __init__(self, encoding):
            self.encoding, self.decoded = encoding, 0

        def __getattr__(self, name):
            attr = getattr(self.encoding, name)
            if not name.startswith("decode"):
                return attr

            def counted(ids, *args, **kwargs):
                self.decoded += 1 if isinstance(ids, int) else len(ids)
                return attr(ids, *args, **kwargs)

            return counted

    tok = TiktokenTokenizer(_split_char_encoding())
    counting = CountingEncoding(tok.encoding)
    tok.encoding = counting
    ids = tok.encode("aéb the band 日本語 🙂 — ü " * 300)
    assert "".join(stream_text(iter(ids), tok)) == counting.encoding.decode(ids)
    assert counting.decoded <= 2 * len(ids)
