"""benchmarks.generate without timing anything: the decoding floor's byte count against one written out by hand from
the architecture, and the warm-up against the attention problem classes the timed runs meet."""
import pytest
import torch

from benchmarks import generate as generate_bench
from benchmarks.generate import Row
from kernels import get_backend
from minigpt import GPTModel
from minigpt.config import GPTConfig

TINY = GPTConfig(vocab_size=97, context_length=16, emb_dim=8, n_heads=2, n_layers=3, drop_rate=0.0, qkv_bias=True)


def bytes_by_hand(cfg: GPTConfig, element: int, keys: list[int]) -> float:
    """The floor's numerator from the shapes in minigpt/model.py: what one decoding step reads, averaged over the
    steps whose key counts are ``keys``."""
    C, V, L = cfg.emb_dim, cfg.vocab_size, cfg.n_layers
    qkv = 3 * (C * C + (C if cfg.qkv_bias else 0))  # W_query, W_key, W_value
    out_proj = C * C + C
    feed_forward = (C * 4 * C + 4 * C) + (4 * C * C + C)
    norms = 2 * (2 * C)  # norm1 and norm2: scale and shift
    per_block = qkv + out_proj + feed_forward + norms
    weights = L * per_block + 2 * C + V * C  # + final_norm + out_head (no bias)
    rows = 2 * C  # one token embedding row, one position embedding row
    cache = [2 * L * k * C for k in keys]  # K and V of every layer
    return element * (weights + rows + sum(cache) / len(cache))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_floor_counts_the_matmuls_norms_one_embedding_row_and_the_cache(dtype):
    torch.manual_seed(0)
    model = GPTModel(TINY, kernels="torch").to(dtype)
    prompt_len, new_tokens = 5, 7  # steps attend to 5, 6, ..., 11 keys
    expected = bytes_by_hand(TINY, torch.finfo(dtype).bits // 8, list(range(5, 12)))
    assert generate_bench.floor_bytes_per_token(model, prompt_len, new_tokens) == pytest.approx(expected, rel=1e-12)
    every_parameter = sum(p.numel() * p.element_size() for p in model.parameters())
    assert generate_bench.floor_bytes_per_token(model, 1, 1) < every_parameter  # the two tables are not read whole


def test_floor_counts_a_head_tied_to_the_token_embedding_once():
    torch.manual_seed(0)
    model = GPTModel(TINY, kernels="torch")
    model.out_head.weight = model.tok_emb.weight  # one (V, C) matrix for the lookup and the head
    expected = bytes_by_hand(TINY, 4, list(range(5, 12)))
    assert generate_bench.floor_bytes_per_token(model, 5, 7) == pytest.approx(expected, rel=1e-12)


def test_floor_holds_the_cache_at_the_context_once_the_window_slides():
    torch.manual_seed(0)
    model = GPTModel(TINY, kernels="torch")
    keys = [min(12 + i, TINY.context_length) for i in range(10)]  # 12, 13, 14, 15, 16, 16, 16, 16, 16, 16
    expected = bytes_by_hand(TINY, 4, keys)
    assert generate_bench.floor_bytes_per_token(model, 12, 10) == pytest.approx(expected, rel=1e-12)


class RecordingBackend:
    """The torch backend, noting the attention problem class of every call as the tile tuner keys it: the query
    and key counts rounded up to powers of two."""

    def __init__(self):
        self.torch = get_backend("torch")
        self.classes: list[tuple[int, int]] = []

    def layer_norm(self, *args, **kwargs):
        return self.torch.layer_norm(*args, **kwargs)

    def gelu(self, *args, **kwargs):
        return self.torch.gelu(*args, **kwargs)

    def causal_attention(self, q, k, v, **kwargs):
        self.classes.append((1 << (q.shape[2] - 1).bit_length(), 1 << (k.shape[2] - 1).bit_length()))
        return self.torch.causal_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("contender", ["cache", "no cache"])
def test_the_warm_up_meets_every_attention_class_the_timed_runs_meet(contender):
    backend = RecordingBackend()
    torch.manual_seed(0)
    model = GPTModel(TINY, kernels=backend).eval()
    generate = generate_bench.generator_for(Row(1, contender), model, None, None)
    calls = []  # the attention classes of each call of the generator, in order

    def counted(prompt, new_tokens):
        start = len(backend.classes)
        out = generate(prompt, new_tokens)
        calls.append(set(backend.classes[start:]))
        return out

    prompt = torch.randint(0, TINY.vocab_size, (1, 3))
    new_tokens = 20  # from 3 to 22 positions: the window slides past 16, crossing the 4, 8 and 16 classes
    generate_bench.timed(counted, prompt, new_tokens, torch.device("cpu"), repeats=2)
    warm_up, *timed_runs = calls
    assert len(timed_runs) == 2
    for run in timed_runs:
        assert run <= warm_up, f"classes first met inside a timed run: {sorted(run - warm_up)}"
    assert len(warm_up) >= 3


def test_a_long_status_is_whole_in_the_json_and_cut_only_in_the_table(tmp_path):
    import json
    from types import SimpleNamespace

    from benchmarks import results, timing

    why = "transformers is not installed " + "(a reason far longer than a table cell) " * 5
    args = SimpleNamespace(prompt_len=3, new_tokens=4, dtype="fp32")
    row = generate_bench.run_row(Row(1, "transformers"), args, torch.device("cpu"), None, None, why, {},
                                 timing.Budget(None))
    results.write_results(tmp_path, "generate", [row], meta={})
    stored = json.loads((tmp_path / "generate.json").read_text())["rows"][0]["status"]
    assert stored == "skipped: " + why
    shown = generate_bench.table([row]).splitlines()[-1]
    assert stored[:generate_bench.STATUS_WIDTH - 3] + "..." in shown and stored not in shown


def test_an_out_that_is_a_file_is_refused_before_the_benchmark_runs(tmp_path, monkeypatch, capsys):
    """Before, `--out FILE` failed only when the first results were written, after the ceilings and a row."""
    from benchmarks import timing

    def started(*args, **kwargs):
        raise AssertionError("the benchmark started although --out had to be refused first")

    monkeypatch.setattr(timing, "measure_ceilings", started)
    monkeypatch.setattr(generate_bench, "build_models", started)
    a_file = tmp_path / "results"
    a_file.write_text("")
    for args in (["--out", str(a_file)], ["--out", str(tmp_path), "--vocab-size", "0"]):
        assert generate_bench.main(["--quick", "--device", "cpu", *args]) == 1
        assert capsys.readouterr().err.startswith(("error: --out", "error: --vocab-size must be positive"))
    assert a_file.read_text() == ""
