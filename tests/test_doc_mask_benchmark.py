"""benchmarks/doc_mask.py: two runs that differ only in --doc-mask, and what it reports of them (the measured
figures belong to benchmarks/results/cpu/doc_mask.*, not to a test)."""
from __future__ import annotations

import json

import pytest

from benchmarks import doc_mask


def test_two_runs_differ_only_in_the_mask_and_the_report_says_what_it_changes(tmp_path, capsys):
    assert doc_mask.main(["--steps", "4", "--eval-interval", "2", "--max-docs", "60", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "of the validation positions follow an end-of-text" in out
    data = json.loads((tmp_path / "doc_mask.json").read_text())
    rows = data["rows"]
    assert [(r["doc_mask"], r["step"]) for r in rows] == [(m, s) for m in (False, True) for s in (0, 2, 4)]
    # the same seed builds the same model, so the runs' step-0 losses differ only by the evaluation's mask: close,
    # and not equal, since some windows hold two documents
    first = {r["doc_mask"]: r["val_loss"] for r in rows if r["step"] == 0}
    assert first[False] != first[True] and abs(first[False] - first[True]) < 0.05
    for r in rows:
        assert 0 < r["masked_share"] < 1 and r["step_s"] > 0
        assert r["final_val_masked"] != r["final_val_unmasked"]
    assert (tmp_path / "doc_mask.png").stat().st_size > 0


def test_a_non_positive_setting_is_a_one_line_error(capsys):
    assert doc_mask.main(["--steps", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --steps, --eval-interval and --max-docs must be positive")


@pytest.mark.parametrize("flag", ["--doc-mask", "--no-doc-mask"])
def test_the_runs_flags_are_the_trainers(flag):
    from minigpt.train_config import TrainConfig

    config = TrainConfig.from_args(doc_mask.BASE_FLAGS + [flag])
    assert config.doc_mask == (flag == "--doc-mask") and config.kernels == "torch" and config.data == "stories"
