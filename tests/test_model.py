import math

import pytest
import torch

import kernels
from kernels.definitions import causal_attention_math, gelu_math, layer_norm_math
from minigpt import GPT_CONFIG_124M, GPTConfig, GPTModel, get_preset
from minigpt.config import ConfigError
from minigpt.model import notebook_state_dict
from tests.original_notebook import NotebookGPTModel

SMALL = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=False)


def test_presets_are_the_notebook_configs():
    assert get_preset("gpt2-124m").to_dict() == GPT_CONFIG_124M
    small, large = get_preset("small"), get_preset("large")
    assert (small.context_length, small.emb_dim, small.n_heads, small.n_layers) == (128, 384, 6, 6)
    assert (large.context_length, large.emb_dim, large.n_heads, large.n_layers) == (512, 1024, 16, 24)


def test_parameter_count_of_gpt2_124m_derived_by_hand():
    cfg = GPTConfig(**GPT_CONFIG_124M)
    V, T, C, L = 50257, 256, 768, 12
    per_block = 3 * C * C + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C) + 4 * C  # qkv, out, ff, 2 norms
    expected = V * C + T * C + L * per_block + 2 * C + C * V
    model = GPTModel(cfg, kernels="torch")
    assert model.num_params() == expected


def test_forward_shapes_and_dict_config():
    model = GPTModel(SMALL, kernels="torch")
    idx = torch.randint(0, 97, (3, 11))
    assert model(idx).shape == (3, 11, 97)
    with pytest.raises(ValueError, match="longer than context_length"):
        model(torch.randint(0, 97, (1, 17)))


@pytest.mark.parametrize("bad, match", [
    (dict(emb_dim=30, n_heads=4), "divisible by n_heads"),
    (dict(n_layers=0), "positive integer"),
    (dict(drop_rate=1.0), "drop_rate"),
])
def test_bad_configs_name_the_fix(bad, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**{**SMALL, **bad})


def test_unknown_preset_and_backend():
    with pytest.raises(ConfigError, match="choose one of"):
        get_preset("medium")
    with pytest.raises(kernels.BackendUnavailable, match="choose one of"):
        GPTModel(SMALL, kernels="cuda-magic")


def test_future_tokens_never_change_past_logits():
    torch.manual_seed(0)
    model = GPTModel(SMALL, kernels="torch").eval()
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_original_notebook_checkpoint_loads_verbatim_and_gives_same_logits(tmp_path):
    torch.manual_seed(1)
    for qkv_bias in (False, True):
        cfg = {**SMALL, "qkv_bias": qkv_bias}
        notebook_model = NotebookGPTModel(cfg).eval()
        torch.save(notebook_model.state_dict(), tmp_path / "model.pth")
        assert any(k.endswith("att.mask") for k in notebook_model.state_dict())

        model = GPTModel(cfg, kernels="torch").eval()
        model.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))
        idx = torch.randint(0, 97, (2, 16))
        with torch.no_grad():
            torch.testing.assert_close(model(idx), notebook_model(idx), rtol=1e-5, atol=1e-5)
        assert not any("mask" in name for name, _ in model.named_buffers())  # never allocated


def test_our_model_pth_loads_in_the_original_notebook():
    torch.manual_seed(2)
    model = GPTModel(SMALL, kernels="torch").eval()
    notebook_model = NotebookGPTModel(SMALL).eval()
    notebook_model.load_state_dict(notebook_state_dict(model))  # strict: every key, mask included
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), notebook_model(idx), rtol=1e-5, atol=1e-5)


