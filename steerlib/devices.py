"""Which device and dtype a run uses: one ``device`` and one ``dtype`` setting, named the same at every entry point.

``device``: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu[:N]`` or
``meta`` (shapes only, for tests). ``dtype``: ``auto`` (the checkpoint's own dtype where the hardware runs it fast,
else float32), ``bfloat16``, ``float16`` or ``float32``.

Whether bf16 is fast is decided by a capability check, never by the device's name: a GPU that reports native bf16,
or a CPU whose flags show AVX512-BF16 / AMX-BF16 (x86) or BF16 (Arm). On an AVX2-only CPU bf16 matrix products
ran about 30x slower than fp32 here, so ``auto`` never picks bf16 there. :func:`hardware_info` records the facts a
benchmark's numbers depend on (CPU model and flags, GPU name, torch version, threads).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

DtypeName = Literal["auto", "bfloat16", "float16", "float32"]
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
_DEVICE_RE = re.compile(r"auto|cpu|meta|mps|(cuda|xpu)(:\d+)?")
DEVICE_HELP = "auto (CUDA when present, else cpu), cpu, cuda, cuda:N, mps, xpu[:N] or meta"
DTYPE_HELP = "auto (the checkpoint's dtype where this hardware runs it fast, else float32), bfloat16, float16, float32"
_CPU_FLAGS_KEPT = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16",
                   "bf16", "sve", "sve2", "asimd")  # fmt: skip


def check_device_name(name: str) -> str:
    """``name`` if it is a device setting steerlib understands; a ``ValueError`` listing the allowed forms if not."""
    if not isinstance(name, str) or not _DEVICE_RE.fullmatch(name):
        raise ValueError(f"device {name!r} is not one of: {DEVICE_HELP}")
    return name


def dtype_name(name: str) -> str:
    """The canonical dtype setting for ``name`` (``bf16`` -> ``bfloat16``); a ``ValueError`` naming the allowed ones."""
    canonical = _DTYPE_ALIASES.get(name, name)
    if canonical != "auto" and canonical not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of: {DTYPE_HELP}")
    return canonical


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device a setting names; ``auto`` is ``cuda`` when CUDA is usable, else ``cpu``.

    A device that is named but not usable here is an error, never a silent fallback to the CPU.
    """
    if isinstance(name, torch.device):
        return name
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r}: CUDA is not available here (torch {torch.__version__}); use cpu or auto"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available here; use cpu or auto")
    return dev


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """True where bf16 matrix products run natively: a GPU that says so, or a CPU with BF16 instructions."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        f = cpu_flags() if flags is None else flags
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & f)
    return device.type in ("xpu", "mps", "meta")


def native_fp16(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """True where fp16 runs fast: any GPU; a CPU only with AVX512-FP16 / AMX-FP16 (Arm's asimdhp is too narrow)."""
    if device.type == "cpu":
        f = cpu_flags() if flags is None else flags
        return bool({"avx512_fp16", "amx_fp16"} & f)
    return True


def resolve_dtype(
    name: str | torch.dtype,
    device: torch.device,
    checkpoint: torch.dtype | None = None,
    *,
    flags: frozenset[str] | None = None,
) -> torch.dtype:
    """The compute dtype a setting names on ``device``.

    ``auto``: the checkpoint's dtype (``checkpoint``; float32 when unknown) if the device runs it fast; a bf16
    checkpoint on a GPU without bf16 runs in float16 (as vLLM does), and on a CPU without native bf16 (or fp16) in
    float32. An explicit half dtype on hardware without it is honoured with a warning. ``flags`` overrides the CPU's
    own (tests describe other CPUs with it).
    """
    if isinstance(name, torch.dtype):
        return name
    canonical = dtype_name(name)
    if canonical != "auto":
        wanted = DTYPES[canonical]
        if not _fast(wanted, device, flags):
            log.warning("dtype %s on %s: this hardware has no native %s; float32 would be faster", canonical,
                        device, canonical)  # fmt: skip
        return wanted
    own = checkpoint if checkpoint in (torch.bfloat16, torch.float16) else torch.float32
    if _fast(own, device, flags):
        return own
    if own == torch.bfloat16 and device.type == "cuda":
        return torch.float16
    return torch.float32


def _fast(dtype: torch.dtype, device: torch.device, flags: frozenset[str] | None) -> bool:
    if dtype == torch.bfloat16:
        return native_bf16(device, flags)
    if dtype == torch.float16:
        return native_fp16(device, flags)
    return True


def mixed_precision(name: str, device: torch.device, *, flags: frozenset[str] | None = None) -> torch.dtype | None:
    """The autocast dtype of a training ``dtype`` setting (``auto`` = bf16 where native, else none: plain fp32)."""
    canonical = dtype_name(name)
    if canonical == "float32":
        return None
    if canonical == "auto":
        return torch.bfloat16 if native_bf16(device, flags) else None
    return DTYPES[canonical]


def hardware_info(device: torch.device | None = None) -> dict[str, Any]:
    """What a benchmark's figures depend on: device, CPU model and relevant flags, GPU name, torch and its threads."""
    dev = device if device is not None else resolve_device("auto")
    info: dict[str, Any] = {
        "device": str(dev),
        "cpu_model": cpu_model(),
        "cpu_flags": sorted(set(_CPU_FLAGS_KEPT) & cpu_flags()),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "bf16_native": native_bf16(dev),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def add_device_arguments(parser: argparse.ArgumentParser, *, what: str = "the model") -> None:
    """``--device`` and ``--dtype`` (default ``auto``) on a command line, checked as they are parsed.

    A bad value is a usage error that lists the allowed forms; ``--dtype bf16`` arrives as ``bfloat16``.

        p = argparse.ArgumentParser()
        add_device_arguments(p)
        args = p.parse_args(["--device", "cuda:1"])   # args.device == "cuda:1", args.dtype == "auto"
    """

    def checked(check: Callable[[str], str]) -> Callable[[str], str]:
        def parse(value: str) -> str:
            try:
                return check(value)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        return parse

    parser.add_argument("--device", default="auto", type=checked(check_device_name),
                        help=f"where {what} runs: {DEVICE_HELP} (default auto)")  # fmt: skip
    parser.add_argument("--dtype", default="auto", type=checked(dtype_name),
                        help=f"dtype of {what}: {DTYPE_HELP} (default auto)")  # fmt: skip
