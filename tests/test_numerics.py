"""CPU numerics pinned to AVX2 before torch loads (reproduce/numerics.py), and what a run records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import PROJECT
from reproduce.numerics import PINNED, _has_avx2, pin_cpu_numerics

needs_avx2 = pytest.mark.skipif(not _has_avx2(), reason="the pins apply to x86-64 machines with AVX2 only")


def _child(code: str, env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in PINNED}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, cwd=PROJECT, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


PROBE = ("import json; from reproduce.numerics import pin_cpu_numerics, describe; applied = pin_cpu_numerics(); "
         "print(json.dumps({'applied': applied, **describe()}))")


@needs_avx2
@pytest.mark.slow
def test_the_pins_reach_torch_and_a_users_own_choice_wins() -> None:
    pinned = _child(PROBE, {})
    assert pinned["applied"] == PINNED and pinned["cpu_capability"] == "AVX2"
    assert pinned["onednn_max_isa"] == "AVX2" and pinned["mkl_cbwr"] == "AVX2"
    own = _child(PROBE, {"ATEN_CPU_CAPABILITY": "default"})
    assert own["cpu_capability"] == "DEFAULT" and "ATEN_CPU_CAPABILITY" not in own["applied"]


def test_nothing_is_pinned_once_torch_is_loaded() -> None:
    import torch  # noqa: F401

    environ: dict[str, str] = {}
    assert pin_cpu_numerics(environ) == {} and environ == {}


@needs_avx2
def test_pins_fill_only_what_the_environment_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a fresh process, before torch is imported
    environ = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    applied = pin_cpu_numerics(environ)
    assert applied == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
    assert environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"
