"""What a benchmark leaves behind: the results files (JSON, CSV, the figure), what they record besides their rows,
and the tables and summaries printed from them.

A run writes ``<name>.json`` ({"meta": ..., "rows": [...]}), ``<name>.csv`` (one line per row) and ``<name>.png``;
``--summarize JSON`` reads a saved run back (``read_results``) and prints the same summary.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import math
import os
import platform
import sys
from pathlib import Path

from benchmarks.common import BenchmarkError, device_name, l2_cache_bytes, one_line
from benchmarks.timing import Budget
from minigpt.files import atomic_open
from minigpt.metrics import csv_cell


def environment(device) -> dict:
    """Versions, device and date: what a results table must state next to its numbers."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), l2_bytes=l2_cache_bytes(device))
    else:
        info.update(cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
                    load_average_1m=round(os.getloadavg()[0], 2))  # other work on the machine slows the timings
    return info


def run_meta(device, ceilings: dict, args, budget: Budget, interrupted: str | None, counting: str) -> dict:
    """What the JSON file records besides its rows."""
    return dict(environment=environment(device), ceilings=ceilings, counting=counting, interrupted=interrupted,
                seconds=round(budget.spent(), 1),
                args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})


def read_results(path: Path) -> dict:
    """A results JSON written by a benchmark (for --summarize); a one-line error when it cannot be read."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"cannot read results from {path}: {one_line(e)} — pass the kernels.json or "
                           "train.json a benchmark run wrote") from None
    if not isinstance(data, dict) or "rows" not in data or "meta" not in data:
        raise BenchmarkError(f"{path} is not a benchmark results file (no 'rows' and 'meta') — pass the "
                           "kernels.json or train.json a benchmark run wrote")
    return data


def report(out_dir: Path, stem: str, rows: list[dict], meta: dict, plot, summarize) -> None:
    """Write the results (``finish``), print their summary and the files written."""
    rows, paths = finish(out_dir, stem, rows, meta, plot)
    print("\n" + summarize({"rows": rows, "meta": meta}))
    print("wrote " + ", ".join(str(p) for p in paths))


def finish(out_dir: Path, stem: str, rows: list[dict], meta: dict, plot) -> tuple[list[dict], list[Path]]:
    """Give every row every column, write ``<stem>.json``, ``.csv`` and (``plot(rows, path)``) ``.png``."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k) for k in keys} for r in rows]
    paths = write_results(out_dir, stem, rows, meta)
    try:
        png = plot(rows, out_dir / f"{stem}.png") if rows else None
    except Exception as exc:  # a figure is a convenience: the numbers are already written
        print(f"warning: no {stem}.png ({one_line(exc)})", file=sys.stderr)
        png = None
    return rows, paths + ([png] if png else [])


def write_results(out_dir: Path, stem: str, rows: list[dict], meta: dict) -> list[Path]:
    """``<stem>.json`` ({"meta": ..., "rows": [...]}) and ``<stem>.csv`` (one line per row) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    with _naming(json_path), atomic_open(json_path) as f:  # a run killed mid-write leaves the previous file
        f.write((json.dumps({"meta": meta, "rows": rows}, indent=1, default=_jsonable) + "\n").encode())
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(row.get(k)) for k in columns})
    with _naming(csv_path), atomic_open(csv_path) as f:
        f.write(text.getvalue().encode())
    return [json_path, csv_path]


@contextlib.contextmanager
def _naming(path: Path):
    """Give an OSError raised while writing ``path`` that file's name: a failed write (a full disk) names none, and
    the one-line error at the command line should say which file it was."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def partial_writer(out_dir: Path, stem: str, meta):
    """``save(rows)`` for ``run_rows``: the results so far, with ``meta()`` marked partial (the final write
    replaces them)."""
    return lambda rows: write_results(out_dir, stem, rows, dict(meta(), partial=True))


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def format_table(headers: list[str], lines: list[list], right: set[int] | None = None) -> str:
    """A plain fixed-width table; ``right`` holds the indices of right-aligned (numeric) columns."""
    right = right or set()
    cells = [[("" if c is None else str(c)) for c in line] for line in lines]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]

    def fmt(line):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule] + [fmt(line) for line in cells])


def fmt_num(value, digits: int = 3) -> str:
    """A number in a table cell: 3 significant digits, '-' for missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def pyplot():
    """matplotlib's pyplot with a file-only backend (no display needed), or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt

