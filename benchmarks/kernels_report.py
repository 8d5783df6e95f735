"""What ``python -m benchmarks.kernels`` prints and draws from its rows: the terminal table, the memory table of the
loss rows, the figure and the summary (also ``--summarize JSON`` and ``run_all.sh``'s summary.md).

Each op has its own contenders (its module's ``CONTENDERS``, ``benchmarks/ops/``): a table column or a plot line
exists for a contender only where it ran. An op's own columns that its module names in ``TABLE_FIELDS`` (the
document rows' tiles) follow the times. Rows are plain dicts, as written to the JSON file, so a saved run is
summarized by the same code.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

from benchmarks import results
from benchmarks.ops import MODULES

# every contender, in column order
CONTENDERS = ("triton", "math", "math_compile", "pytorch", "chunked", "flex", "sdpa_mask", "triton_causal")
RATE_OPS = ("attention", "doc_attention", "linear_cross_entropy")  # counted in FLOPs; the others in bytes
SEQUENCE_OPS = ("attention", "doc_attention")  # their x axis is the sequence length


def contenders(op: str) -> tuple[str, ...]:
    """The contenders of ``op``'s rows, triton first (its module's ``CONTENDERS``)."""
    return MODULES[op].CONTENDERS


def _present(rows: list[dict]) -> list[str]:
    """The contenders that have rows, in column order."""
    names = {r["contender"] for r in rows}
    return [c for c in CONTENDERS if c in names]


def _cell(row: dict | None, speedup: bool = True) -> str:
    """A contender's time (with triton's speed-up over it), or the first word of why there is none."""
    if row is None:
        return "-"
    if row["ms"] is None:
        word = row["status"].split(":")[0]
        return word.upper() if word in ("wrong", "failed") else "not timed" if word.startswith("not timed") else word
    ratio = f" ({row['triton_speedup']:.2f}x)" if speedup and row["triton_speedup"] else ""
    return f"{results.fmt_num(row['ms'])} ms{ratio}"


def _mib(row: dict | None) -> str:
    return "-" if not row or row.get("peak_mem_mib") is None else results.fmt_num(row["peak_mem_mib"])


def progress(rows: list[dict]) -> str:
    """One case on one line: each contender's times (passes joined by '/') or why it has none."""
    by = {name: [r for r in rows if r["contender"] == name] for name in _present(rows)}
    return "; ".join(f"{name} " + ("/".join(results.fmt_num(r["ms"]) for r in rs) + " ms" if all(r["ms"] for r in rs)
                                   else _cell(next(r for r in rs if not r["ms"]), False)) for name, rs in by.items())


def _rate(row: dict | None) -> tuple[str, str]:
    """(throughput, share of the ceiling) of a timed row, as table cells."""
    if not row or not row.get("ms"):
        return "-", "-"
    if row["tflops"]:
        return f"{results.fmt_num(row['tflops'])} TF/s", f"{results.fmt_num(row['pct_matmul_peak'])}%"
    return f"{row['gbps']:.0f} GB/s", f"{row['pct_bandwidth']:.0f}%"


def _fields(rows: list[dict]) -> list[str]:
    """The op-specific columns the tables show (``TABLE_FIELDS`` of the rows' ops), in order."""
    ops = dict.fromkeys(r["op"] for r in rows)
    return list(dict.fromkeys(f for op in ops if op in MODULES for f in getattr(MODULES[op], "TABLE_FIELDS", ())))


def _field_cells(by: dict, fields: list[str]) -> list[str]:
    """A case's values of ``fields``: the same in every contender's row, taken from the first that has them."""
    return [next((str(r[f]) for r in by.values() if r.get(f) is not None), "") for f in fields]


def _by_case(rows: list[dict]) -> dict:
    cases: dict = {}
    for r in rows:
        cases.setdefault((r["family"], r["shape"], r["pass"]), {})[r["contender"]] = r
    return cases


