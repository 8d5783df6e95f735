"""Checkpoints: saved whole or not at all, loaded back as saved, and every load failure is one line with its fix."""
from __future__ import annotations

import pytest
import torch

from minigpt.checkpoint import CheckpointError, load_model_state, load_torch, save_torch
from minigpt.train import main

TINY = ["--data", "stories", "--max-docs", "20", "--tokenizer", "bytes", "--preset", "tiny", "--max-steps", "1",
        "--no-progress", "--device", "cpu", "--kernels", "torch"]


@pytest.mark.parametrize("out_dir", ["", "  "])
def test_an_empty_out_dir_is_refused_in_one_line(tmp_path, monkeypatch, out_dir):
    monkeypatch.chdir(tmp_path)  # were it taken for the current folder, the run would write here
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out-dir", out_dir, "--cache-dir", str(tmp_path / "cache")])
    msg = str(e.value)
    assert msg.startswith("error: --out-dir is empty") and "--out-dir out" in msg and "\n" not in msg
    assert not (tmp_path / "checkpoint.pt").exists()


def test_saved_and_loaded_back(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"  # the folder is created
    save_torch({"step": 3, "w": torch.arange(4.0)}, path)
    loaded = load_torch(path)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_each_load_failure_is_one_line_with_its_fix(tmp_path):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"PK\x03\x04 half a zip")
    for path, says in ((tmp_path / "missing.pt", "no checkpoint at"), (tmp_path, "is a folder — pass the checkpoint"),
                       (damaged, "is not a readable checkpoint")):
        with pytest.raises(CheckpointError, match=says) as e:
            load_torch(path)
        assert "\n" not in str(e.value) and " — " in str(e.value)


def test_a_state_dict_of_another_shape_names_the_flags(tmp_path):
    model = torch.nn.Linear(4, 2)
    with pytest.raises(CheckpointError, match="does not match the model configuration.*--preset") as e:
        load_model_state(model, torch.nn.Linear(4, 3).state_dict(), "checkpoint.pt")
    assert "\n" not in str(e.value)
