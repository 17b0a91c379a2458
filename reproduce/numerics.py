"""The same CPU numbers on every x86-64 machine with AVX2.

On a CPU, three things pick the floating-point summation order, hence the last bits of every result
and, over an epoch of SGD, the trained network: ATen's vectorised kernels (chosen by the widest SIMD
the CPU has: AVX2 or AVX-512), oneDNN's convolutions (its ISA, likewise) and the thread count.
Measured on the embedded default (2 epochs of resnet8 on digits, final weights compared bit for bit):
ATen ``default`` vs ``avx2`` kernels, oneDNN ``SSE41`` vs ``AVX2`` and 1 vs 2 threads each give
different weights; MKL's instruction set did not change them. So a run on an AVX-512 machine would
not reproduce a run on an AVX2 machine unless both use the same kernels.

``pin_cpu_numerics`` sets ATen and oneDNN (and MKL's conditional numerical reproducibility mode) to
AVX2 before torch is imported: every command line calls it first, so the embedded default computes
the same numbers on every x86-64 machine with AVX2 (everything since about 2013), given the same
thread count (``runtime.threads``). A variable already set in the environment wins, so
``ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE`` gets the machine's own kernels back.
GPUs are unaffected. What the run actually used is recorded with its results (``describe``).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping
from pathlib import Path

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def pin_cpu_numerics(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Pin the CPU kernels to AVX2 where the machine has it and torch is not yet imported; returns
    the variables this call set (nothing when torch is loaded already, the CPU is not x86-64 with
    AVX2, or the user set them)."""
    if "torch" in sys.modules or not _has_avx2():
        return {}
    applied = {key: value for key, value in PINNED.items() if key not in environ}
    environ.update(applied)
    return applied


def _has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: leave the kernels to torch
        return False
    return " avx2" in flags


def describe() -> dict[str, str | int]:
    """The CPU numerics this process runs with, for a run's metrics.json."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
            "mkl_cbwr": os.environ.get("MKL_CBWR", "native"), "threads": torch.get_num_threads()}