def table(rows: list[dict]) -> str:
    """One line per case and pass: triton's time, throughput and share of the ceiling, then every other contender's
    time with triton's speed-up over it in parentheses (> 1: triton is faster)."""
    others = [c for c in _present(rows) if c != "triton"]
    fields = _fields(rows)
    lines = [[family, pass_, shape, _cell(by.get("triton"), False), *_rate(by.get("triton"))]
             + [_cell(by.get(c)) for c in others] + _field_cells(by, fields)
             for (family, shape, pass_), by in _by_case(rows).items()]
    return results.format_table(["case", "pass", "shape", "triton", "rate", "% ceil", *others, *fields], lines,
                               right=set(range(3, 6 + len(others))))


def memory_table(rows: list[dict]) -> str:
    """The rows with a peak memory (the loss's): one line per case and pass, each contender's time and peak MiB
    beyond the inputs, then the chunked and triton paths' time and memory as a multiple of the plain formula's."""
    cases = {key: by for key, by in _by_case(rows).items()
             if any(r.get("peak_mem_mib") is not None for r in by.values())}
    if not cases:
        return ""
    names = _present([r for by in cases.values() for r in by.values()])
    lines = []
    for (family, shape, pass_), by in cases.items():
        plain = by.get("math") or {}
        ratios = []
        for c in ("chunked", "triton"):
            r = by.get(c) or {}
            ratios += [f"{r[key] / plain[key]:.3g}x" if r.get(key) is not None and plain.get(key) else "-"
                       for key in ("ms", "peak_mem_mib")]
        cells = [f"{_cell(by.get(c), False)}, {_mib(by.get(c))} MiB" if by.get(c) and by[c]["ms"] else
                 _cell(by.get(c), False) for c in names]
        lines.append([family, pass_, shape] + cells + ratios)
    return results.format_table(["case", "pass", "shape"] + names
                               + ["chunked/math ms", "chunked/math MiB", "triton/math ms", "triton/math MiB"], lines,
                               right=set(range(3, 7 + len(names))))


def plot(rows: list[dict], ceilings: dict, path: Path) -> Path | None:
    """One figure: a subplot per family (rows) and pass (columns), throughput vs size, a line per contender, the
    device's ceiling dashed; for the loss also a row of peak memory. A family measured at one size only gets bars."""
    plt = results.pyplot()
    if plt is None:
        return None
    panels = []  # (family, what): what is "rate" or "memory"
    for family in dict.fromkeys(r["family"] for r in rows):
        panels.append((family, "rate"))
        if any(r.get("peak_mem_mib") is not None for r in rows if r["family"] == family):
            panels.append((family, "memory"))
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    fig, axes = plt.subplots(len(panels), len(passes), figsize=(4.2 * len(passes), 3.2 * len(panels)),
                             squeeze=False)
    for (i, (family, what)), (j, pass_) in itertools.product(enumerate(panels), enumerate(passes)):
        ax, sel = axes[i][j], [r for r in rows if r["family"] == family and r["pass"] == pass_]
        if sel:
            _panel(ax, sel, what, ceilings)
        ax.set_title(f"{family} — {pass_}" + (" — peak memory" if what == "memory" else ""), fontsize=9)
    fig.tight_layout()
    return results.save_figure(fig, path)


