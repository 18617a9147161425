"""trainer.precision: resolution on each device, CPU bf16 autocast in the Trainer, results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import precision
from experiments.precision import Precision, cpu_supports_bf16, resolve_precision
from experiments.runner import run

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_exactly_on_a_cpu_with_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
    assert resolve_precision("auto", CPU) is (Precision.bf16 if native else Precision.fp32)
    assert resolve_precision("fp32", CPU) is Precision.fp32
    assert resolve_precision("bf16", CPU) is Precision.bf16  # asked for: emulated where not native


def test_fp16_on_a_cpu_is_refused() -> None:
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)


@pytest.mark.parametrize(("flags", "expected"), [("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True), ("fpu avx2 avx512f", False)])
def test_cpuinfo_flags_decide_without_torchs_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flags: str, expected: bool) -> None:
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert cpu_supports_bf16() is expected


@pytest.mark.parametrize("requested", ["bf16", "fp32"])
def test_cpu_run_trains_in_the_requested_precision_and_records_it(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, requested: str
) -> None:
    seen: set[torch.dtype] = set()
    forward = torch.nn.Linear.forward

    def recording(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        out = forward(self, x)
        if self.training:
            seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", recording)
    results = json.loads(run(make_cfg("method=lora", f"trainer.precision={requested}"), tmp_path / requested).read_text())
    assert results["status"] == "completed" and results["precision"] == requested
    assert seen == {torch.bfloat16 if requested == "bf16" else torch.float32}


def test_unknown_precision_fails_at_composition(make_cfg) -> None:
    with pytest.raises(Exception, match="precision"):
        make_cfg("trainer.precision=int8")


@pytest.mark.parametrize("requested", ["bf16", "fp32"])
def test_methods_prepare_under_the_run_autocast(make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, requested: str) -> None:
    from taso.method import Taso

    seen = []
    prepare = Taso.prepare

    def recording(self, model, ctx):  # noqa: ANN001, ANN202
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return prepare(self, model, ctx)

    monkeypatch.setattr(Taso, "prepare", recording)
    run(make_cfg("method=taso", "method.importance_batches=2", f"trainer.precision={requested}"), tmp_path / requested)
    assert seen == [torch.bfloat16 if requested == "bf16" else False]