def test_gradients_match_the_notebook_model():
    torch.manual_seed(3)
    notebook_model = NotebookGPTModel(SMALL)
    model = GPTModel(SMALL, kernels="torch")
    model.load_state_dict(notebook_model.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    for m in (notebook_model, model):
        m(idx).float().square().mean().backward()
    ours = dict(model.named_parameters())
    for name, p in notebook_model.named_parameters():
        torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_backend_object_is_used():
    calls = {"layer_norm": 0, "gelu": 0, "causal_attention": 0}
    torch_ops = kernels.get_backend("torch")

    class Counting:
        name = "counting"

        def layer_norm(self, *a, **k):
            calls["layer_norm"] += 1
            return torch_ops.layer_norm(*a, **k)

        def gelu(self, *a, **k):
            calls["gelu"] += 1
            return torch_ops.gelu(*a, **k)

        def causal_attention(self, *a, **k):
            calls["causal_attention"] += 1
            return torch_ops.causal_attention(*a, **k)

    GPTModel(SMALL, kernels=Counting())(torch.randint(0, 97, (1, 5)))
    assert calls == {"layer_norm": 2 * 2 + 1, "gelu": 2, "causal_attention": 2}


# --- the torch backend against the formulas in float64 ------------------------------------------------------------

def test_torch_backend_matches_the_formulas_in_float64():
    torch.manual_seed(4)
    ops = kernels.get_backend("torch")
    x = torch.randn(3, 5, 33, dtype=torch.float64)
    w, b = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    torch.testing.assert_close(ops.layer_norm(x, w, b), layer_norm_math(x, w, b), rtol=1e-12, atol=1e-12)
    for approx in ("tanh", "none"):
        torch.testing.assert_close(ops.gelu(x, approx), gelu_math(x, approx), rtol=1e-12, atol=1e-12)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(ops.causal_attention(q, k, v), causal_attention_math(q, k, v), rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(ops.causal_attention(q, k, v, scale=0.3), causal_attention_math(q, k, v, scale=0.3),
                               rtol=1e-10, atol=1e-12)


def test_gelu_formulas_against_known_values():
    # GELU(x) = x * Phi(x); Phi(1) = 0.8413447460685429 (standard normal CDF)
    x = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    exact = gelu_math(x, "none")
    torch.testing.assert_close(exact, torch.tensor([0.8413447460685429, 0.0, -0.15865525393145707],
                                                   dtype=torch.float64))
    assert abs(gelu_math(x, "tanh")[0].item() - 0.8413447460685429) < 1e-3  # the approximation is close


def test_attention_math_first_row_attends_only_to_itself():
    q, k, v = (torch.randn(1, 1, 6, 4, dtype=torch.float64) for _ in range(3))
    out = causal_attention_math(q, k, v)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])
    # last row: plain softmax over all keys, computed by hand
    w = torch.softmax((q[0, 0, -1] @ k[0, 0].T) / math.sqrt(4), dim=-1)
    torch.testing.assert_close(out[0, 0, -1], w @ v[0, 0])


def test_torch_backend_input_errors():
    ops = kernels.get_backend("torch")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="with Tq <= Tk"):
        ops.causal_attention(q, q, torch.randn(1, 2, 5, 8))  # k and v of different lengths
    with pytest.raises(ValueError, match="with Tq <= Tk"):
        ops.causal_attention(torch.randn(1, 2, 5, 8), q, q)  # more queries than keys
    with pytest.raises(ValueError, match="with Tq <= Tk"):
        ops.causal_attention(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8))  # other heads
    with pytest.raises(TypeError, match="dtype"):
        ops.causal_attention(q, q, q.double())
    with pytest.raises(ValueError, match="weight and bias"):
        ops.layer_norm(torch.randn(2, 8), torch.ones(7), torch.zeros(8))
    with pytest.raises(ValueError, match="approximate"):
        ops.gelu(q, "sigmoid")


def test_linear_weights_are_stored_input_major_and_load_from_either_order():
    from minigpt.model import notebook_state_dict

    cfg = dict(vocab_size=61, context_length=8, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)
    torch.manual_seed(0)
    model = GPTModel(cfg, kernels="torch")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 6 + 1
    for m in linears:  # nn.Linear's (out, in) shape, over (in, out) memory
        assert m.weight.shape == (m.out_features, m.in_features) and m.weight.t().is_contiguous()
    # a state dict in nn.Linear's usual order (the original notebook's model.pth, an older checkpoint) loads into it,
    # values and memory order kept apart
    plain = {k: v.contiguous() for k, v in notebook_state_dict(model).items()}
    other = GPTModel(cfg, kernels="torch")
    other.load_state_dict(plain)
    assert all(m.weight.t().is_contiguous() for m in other.modules() if isinstance(m, torch.nn.Linear))
    idx = torch.randint(0, 61, (2, 8))
    assert torch.equal(other(idx), model(idx))


# --- the loss: model(idx, targets=...) through the backend's linear_cross_entropy ---------------------------------