def _panel(ax, sel: list[dict], what: str, ceilings: dict) -> None:
    op = sel[0]["op"]
    key = "peak_mem_mib" if what == "memory" else "tflops" if op in RATE_OPS else "gbps"
    sizes = sorted({r["size"] for r in sel})
    names = _present(sel)
    if len(sizes) == 1:  # one size: a bar per contender, its value on top
        values = [next((r[key] for r in sel if r["contender"] == c and r.get(key)), 0) or 0 for c in names]
        bars = ax.bar(names, values, color=[f"C{CONTENDERS.index(c)}" for c in names])
        for bar, name, value in zip(bars, names, values):
            text = results.fmt_num(value) if value else _cell(next(r for r in sel if r["contender"] == name), False)
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    else:
        for name in names:
            points = [(r["size"], r[key]) for r in sel if r["contender"] == name and r.get(key)]
            if points:
                ax.plot(*zip(*points), marker="o", label=name, color=f"C{CONTENDERS.index(name)}")
            else:
                ax.plot([], [], " ", label=f"{name}: {_cell(next(r for r in sel if r['contender'] == name))}")
        if any(r.get(key) for r in sel):
            ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T" if op in SEQUENCE_OPS else "width C" if op == "linear_cross_entropy"
                      else "width (columns)")
    if what == "rate":
        matmul = ceilings["matmul_tflops"]
        ceiling = ceilings["bandwidth_gbps"] if key == "gbps" else matmul.get(sel[0]["dtype"], matmul["bf16"])
        ax.axhline(ceiling, color="grey", linestyle="--", linewidth=1, label="device ceiling")
    ax.set_ylabel({"gbps": "GB/s (fewest bytes)", "peak_mem_mib": "peak MiB beyond the inputs"}.get(
        key, {"attention": "TFLOP/s (causal count)", "doc_attention": "TFLOP/s (pairs the documents allow)"}.get(
            op, "TFLOP/s (matmul count)")))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def summarize(data: dict) -> str:
    """Per family and pass: triton at the largest size, and its geometric-mean speed-up over each contender (with
    the number of sizes it is taken over), and the ops' own ``TABLE_FIELDS`` at that size; the loss rows' peak
    memory; then the checks, every wrong or failed row and the ops' notes."""
    rows, meta = data["rows"], data["meta"]
    env, ceil = meta["environment"], meta["ceilings"]
    others = [c for c in _present(rows) if c != "triton"]
    fields = _fields(rows)
    lines = []
    for family, pass_ in dict.fromkeys((r["family"], r["pass"]) for r in rows):
        sel = [r for r in rows if r["family"] == family and r["pass"] == pass_]
        top = max((r for r in sel if r["contender"] == "triton" and r["ms"]), key=lambda r: r["size"], default=None)
        speedups = []
        for c in others:
            s = [r["triton_speedup"] for r in sel if r["contender"] == c and r["triton_speedup"]]
            speedups.append(f"{math.exp(sum(map(math.log, s)) / len(s)):.2f}x ({len(s)})" if s else "-")
        largest = {r["contender"]: r for r in sel if r["size"] == max(x["size"] for x in sel)}
        lines.append([family, pass_, top["shape"] if top else "-", _cell(top, False), *_rate(top), *speedups,
                      *_field_cells(largest, fields)])
    triton = {(r["family"], r["shape"]): r["checked"] for r in rows if r["contender"] == "triton"}
    bad = dict.fromkeys(f"  {r['family']} {r['shape']} {r['contender']}: {r['status'].splitlines()[0]}" for r in rows
                        if r["status"].startswith(("wrong", "failed")))
    memory = memory_table(rows)
    return "\n".join([
        f"kernels on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['date']}); ceilings: copy "
        f"{ceil['bandwidth_gbps']:.0f} GB/s, matmul " + ", ".join(f"{k} {results.fmt_num(v)} TFLOP/s"
                                                                for k, v in ceil["matmul_tflops"].items()), "",
        results.format_table(["family", "pass", "largest", "triton", "rate", "% ceil"]
                            + [f"vs {c} (geo-mean)" for c in others] + [f"{f} (largest)" for f in fields], lines), ""]
        + ([f"time and peak memory beyond the inputs ({meta.get('memory_method', 'see benchmarks/memory.py')}):",
             memory, ""]
           if memory else [])
        + [f"triton checked correct in {sum(v is True for v in triton.values())} of {len(triton)} cases; "
           f"{len(bad)} wrong or failed (case, contender)" + (":" if bad else ""), *bad]
        + (["", "attention tiles (BLOCK_M, BLOCK_N, warps, stages) the tuner chose:"]
           + [f"  {line}" for line in meta.get("attention_tiles", [])] if meta.get("attention_tiles") else [])
        + [line for lines in (meta.get("notes") or {}).values() for line in ["", *lines]])
