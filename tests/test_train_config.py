"""TrainConfig and resolve_config: the rules that decide a run's settings, each checked in isolation and in order."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from minigpt.config import ConfigError
from minigpt.train_config import (
    CPU_DEFAULTS,
    FINETUNE_DEFAULTS,
    INTERPRETER_DEFAULTS,
    TrainConfig,
    cpu_demo_note,
    resolve_config,
)

CPU, GPU = torch.device("cpu"), torch.device("cuda")  # resolve_config only reads the device's type


def test_from_args_records_exactly_the_flags_given():
    config = TrainConfig.from_args(["--lr", "5e-4", "--grad-clip", "1.0", "--preset", "tiny"])
    assert config.given == {"lr", "grad_clip", "preset"}
    assert (config.lr, config.grad_clip, config.preset) == (5e-4, 1.0, "tiny")


def test_a_config_built_in_python_counts_its_non_default_fields_as_given():
    assert TrainConfig(preset="tiny", lr=1e-3).given_flags() == {"preset", "lr"}


def test_the_config_is_frozen_and_its_record_rebuilds_it():
    config = resolve_config(TrainConfig.from_args(["--preset", "tiny"]), CPU)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    assert TrainConfig(**config.record()) == config
    assert "given" not in config.record()


def test_on_a_gpu_the_defaults_are_the_original_notebooks():
    config = resolve_config(TrainConfig.from_args(["--dtype", "fp32"]), GPU)
    assert (config.preset, config.lr, config.batch_size, config.tokenizer, config.max_docs, config.max_steps) == (
        "gpt2-124m", 5e-4, 8, "auto", None, None)


def test_no_gpu_and_no_preset_is_the_cpu_demo_and_given_flags_still_win():
    config = resolve_config(TrainConfig.from_args(["--lr", "1e-2"]), CPU)
    assert config.preset == "tiny" and config.lr == 1e-2  # given: wins over the demo's 5e-3
    for name, value in CPU_DEFAULTS.items():
        if name != "lr":
            assert getattr(config, name) == value, name


def test_the_cpu_demo_with_triton_kernels_is_sized_for_the_interpreter_and_given_flags_still_win():
    config = resolve_config(TrainConfig.from_args(["--kernels", "triton", "--max-steps", "7"]), CPU)
    assert config.preset == "tiny" and config.max_steps == 7  # given: wins over the interpreter demo's
    for name, value in {**CPU_DEFAULTS, **INTERPRETER_DEFAULTS}.items():
        if name != "max_steps":
            assert getattr(config, name) == value, name
    note = cpu_demo_note(config)
    assert note.startswith("no GPU and no --preset: our Triton kernels in the interpreter") and "7 steps" in note
    assert "--kernels torch for the full CPU demo" in note
    # the interpreter's sizes only with --kernels triton: the torch demo, a GPU, a preset keep theirs
    assert resolve_config(TrainConfig.from_args([]), CPU).emb_dim is None
    assert resolve_config(TrainConfig.from_args(["--kernels", "triton", "--dtype", "fp32"]), GPU).emb_dim is None
    assert resolve_config(TrainConfig.from_args(["--kernels", "triton", "--preset", "tiny"]), CPU).max_steps is None


def test_compare_torch_refuses_a_negative_count():
    from minigpt.train_config import check_args

    with pytest.raises(ConfigError, match="--compare-torch must be >= 0"):
        check_args(resolve_config(TrainConfig.from_args(["--compare-torch", "-1"]), CPU))


def test_a_preset_on_a_cpu_is_not_the_demo():
    config = resolve_config(TrainConfig.from_args(["--preset", "small"]), CPU)
    assert (config.preset, config.lr, config.max_steps, config.tokenizer) == ("small", 5e-4, None, "auto")


def test_fine_tuning_takes_gpt2s_tokenizer_and_a_small_rate_on_any_machine():
    for device, extra in ((CPU, []), (GPU, ["--dtype", "fp32"])):
        config = resolve_config(TrainConfig.from_args(["--init-from", "gpt2", *extra]), device, fine_tune=True)
        assert (config.lr, config.tokenizer) == (FINETUNE_DEFAULTS["lr"], FINETUNE_DEFAULTS["tokenizer"])
        assert config.preset is None and config.max_steps is None  # the shape is the weights'; not the demo


def test_resuming_continues_the_checkpoints_settings_unless_given_again():
    first = resolve_config(TrainConfig.from_args(["--preset", "tiny", "--grad-clip", "0.5", "--seed", "7",
                                                  "--lr", "2e-3", "--dtype", "bf16"]), CPU)
    checkpoint = {"args": first.record(), "preset": "tiny"}
    resumed = resolve_config(TrainConfig.from_args(["--resume", "auto", "--seed", "123"]), CPU, checkpoint)
    assert (resumed.grad_clip, resumed.lr, resumed.dtype) == (0.5, 2e-3, "bf16")  # not given: the checkpoint's
    assert resumed.seed == 123  # given, with the default's value: it wins
    assert resumed.preset == "tiny" and resumed.resume == "auto" and resumed.max_steps is None  # not the CPU demo


def test_an_old_checkpoints_unset_values_still_resume():
    """Checkpoints of earlier versions recorded the flags as parsed, with None for the ones left unset."""
    old = {"args": {"lr": 3e-3, "min_lr": None, "dtype": "auto", "batch_size": 4, "max_steps": 20}, "preset": None}
    resumed = resolve_config(TrainConfig.from_args(["--resume", "auto"]), CPU, old)
    assert (resumed.lr, resumed.min_lr, resumed.dtype, resumed.batch_size, resumed.max_steps) == (
        3e-3, None, "fp32", 4, 20)


def test_the_machine_decides_the_precision():
    assert resolve_config(TrainConfig.from_args(["--preset", "tiny"]), CPU).dtype == "fp32"
    assert resolve_config(TrainConfig.from_args(["--preset", "tiny", "--dtype", "bf16"]), CPU).dtype == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_config(TrainConfig.from_args(["--preset", "tiny", "--dtype", "fp16"]), CPU)


def test_doc_mask_is_off_unless_given_and_a_resume_continues_the_checkpoints():
    assert resolve_config(TrainConfig.from_args(["--preset", "tiny"]), CPU).doc_mask is False
    on = resolve_config(TrainConfig.from_args(["--preset", "tiny", "--doc-mask"]), CPU)
    assert on.doc_mask is True and on.record()["doc_mask"] is True
    checkpoint = {"args": on.record(), "preset": "tiny"}
    assert resolve_config(TrainConfig.from_args(["--resume", "auto"]), CPU, checkpoint).doc_mask is True
    assert resolve_config(TrainConfig.from_args(["--resume", "auto", "--no-doc-mask"]), CPU,
                          checkpoint).doc_mask is False
    # a checkpoint written before the setting existed trained across documents, and goes on doing so
    older = {"args": {k: v for k, v in on.record().items() if k != "doc_mask"}, "preset": "tiny"}
    assert resolve_config(TrainConfig.from_args(["--resume", "auto"]), CPU, older).doc_mask is False


def test_cpu_threads_are_shared_between_the_ranks_on_one_machine(monkeypatch):
    from minigpt.runtime import cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(8)
        assert cpu_threads(1) == 8  # alone: torch's default stays
        assert cpu_threads(2) == 4 and torch.get_num_threads() == 4  # two ranks here: half each
        torch.set_num_threads(3)
        assert cpu_threads(4) == 1  # never below one
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # given by the user (or torchrun): it wins
        torch.set_num_threads(3)
        assert cpu_threads(2) == 3
    finally:
        torch.set_num_threads(before)
