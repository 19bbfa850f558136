"""Device and dtype settings (steerlib.devices): parsing, the capability rule behind `auto`, hardware facts."""

from __future__ import annotations

import pytest
import torch

from steerlib.devices import (
    check_device_name,
    dtype_name,
    hardware_info,
    mixed_precision,
    native_bf16,
    resolve_device,
    resolve_dtype,
)

CPU = torch.device("cpu")
AVX2_ONLY = frozenset({"avx2", "fma"})  # an AMD EPYC seen here: bf16 matmuls ~30x slower than fp32
SAPPHIRE = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"})
ARM_BF16 = frozenset({"asimd", "bf16", "sve"})


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:3", "mps", "xpu:1", "meta"])
def test_device_names_accepted(name: str) -> None:
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "cpu:0:1", "", "tpu"])
def test_device_names_refused_with_the_allowed_forms(name: str) -> None:
    with pytest.raises(ValueError, match="cuda:N"):
        check_device_name(name)


def test_auto_device_follows_cuda_availability() -> None:
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == CPU
    assert resolve_device(torch.device("meta")) == torch.device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_an_error_not_a_cpu_fallback() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")


@pytest.mark.parametrize(("alias", "canonical"), [("bf16", "bfloat16"), ("fp32", "float32"), ("float16", "float16")])
def test_dtype_aliases(alias: str, canonical: str) -> None:
    assert dtype_name(alias) == canonical


def test_unknown_dtype_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="bfloat16, float16, float32"):
        dtype_name("int8")


@pytest.mark.parametrize(
    ("flags", "bf16"), [(AVX2_ONLY, False), (SAPPHIRE, True), (ARM_BF16, True), (frozenset(), False)]
)
def test_cpu_bf16_is_a_capability_check(flags: frozenset[str], bf16: bool) -> None:
    assert native_bf16(CPU, flags) is bf16


@pytest.mark.parametrize(
    ("checkpoint", "flags", "expected"),
    [
        (torch.bfloat16, SAPPHIRE, torch.bfloat16),
        (torch.bfloat16, AVX2_ONLY, torch.float32),  # never bf16 where it is 30x slower
        (torch.float16, AVX2_ONLY, torch.float32),
        (torch.float16, SAPPHIRE, torch.float16),
        (torch.float32, SAPPHIRE, torch.float32),  # auto is the checkpoint's, never narrowed
        (None, SAPPHIRE, torch.float32),
    ],
)
def test_auto_dtype_on_cpus(checkpoint: torch.dtype | None, flags: frozenset[str], expected: torch.dtype) -> None:
    assert resolve_dtype("auto", CPU, checkpoint, flags=flags) == expected


def test_explicit_dtype_is_honoured_even_where_slow() -> None:
    assert resolve_dtype("bfloat16", CPU, torch.float32, flags=AVX2_ONLY) == torch.bfloat16
    assert resolve_dtype(torch.float16, CPU) == torch.float16
    assert resolve_dtype("fp32", CPU, torch.bfloat16, flags=SAPPHIRE) == torch.float32


def test_training_precision() -> None:
    assert mixed_precision("auto", CPU, flags=SAPPHIRE) == torch.bfloat16
    assert mixed_precision("auto", CPU, flags=AVX2_ONLY) is None
    assert mixed_precision("float32", CPU, flags=SAPPHIRE) is None
    assert mixed_precision("bfloat16", CPU, flags=AVX2_ONLY) == torch.bfloat16


def test_hardware_info_records_what_benchmarks_depend_on() -> None:
    info = hardware_info(CPU)
    assert info["device"] == "cpu"
    assert info["torch"] == torch.__version__
    assert info["torch_threads"] == torch.get_num_threads()
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
    assert set(info["cpu_flags"]) <= {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile",
                                      "amx_bf16", "amx_fp16", "bf16", "sve", "sve2", "asimd"}  # fmt: skip
    assert info["bf16_native"] == native_bf16(CPU)
