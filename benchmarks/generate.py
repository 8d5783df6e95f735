r"""``python -m benchmarks.generate``: how fast does the GPT write text, with its KV cache and without?

Greedy generation of ``--new-tokens`` tokens (default 256) after a prompt of ``--prompt-len`` random tokens (32),
at batch 1 and 8, on the gpt2-124m shape with context 512 and GPT-2's layout (query/key/value biases): random
weights from ``--seed``, or GPT-2's own with ``--pretrained NAME|PATH``. Contenders, on the same weights:

    cache          minigpt.generate.generate(..., use_cache=True): the prompt once (the prefill), then ONE
                   position per new token, its query attending to the cached keys and values
    no cache       the same with use_cache=False: the whole window through the model for every new token
    transformers   Hugging Face's GPT2LMHeadModel.generate(do_sample=False, use_cache=True), when transformers
                   is installed (its row says why when it is not)

Reported per row: seconds for the whole generation (the median of ``--repeats`` runs: 3 on a GPU, 1 on a CPU),
new tokens per second (batch x new tokens / seconds), milliseconds per generated position (seconds / new tokens),
and the speed-ups the targets are stated in: the cache against the uncached loop and against transformers.

The warm-up.  Before its timed runs every row makes one untimed run of the SAME generation: the same prompt, the
same number of new tokens. On a GPU the first call of a Triton kernel compiles it, and the attention kernels' tile
tuner (kernels/attention_tiles.py) times its candidate tiles on the first call of each problem class, which it keys
on the query and key counts rounded up to powers of two. A generation meets a new class every time its length
crosses a power of two (the cache's decoding steps attend to 33, 34, ... 287 keys: the 64, 128, 256 and 512
classes), so a shorter warm-up would leave the later classes to be tuned inside the first timed run. The same
generation meets exactly the classes the timed runs will; on a CPU nothing is tuned and the warm-up costs one more
run per row.

The floor of a decoding step.  At batch 1 a step multiplies one position's activations by every weight matrix:
about 2 x parameters FLOPs, but every one of those weights must be READ once, and a GPU reads far slower than it
multiplies. So a step cannot take less than the bytes it must read / memory bandwidth (``floor_bytes_per_token``:
the matmuls' weights, the LayerNorms', one row of each embedding table, and the KV cache at the step's length);
the bandwidth is the copy rate measured at the start of the run (``benchmarks/timing.py``). The rows at batch 1
report that floor and floor_ratio = measured ms per token / floor ms (1.0 would be perfect; kernel launches, the
prefill's extra work and everything a step does besides reading are what is above it). On the CPU the same ratio
is reported for completeness.

Checked before any timing matters: every contender's tokens are compared with the uncached loop's. Greedy decoding
is deterministic, so in float32 they must be identical; in bfloat16 (on a GPU) two correct implementations may
round a near-tie differently, so the row reports where the first difference is.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import common, overhead, results, timing
from kernels.cli import run_cli

CONTENDERS = ("cache", "no cache", "transformers")
COUNTING = ("tokens/s = batch * new tokens / seconds of the whole generation (prefill included); floor ms per token "
            "= floor_bytes_per_token / measured copy bandwidth: the matmuls' weights (the output head once) and the "
            "LayerNorms' + one token and one position embedding row + the KV cache at the step's length (all "
            "layers, K and V), averaged over the new tokens")
FULL = dict(batches=[1, 8], prompt_len=32, new_tokens=256, context_length=512, emb_dim=768, n_layers=12, n_heads=12,
            stream_rounds=5)
QUICK = dict(batches=[1, 2], prompt_len=8, new_tokens=24, context_length=64, emb_dim=128, n_layers=2, n_heads=4,
             stream_rounds=3)


@dataclass(frozen=True)
class Row:
    batch: int
    contender: str


def build_models(args, device, dtype):
    """(our model, transformers' model or None, why it is None) on the same weights, in eval mode."""
    import torch

    from minigpt import GPTModel

    try:
        import transformers
    except ImportError:
        transformers = None
    if args.pretrained:
        ours = GPTModel.from_pretrained(args.pretrained, kernels=args.kernels, drop_rate=0.0)
        theirs, why = None, "transformers is not installed (pip install transformers)"
        if transformers is not None:
            theirs, why = transformers.GPT2LMHeadModel.from_pretrained(args.pretrained), None
    elif transformers is not None:
        # GPT-2's layout with random weights: built by transformers, saved in its format and loaded by ours
        config = transformers.GPT2Config(n_positions=args.context_length, n_embd=args.emb_dim, n_layer=args.n_layers,
                                         n_head=args.n_heads, vocab_size=args.vocab_size)
        torch.manual_seed(args.seed)
        theirs, why = transformers.GPT2LMHeadModel(config), None
        with tempfile.TemporaryDirectory() as folder:
            theirs.save_pretrained(folder)
            ours = GPTModel.from_pretrained(folder, kernels=args.kernels, drop_rate=0.0)
    else:
        from minigpt.config import GPTConfig

        cfg = GPTConfig(vocab_size=args.vocab_size, context_length=args.context_length, emb_dim=args.emb_dim,
                        n_heads=args.n_heads, n_layers=args.n_layers, drop_rate=0.0, qkv_bias=True)
        torch.manual_seed(args.seed)
        ours, theirs, why = GPTModel(cfg, kernels=args.kernels), None, "transformers is not installed " \
                                                                        "(pip install transformers)"
    ours = ours.to(device=device, dtype=dtype).eval()
    if theirs is not None:
        theirs = theirs.to(device=device, dtype=dtype).eval()
    return ours, theirs, why


def generator_for(row: Row, ours, theirs, args):
    """A function (prompt, new tokens) -> (B, prompt + new) ids for the row's contender."""
    import torch

    from minigpt.generate import generate

    if row.contender == "transformers":
        def run(prompt, new_tokens):
            with torch.no_grad():
                return theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                       use_cache=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       pad_token_id=0)
        return run
    use_cache = row.contender == "cache"
    return lambda prompt, new_tokens: generate(ours, prompt, new_tokens, ours.cfg.context_length,
                                               use_cache=use_cache)


