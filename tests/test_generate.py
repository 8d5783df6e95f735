import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import GPTModel
from minigpt.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from minigpt.generate import MIN_TEMPERATURE, choose_next_token, generate, main
from minigpt.model import seed_state_dict

CFG = dict(vocab_size=257, context_length=8, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0, qkv_bias=False)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPTModel(CFG, kernels="torch").eval()


def _greedy_by_hand(model, ids, n, ctx):
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids[-ctx:]]))[0, -1]
        ids.append(int(torch.argmax(logits)))
    return ids


def test_greedy_matches_argmax_by_hand_and_crops_the_context(model):
    prompt = torch.randint(0, 257, (1, 11))  # longer than context_length: must be cropped, not fail
    out = generate(model, prompt, 6, context_size=8)
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


def test_cli_generates_from_our_checkpoint_and_a_seed_model_pth(model, tmp_path, capsys):
    _save_ckpt(model, tmp_path / "checkpoint.pt")
    main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--prompt", "Hi", "--max-new-tokens", "5",
          "--temperature", "0", "--device", "cpu"])
    new = _greedy_by_hand(model, list(b"Hi"), 5, 8)[2:]
    if 256 in new:  # generation stops at end-of-text, which is not printed
        new = new[: new.index(256)]
    out = capsys.readouterr().out
    assert out == "Hi" + bytes(new).decode("utf-8", errors="replace") + "\n"
    torch.save(seed_state_dict(model), tmp_path / "model.pth")
    main(["--checkpoint", str(tmp_path / "model.pth"), "--prompt", "Hi", "--max-new-tokens", "5",
          "--temperature", "0", "--n-heads", "2", "--tokenizer", "bytes", "--device", "cpu"])
    out2 = capsys.readouterr().out
    assert out2 == out  # same weights, same greedy text, whichever file they came from


@pytest.mark.parametrize("case, match", [
    ("missing", "no checkpoint at"),
    ("truncated", "not a readable checkpoint"),
    ("mismatch", "does not match the model configuration"),
    ("folder", "is a folder"),
])
def test_bad_checkpoints_get_one_line_errors(model, tmp_path, case, match):
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
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(path), "--device", "cpu", "--max-new-tokens", "1"])
    msg = str(e.value)
    assert msg.startswith("error:") and match in msg and "\n" not in msg


def _plain_model_pth(path, **cfg):
    torch.manual_seed(0)
    model = GPTModel({**CFG, **cfg}, kernels="torch").eval()
    torch.save(seed_state_dict(model), path)
    return model


def test_a_preset_that_does_not_fit_the_weights_is_refused_with_the_one_that_does(tmp_path, capsys):
    from minigpt.config import PRESETS

    tiny = PRESETS["tiny"]
    path = tmp_path / "model.pth"
    model = _plain_model_pth(path, emb_dim=tiny.emb_dim, n_layers=tiny.n_layers, n_heads=tiny.n_heads,
                             context_length=tiny.context_length)
    common = ["--checkpoint", str(path), "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"]
    for wrong in ("small", "large"):  # large: same layers' shapes would load with 16 heads instead of 4
        with pytest.raises(SystemExit) as e:
            main(common + ["--preset", wrong])
        msg = str(e.value)
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


def test_a_shape_no_preset_has_needs_n_heads(tmp_path):
    path = tmp_path / "model.pth"
    _plain_model_pth(path)  # emb_dim 32, 1 layer: no preset
    for flags, match in (([], "no preset has that shape — pass --n-heads"),
                         (["--preset", "tiny"], "no preset has that shape: pass --n-heads"),
                         (["--n-heads", "3"], "divisible by n_heads")):
        with pytest.raises(SystemExit, match=match):
            main(["--checkpoint", str(path), "--device", "cpu", "--max-new-tokens", "1", *flags])


def test_a_checkpoint_refuses_a_preset_or_heads_it_does_not_have(model, tmp_path):
    _save_ckpt(model, tmp_path / "checkpoint.pt")
    for flags, match in ((["--preset", "small"], "--preset small does not fit"),
                         (["--n-heads", "4"], "--n-heads 4 does not fit .* which has 2 heads")):
        with pytest.raises(SystemExit, match=match):
            main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--device", "cpu", "--max-new-tokens", "1",
                  *flags])


@pytest.mark.parametrize("flags, match", [
    (["--top-k", "-3"], "--top-k must be >= 0"),
    (["--seed", "99999999999999999999"], "--seed must be between 0 and 2\\*\\*63 - 1"),
    (["--top-p", "1.5"], "--top-p must be in"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
])
def test_bad_sampling_flags_are_one_line(model, tmp_path, flags, match):
    _save_ckpt(model, tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit, match=match) as e:
        main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--device", "cpu", *flags])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flag, value", [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
    ("--temperature", "1e-40"),  # the logits / 1e-40 overflow to inf in float32: softmax gave NaN probabilities
    ("--temperature", "1e-5"),
    ("--top-p", "nan"), ("--top-p", "inf"), ("--top-p", "0"), ("--top-p", "1.5"),
])
def test_a_float_flag_that_is_not_finite_or_out_of_range_is_refused_before_loading(tmp_path, flag, value):
    # no checkpoint exists: a flag checked only after loading would get the missing file's error instead
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--device", "cpu", f"{flag}={value}"])
    msg = str(e.value)
    assert msg.startswith(f"error: {flag} must be ") and msg.endswith(f", got {float(value)}") and "\n" not in msg


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
        pieces.append(model(idx[:, start:start + size], kv_cache=cache))
        start += size
        assert cache.length == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-12, atol=1e-12)
    # preallocated once, (B, H, context_length, D) per layer, and filled in place
    assert all(k.shape == (2, 2, 16, 16) and k.dtype == torch.float64 for k in cache.keys)
    ptrs = [k.data_ptr() for k in cache.keys]
    model(idx[:, :3], kv_cache=cache)  # positions 13..15: the cache is full
    assert [k.data_ptr() for k in cache.keys] == ptrs
    with pytest.raises(ValueError, match="17 tokens .16 in the KV cache \\+ 1 new. is longer than context_length"):
        model(idx[:, :1], kv_cache=cache)


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
    with pytest.raises(SystemExit, match="--max-new-tokens must be >= 1"):
        main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--max-new-tokens", "0", "--device", "cpu"])
