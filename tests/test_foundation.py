"""The package's plumbing: the extension loads with its ops registered, backend choice, `sslscale info`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sslscale import _ext
from sslscale.ops import backends


def test_extension_is_built_with_openmp_and_registers_the_op_schemas():
    ext = _ext.load()
    assert ext is not None, _ext.error()
    assert ext.with_openmp(), "CPU kernels built without OpenMP run serially"
    for op in ("infonce_fwd", "infonce_bwd", "attention_fwd", "attention_bwd"):
        assert hasattr(torch.ops.sslscale, op)


def test_automatic_choice_prefers_fused_cpu_kernels():
    cpu = torch.device("cpu")
    for op in backends.OPS:
        expected = "cpp" if backends.availability(op, "cpp", cpu).usable else "reference"
        assert backends.resolve(op, None, cpu) == expected


def test_backend_env_override_and_bad_names(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("SSLSCALE_BACKEND", "reference")
    assert backends.resolve("infonce", None, cpu) == "reference"
    monkeypatch.setenv("SSLSCALE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SSLSCALE_BACKEND='fastest'"):
        backends.resolve("infonce", None, cpu)
    with pytest.raises(ValueError, match="backend='nope'"):
        backends.resolve("attention", "nope", cpu)
    with pytest.raises(RuntimeError, match="cuda runs on CUDA tensors"):
        backends.resolve("attention", "cuda", cpu)


def test_info_reports_versions_and_backends():
    out = subprocess.run(
        [sys.executable, "-m", "sslscale.cli", "info", "--json"], capture_output=True, text=True, check=True
    ).stdout
    info = json.loads(out)
    assert info["torch"] == torch.__version__
    assert info["extension"]["built"] is True
    assert set(info["backends"]) == {"infonce", "attention"}
    for op, table in info["backends"].items():
        assert table["reference"]["usable"] is True
        if not torch.cuda.is_available():
            assert table["cuda"]["usable"] is False
        assert table["cpp"]["usable"] == backends.availability(op, "cpp", torch.device("cpu")).usable