def timed(fn, prompt, new_tokens: int, device, repeats: int) -> tuple[float, "object"]:
    """(median seconds of ``repeats`` runs, the last output), after one untimed run of the same generation: it
    meets every code path and every problem class the timed runs will (Triton's compilation, the tile tuner's
    timings; see the module docstring), so none of them is paid for inside the timings."""

    fn(prompt, new_tokens)  # the warm-up
    watch = timing.Stopwatch(device)
    for _ in range(repeats):
        with watch.region():
            out = fn(prompt, new_tokens)
    return statistics.median(watch.ms()) / 1e3, out


def floor_bytes_per_token(model, prompt_len: int, new_tokens: int) -> float:
    """Bytes that generating one token at batch 1 with the KV cache must read, averaged over ``new_tokens`` tokens
    generated after ``prompt_len`` prompt tokens: the numerator of the decoding floor.

    With C the width, L the layers and e the bytes of one cache element, the step that makes new token i (0, 1, ...)
    attends to keys(i) = min(prompt_len + i, context) positions (past the context the window slides and it holds
    the whole context) and reads

        weights      every parameter except the two embedding tables, once: the matmuls' weights and biases (the
                     output head included; one that shares the token embedding's storage is counted once, as the
                     head's matmul) and the LayerNorms' scales and shifts
        rows         one row of the token embedding and one of the position embedding (a lookup reads only those)
        cache        2 (K and V) x L x keys(i) x C x e, in the cache's dtype (the dtype W_key produces)

        bytes(i) = weights + rows + cache(i);  the result is the mean of bytes(i) over i = 0 .. new_tokens - 1

    Left out, so that the floor stays below what any step must do: the prefill's other prompt rows, the new key and
    value written, the activations (a few C-wide vectors per layer) and the logits.
    """
    cfg = model.cfg
    tables = {"tok_emb.weight", "pos_emb.weight"}
    weights, seen = 0, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        storage = (p.untyped_storage().data_ptr(), p.numel())
        if name in tables or storage in seen:  # a tied head appears twice; its count comes from out_head.weight
            continue
        seen.add(storage)
        weights += p.numel() * p.element_size()
    rows = cfg.emb_dim * (model.tok_emb.weight.element_size() + model.pos_emb.weight.element_size())
    e = model.trf_blocks[0].att.W_key.weight.element_size()
    mean_keys = sum(min(prompt_len + i, cfg.context_length) for i in range(new_tokens)) / new_tokens
    cache = 2 * cfg.n_layers * mean_keys * cfg.emb_dim * e
    return weights + rows + cache


def first_difference(a, b) -> int | None:
    """Index (among the new tokens) of the first token where ``a`` and ``b`` differ in any sequence, or None."""
    if a.shape != b.shape:
        return 0
    differs = (a != b).any(dim=0).nonzero()
    return None if len(differs) == 0 else int(differs[0])


