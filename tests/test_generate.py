import pytest
import torch

from minigpt import GPTModel
from minigpt.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from minigpt.generate import generate, main
from minigpt.model import seed_state_dict

CFG = dict(vocab_size=257, context_length=8, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0, qkv_bias=False)


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
          "--temperature", "0", "--preset", "tiny", "--tokenizer", "bytes", "--device", "cpu"])
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
