"""`--dtype auto`: one decision, faked both ways (native bf16 or not), honoured by the trainer's
config, the launcher's presets and ATEN_CPU_CAPABILITY."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from example_trainer import machine
from example_trainer.config import parse_config, save_config
from example_trainer.launch import PRESETS, dtype_args
from example_trainer.machine import auto_dtype, cpu_has_native_bf16, resolve_dtype


@pytest.fixture()
def x86(monkeypatch):
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")


@pytest.mark.parametrize("flags, capability, native", [
    ({"avx", "avx2", "fma"}, "AVX2", False),  # AMD Zen 3, Intel before Cooper Lake
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", True),  # Zen 4, Cooper Lake
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "AVX512", True),  # Sapphire Rapids
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX2", False),  # ATEN_CPU_CAPABILITY=avx2
    ({"avx2", "avx512f"}, "AVX512", False),  # AVX512 without its bf16 extension (Skylake-X)
])
def test_native_bf16_needs_the_instructions_and_torch_allowed_to_use_them(
        x86, flags, capability, native):
    assert cpu_has_native_bf16(frozenset(flags), capability) is native


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_on_a_cpu_follows_native_bf16(native, expected):
    assert auto_dtype(cuda=False, native_bf16=native) == expected
    assert resolve_dtype("auto", cuda=False, native_bf16=native) == expected


def test_auto_on_cuda_is_bf16_whatever_the_cpu():
    # (float16 only on a GPU without bf16, which this machine cannot fake)
    assert resolve_dtype("auto", cuda=True, native_bf16=False) == "bfloat16"


def test_explicit_dtype_wins_with_a_warning_when_bf16_is_emulated(caplog):
    with caplog.at_level(logging.WARNING, logger="example_trainer.machine"):
        assert resolve_dtype("bfloat16", cuda=False, native_bf16=False) == "bfloat16"
    assert "emulates it" in caplog.text and "float32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="example_trainer.machine"):
        assert resolve_dtype("bfloat16", cuda=False, native_bf16=True) == "bfloat16"
        assert resolve_dtype("float32", cuda=False, native_bf16=False) == "float32"
    assert caplog.text == ""
    with pytest.raises(ValueError, match="choose one of auto"):
        resolve_dtype("fp8")


def test_the_choice_is_logged_and_saved_in_config_json(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="example_trainer.machine"):
        cfg = parse_config([])
    assert cfg.dtype == auto_dtype() and cfg.dtype in ("bfloat16", "float32")
    assert f"--dtype auto -> {cfg.dtype}" in caplog.text
    save_config(cfg, tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == cfg.dtype
    assert parse_config(["--dtype", "float16"]).dtype == "float16"


def test_aten_cpu_capability_avx2_forces_the_no_bf16_decision():
    """The documented way to measure the AVX2 path on a bf16 CPU: torch's dispatch cap."""
    code = "from example_trainer.machine import auto_dtype, cpu_capability; " \
           "print(cpu_capability(), auto_dtype(cuda=False))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}).stdout.split()
    assert out == ["AVX2", "float32"]


@pytest.mark.parametrize("dtype, optimizer", [("bfloat16", "adamw_fp32_master"),
                                              ("float32", "adamw")])
def test_presets_put_vllm_and_trainer_on_one_dtype_with_its_optimizer(dtype, optimizer):
    trainer, vllm = dtype_args(PRESETS["cpu-demo"], dtype)
    assert vllm == ["--dtype", dtype]
    assert trainer == ["--dtype", dtype, "--optimizer", optimizer]
    # LoRA adapters are fp32 whatever the base: no optimizer override.
    assert dtype_args(PRESETS["cpu-lora"], dtype)[0] == ["--dtype", dtype]
    for preset in PRESETS.values():  # no preset hard-codes a dtype or an optimizer any more
        assert not {"--dtype", "--optimizer"} & set(preset.trainer_args + preset.vllm_args)


def test_machine_info_names_cpu_capability_and_dtype():
    info = machine.machine_info()
    assert info["cpu_capability"] == machine.cpu_capability()
    assert info["auto_dtype"] == auto_dtype()
    assert info["versions"]["torch"]