def run_row(row: Row, args, device, ours, theirs, why_not, uncached_tokens: dict, budget: timing.Budget) -> dict:
    import torch

    result = dict(asdict(row), prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=args.dtype,
                  status="ok", seconds=None, tokens_per_s=None, ms_per_token=None, floor_ms=None, floor_ratio=None,
                  same_tokens=None, first_difference=None)
    if row.contender == "transformers" and theirs is None:
        return dict(result, status=f"skipped: {why_not}")
    if budget.expired():
        return dict(result, status=f"skipped: time budget ({args.budget_s:g} s) spent")
    if row.contender != "transformers" and ours.kernels == "triton" and device.type != "cuda":
        return dict(result, status="skipped: the Triton interpreter is not timed (use --kernels torch on a CPU)")
    prompt = torch.randint(0, args.vocab_size, (row.batch, args.prompt_len), device=device,
                           generator=torch.Generator(device).manual_seed(args.seed))
    seconds, out = timed(generator_for(row, ours, theirs, args), prompt, args.new_tokens, device, args.repeats)
    new = out[:, args.prompt_len:].cpu()
    n_new = new.shape[1]
    result.update(seconds=seconds, tokens_per_s=row.batch * n_new / seconds, ms_per_token=1e3 * seconds / n_new)
    if row.batch == 1:
        step_bytes = floor_bytes_per_token(ours, args.prompt_len, n_new)
        result["floor_ms"] = 1e3 * step_bytes / (args.bandwidth_gbps * 1e9)
        result["floor_ratio"] = result["ms_per_token"] / result["floor_ms"]
    key = row.batch
    if row.contender == "no cache":
        uncached_tokens[key] = new
    if key in uncached_tokens:
        diff = first_difference(new, uncached_tokens[key])
        result.update(same_tokens=diff is None, first_difference=diff)
        if diff is not None and args.dtype == "fp32":
            result["status"] = f"wrong: tokens differ from the uncached loop's at new token {diff}"
    return result


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_no_cache and speedup_vs_transformers on the cache rows (tokens/s ratios at the same batch)."""
    by = {(r["batch"], r["contender"]): r for r in rows}
    for r in rows:
        if r["contender"] != "cache" or not r.get("tokens_per_s"):
            continue
        for other, column in (("no cache", "speedup_vs_no_cache"), ("transformers", "speedup_vs_transformers")):
            o = by.get((r["batch"], other))
            r[column] = r["tokens_per_s"] / o["tokens_per_s"] if o and o.get("tokens_per_s") else None


# ----------------------------------------------------------------------------------------------------------------
# Reporting


STATUS_WIDTH = 70  # characters of a status the table shows; the JSON and CSV hold the whole text


def table(rows: list[dict]) -> str:
    headers = ["batch", "contender", "seconds", "tokens/s", "ms/token", "floor ms", "x floor", "x no cache",
               "x transformers", "tokens", "status"]
    lines = []
    for r in rows:
        same = "-" if r.get("same_tokens") is None else ("same" if r["same_tokens"] else
                                                        f"differ at {r['first_difference']}")
        lines.append([r["batch"], r["contender"], results.fmt_num(r.get("seconds")),
                      results.fmt_num(r.get("tokens_per_s")),
                      results.fmt_num(r.get("ms_per_token")), results.fmt_num(r.get("floor_ms")),
                      results.fmt_num(r.get("floor_ratio")), results.fmt_num(r.get("speedup_vs_no_cache")),
                      results.fmt_num(r.get("speedup_vs_transformers")), same, shorten(r["status"])])
    return results.format_table(headers, lines, right={0, 2, 3, 4, 5, 6, 7, 8})


def shorten(status: str) -> str:
    """A status cut to ``STATUS_WIDTH`` characters for the table, with "..." where it was cut."""
    return status if len(status) <= STATUS_WIDTH else status[:STATUS_WIDTH - 3] + "..."


def plot(rows: list[dict], path: Path) -> Path | None:
    """New tokens per second per contender, grouped by batch."""
    plt = results.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / len(CONTENDERS)
    for i, contender in enumerate(CONTENDERS):
        values = [next((r.get("tokens_per_s") or 0 for r in rows if r["batch"] == b and r["contender"] == contender), 0)
                  for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], values, width, label=contender)
    ax.set_xticks([j + width for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("new tokens / s")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return results.save_figure(fig, path)


def summarize(data: dict) -> str:
    env, meta = data["meta"]["environment"], data["meta"]
    a = meta["args"]
    head = (f"greedy generation on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['date']}): "
            f"{a['n_layers']} layers x {a['emb_dim']} wide, context {a.get('context_length', a.get('context'))}, "
            f"prompt {a['prompt_len']}, "
            f"{a['new_tokens']} new tokens, {a['dtype']}; copy bandwidth "
            f"{results.fmt_num(meta['ceilings']['bandwidth_gbps'])} GB/s")
    stream = meta.get("streaming_overhead")
    return head + "\n\n" + table(data["rows"]) + ("\n\n" + overhead.streaming_line(stream) if stream else "")


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8; 1 2 with --quick)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 32; 8 with --quick)")
    p.add_argument("--new-tokens", type=int, help="tokens to generate (default 256; 24 with --quick)")
    p.add_argument("--context-length", type=int, help="the model's context length (default 512; 64 with --quick)")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--pretrained", help="GPT-2's weights (gpt2, gpt2-medium, ... or a local folder) instead of "
                                        "random ones")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"], help="kernels backend")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="weights' dtype (default bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--repeats", type=int, help="timed runs per row, after one warm-up (default 3 on a GPU, 1 on a "
                                               "CPU)")
    p.add_argument("--vocab-size", type=int, default=50257, help="vocabulary of the random model (default GPT-2's)")
    p.add_argument("--stream-rounds", type=int,
                   help="generations of the streaming-overhead measurement: minigpt.generate.generate_tokens read "
                        "token by token against a bare decoding loop, taking turns (benchmarks/overhead.py); "
                        "default 5, 3 with --quick; 0 skips it")
    common.add_run_args(p, "generate")
    return p


def main(argv: list[str] | None = None) -> int:
    """Check every option, then run; returns the exit status (see kernels/cli.py)."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def check_args(args) -> None:
    if args.prompt_len >= args.context_length:
        raise common.BenchmarkError(f"--prompt-len ({args.prompt_len}) must be shorter than --context-length "
                                    f"({args.context_length})")


