"""notebooks/tour.ipynb: it runs top to bottom (offline, on the CPU, in this Python with this minigpt) within its
time budget, and it is committed stripped (no outputs, no execution counts, no per-cell metadata)."""
import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "tour.ipynb"
CELL_TIMEOUT_S = 90  # the longest cell (the training run) took 7.6 s on two idle cores (benchmarks.course_times)
TOTAL_BUDGET_S = 120  # the tour promises under a minute on a laptop CPU (10 s measured on two idle cores)
# What a stripped notebook keeps at the top level (nbstripout keeps the same two)
NOTEBOOK_METADATA = {"kernelspec", "language_info"}
REPORT_PREFIX = "TOUR-KERNEL "


def test_notebook_is_stripped():
    """Outputs in git would go stale and bloat diffs: clear them before committing (e.g. `jupyter nbconvert
    --clear-output --inplace notebooks/tour.ipynb`, or nbstripout)."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert set(nb["metadata"]) <= NOTEBOOK_METADATA, f"notebook metadata beyond {sorted(NOTEBOOK_METADATA)}"
    assert nb["metadata"].get("kernelspec", {}).get("name", "python3") == "python3"
    for i, cell in enumerate(nb["cells"]):
        where = f"cell {i} ({cell.get('id', '?')})"
        assert not cell.get("metadata"), f"{where} has metadata {cell['metadata']}"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{where} has outputs — clear them before committing"
            assert cell["execution_count"] is None, f"{where} has an execution count — clear outputs"


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # The kernel must be this Python (with this checkout's minigpt), not whatever "python3" kernelspec the machine
    # has: put a python3 kernelspec that names sys.executable first on Jupyter's search path.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(tmp_path / "jupyter"),
                                                                      os.environ.get("JUPYTER_PATH")])))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the tour's temporary folder, even if a cell fails
    # One thread in the kernel: on a shared machine a two-thread OpenMP team stalls whenever another process holds
    # a core (measured on 2 busy cores: 100 of the tour's training steps took 12 s with one thread, 3 minutes with two),
    # and the tour's small matmuls gain little from a second thread on an idle one.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    n_cells = len(nb.cells)
    # one extra cell, run last: which Python and which minigpt the kernel used, and whether the tour's temporary
    # folder (WORK) is gone
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json, sys, minigpt\n"
        f"print({REPORT_PREFIX!r} + json.dumps({{'python': sys.executable, 'minigpt': minigpt.__file__, "
        "'work_left': WORK.exists()}))"))
    cwd = tmp_path / "cwd"  # the kernel's working folder: the tour must write nothing here
    cwd.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(cwd)}})
    start = time.monotonic()
    client.execute()  # raises CellExecutionError (with the traceback) when a cell fails
    elapsed = time.monotonic() - start

    report = [line for o in nb.cells[-1].outputs if o.output_type == "stream"
              for line in o.text.splitlines() if line.startswith(REPORT_PREFIX)]
    assert len(report) == 1, nb.cells[-1].outputs
    kernel = json.loads(report[0][len(REPORT_PREFIX):])
    assert kernel["python"] == sys.executable
    assert Path(kernel["minigpt"]).resolve().is_relative_to(ROOT), kernel["minigpt"]
    assert not kernel["work_left"], "the tour's last cell should remove its temporary folder"
    assert list(cwd.iterdir()) == [], "the tour wrote into its working folder instead of its temporary one"

    errors = [(c.id, o) for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    images = [c.id for c in nb.cells[:n_cells] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the loss plot was not shown inline"
    assert elapsed < TOTAL_BUDGET_S, f"the tour took {elapsed:.0f} s, over its {TOTAL_BUDGET_S} s budget"