@pytest.mark.parametrize("name", ["torch", "auto"])  # "auto" on CPU tensors: the torch backend, chosen per call
def test_loss_from_targets_is_cross_entropy_of_the_logits_in_float64(name):
    import torch.nn.functional as F

    torch.manual_seed(5)
    model = GPTModel(SMALL, kernels=name).double()
    idx, y = torch.randint(0, 97, (3, 11)), torch.randint(0, 97, (3, 11))
    y[0, :4] = -100  # padding: left out of the mean
    params = [p for _, p in model.named_parameters()]
    loss = model(idx, targets=y)
    grads = torch.autograd.grad(loss, params)
    from_logits = F.cross_entropy(model(idx).flatten(0, 1), y.flatten())  # the original notebook's loss
    from_logits_grads = torch.autograd.grad(from_logits, params)
    assert loss.shape == () and loss.dtype == torch.float64
    torch.testing.assert_close(loss, from_logits, rtol=1e-12, atol=1e-12)
    for (pname, _), g, r in zip(model.named_parameters(), grads, from_logits_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=pname)


def test_the_loss_never_makes_the_full_logits(monkeypatch):
    import kernels.chunked_loss as chunked_loss
    from tests.test_linear_cross_entropy import LiveBytes

    cfg = {**SMALL, "vocab_size": 1003}
    monkeypatch.setattr(chunked_loss, "LOGITS_CHUNK_BYTES", 4 * 1003 * 4)  # 4 rows a chunk
    model = GPTModel(cfg, kernels="torch")
    idx, y = torch.randint(0, 1003, (4, 16)), torch.randint(0, 1003, (4, 16))
    logits_bytes = 4 * 16 * 1003 * 4  # (B*T, V) floats; the largest other tensor is a (V, C) weight's gradient
    with LiveBytes() as rec:
        model(idx, targets=y).backward()
    assert rec.largest < logits_bytes
    with LiveBytes() as rec:
        model(idx)  # the instrument sees them when they are made
    assert rec.largest >= logits_bytes


def test_backend_object_gets_the_loss_or_lends_it_from_torch():
    torch.manual_seed(6)
    torch_ops = kernels.get_backend("torch")
    seen = []

    class ThreeOps:  # written before the loss was an op: the model uses the torch backend's
        name = "three"
        layer_norm, gelu, causal_attention = torch_ops.layer_norm, torch_ops.gelu, torch_ops.causal_attention

    class FourOps(ThreeOps):
        name = "four"

        def linear_cross_entropy(self, x, weight, targets, *a, **k):
            seen.append((x.shape, weight, targets.shape))
            return torch_ops.linear_cross_entropy(x, weight, targets, *a, **k)

    torch_model = GPTModel(SMALL, kernels="torch")
    idx, y = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    expected = torch_model(idx, targets=y)
    for backend in (ThreeOps(), FourOps()):
        model = GPTModel(SMALL, kernels=backend)
        model.load_state_dict(torch_model.state_dict())
        torch.testing.assert_close(model(idx, targets=y), expected)
    assert len(seen) == 1 and seen[0][0] == (18, 32) and seen[0][2] == (18,)
    assert seen[0][1] is model.out_head.weight  # the parameter itself: no copy, no transpose

    class BrokenLoss(ThreeOps):
        linear_cross_entropy = "not a method"

    with pytest.raises(TypeError, match="linear_cross_entropy is not a method"):
        GPTModel(SMALL, kernels=BrokenLoss())


def test_targets_with_a_kv_cache_or_another_shape_are_refused():
    from minigpt.model import KVCache

    model = GPTModel(SMALL, kernels="torch")
    idx = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="without kv_cache"):
        model(idx, kv_cache=KVCache(model.cfg, batch_size=2), targets=idx)
    with pytest.raises(ValueError, match=r"targets must have in_idx's shape \(2, 5\)"):
        model(idx, targets=idx.flatten())


def test_last_only_gives_the_last_positions_logits():
    torch.manual_seed(7)
    model = GPTModel(SMALL, kernels="torch").eval()
    idx = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        last = model(idx, last_only=True)
        assert last.shape == (2, 1, 97)
        torch.testing.assert_close(last, model(idx)[:, -1:], rtol=1e-6, atol=1e-6)