def run(args) -> int:
    device = common.start_run(args, summarize, QUICK, FULL, check=check_args,
                              positive=("batches", "prompt_len", "new_tokens", "context_length", "repeats",
                                        "vocab_size", "stream_rounds"), allow_zero=("stream_rounds",))
    if device is None:  # --summarize
        return 0
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.repeats = args.repeats or (3 if device.type == "cuda" else 1)
    ceilings = timing.measure_ceilings(device, [args.dtype], quick=args.quick)
    args.bandwidth_gbps = ceilings["bandwidth_gbps"]
    print(f"benchmarks.generate on {common.device_name(device)}; copy {ceilings['bandwidth_gbps']:.0f} GB/s",
          flush=True)
    budget = timing.Budget(args.budget_s)
    import torch

    try:
        ours, theirs, why_not = build_models(args, device, common.torch_dtype(args.dtype))
    except Exception as exc:  # a pretrained name that cannot be loaded, say: one line, not a traceback
        raise common.BenchmarkError(f"cannot build the models: {common.one_line(exc, 300)}") from None
    args.context_length = ours.cfg.context_length
    uncached_tokens = {}  # batch -> the uncached loop's new tokens
    stream = None  # the streaming loop's overhead, measured after the rows
    # the uncached loop first at each batch: the other rows' tokens are compared with its tokens
    order = sorted(args.contenders, key=lambda c: c != "no cache")
    planned = [Row(b, c) for b in args.batches for c in order]
    out = args.out or common.default_out_dir(device)

    def meta(interrupted=None):
        return results.run_meta(device, ceilings, args, budget, interrupted, COUNTING)

    rows, interrupted = common.run_rows(
        planned, lambda row: run_row(row, args, device, ours, theirs, why_not, uncached_tokens, budget),
        lambda row, r: f"batch {row.batch} {row.contender}: {results.fmt_num(r.get('tokens_per_s'))} tokens/s, "
                       f"{r['status']}", lambda: common.free_memory(device),
        save=results.partial_writer(out, args.name, meta))
    add_speedups(rows)
    if args.stream_rounds and not interrupted and not budget.expired():
        prompt = torch.randint(0, ours.cfg.vocab_size, (1, args.prompt_len), device=device,
                               generator=torch.Generator(device).manual_seed(args.seed))
        stream = overhead.streaming_overhead(ours, prompt, args.new_tokens, args.stream_rounds, device)
        stream.pop("tokens")
        print(overhead.streaming_line(stream), flush=True)
    results.report(out, args.name, rows, dict(meta(interrupted), streaming_overhead=stream), plot, summarize)
    return 0


if __name__ == "__main__":
    sys.exit(main())
