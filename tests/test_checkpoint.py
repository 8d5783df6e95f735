"""Where a run writes: the --out-dir it is given, and the temporary files its atomic writes leave behind."""
from __future__ import annotations

import pytest

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
