"""`make gpu-check` must fail loudly when it has not checked the GPU paths: no device, an extension built without
CUDA, GPU tests that skip or fail. The device-side probes are replaced by stand-ins here (no GPU on this machine);
the real script is run too, and must fail for want of a device."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest

from sslscale.bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="{failures}" skipped="{skips}" tests="{tests}">
<testcase classname="tests.test_attention" name="test_forward[cuda-bf16]" time="0.1"/>
{skipped}{failed}</testsuite></testsuites>
"""


def _junit(path: Path, skips: int = 0, failures: int = 0) -> None:
    skipped = "".join(
        f'<testcase classname="tests.test_infonce_cuda" name="test_{i}"><skipped message="needs a CUDA '
        f'device" type="pytest.skip"/></testcase>\n'
        for i in range(skips)
    )
    failed = "".join(
        f'<testcase classname="tests.test_attention" name="test_f{i}"><failure message="max error 1.0">'
        f"AssertionError</failure></testcase>\n"
        for i in range(failures)
    )
    path.write_text(
        JUNIT.format(failures=failures, skips=skips, tests=1 + skips + failures, skipped=skipped, failed=failed)
    )


def test_junit_summary_and_judgement(tmp_path):
    report = tmp_path / "junit.xml"
    _junit(report)
    assert gpu_check.judge_tests(gpu_check.junit_summary(report)) == "passed"
    _junit(report, skips=2)
    summary = gpu_check.junit_summary(report)
    assert summary["skipped"] == 2 and summary["passed"] == 1 and "needs a CUDA device" in summary["skipped_tests"][0]
    assert gpu_check.judge_tests(summary) == "failed"  # a skipped GPU test is a failed check
    _junit(report, failures=1)
    assert gpu_check.judge_tests(gpu_check.junit_summary(report)) == "failed"
    assert gpu_check.judge_tests({"tests": 0, "failures": 0, "errors": 0, "skipped": 0}) == "failed"


def _args(tmp_path, **kw):
    return argparse.Namespace(
        budget=60.0, skip_build=False, section=None, result=None, out=str(tmp_path / "gpu-check.json"), **kw
    )


@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine that reports a GPU, builds fine and runs passing tests and benchmarks; tests override one probe."""
    monkeypatch.setattr(
        gpu_check,
        "device_info",
        lambda: {
            "torch": "2.x",
            "cuda": "13.0",
            "cuda_available": True,
            "device": "NVIDIA H200",
            "capability": "9.0",
            "sms": 132,
            "memory_gib": 139.8,
        },
    )
    monkeypatch.setattr(gpu_check, "build_extension", lambda capability, timeout: (0, "built"))
    monkeypatch.setattr(
        gpu_check,
        "extension_status",
        lambda timeout: {"with_cuda": True, "cuda_kernels": {"infonce_fwd": True, "attention_fwd": True}},
    )

    def tests(timeout, junit):
        _junit(junit)
        return 0, "1 passed"

    monkeypatch.setattr(gpu_check, "run_tests", tests)
    monkeypatch.setattr(
        gpu_check,
        "run_child",
        lambda name, timeout, extra: (0, {"tflops": 700.0} if name == "matmul" else {"rows": []}, ""),
    )


def _report(tmp_path) -> dict:
    return json.loads((tmp_path / "gpu-check.json").read_text())


def test_all_sections_pass_on_a_good_machine(fake_gpu, tmp_path, capsys):
    assert gpu_check.run(_args(tmp_path)) == 0
    sections = _report(tmp_path)["sections"]
    assert all(s["status"] == "passed" for s in sections.values()), sections
    assert "gpu-check summary" in capsys.readouterr().out


def test_an_extension_without_cuda_fails_the_check(fake_gpu, monkeypatch, tmp_path):
    monkeypatch.setattr(
        gpu_check, "extension_status", lambda timeout: {"with_cuda": False, "cuda_kernels": {"infonce_fwd": False}}
    )
    assert gpu_check.run(_args(tmp_path)) == 1
    sections = _report(tmp_path)["sections"]
    assert sections["extension"]["status"] == "failed" and "without CUDA" in sections["extension"]["error"]
    assert sections["attention"]["status"] == "passed"  # later sections still ran and were recorded


def test_skipped_gpu_tests_fail_the_check(fake_gpu, monkeypatch, tmp_path):
    def tests(timeout, junit):
        _junit(junit, skips=3)
        return 0, "1 passed, 3 skipped"  # pytest itself exits 0 on skips

    monkeypatch.setattr(gpu_check, "run_tests", tests)
    assert gpu_check.run(_args(tmp_path)) == 1
    section = _report(tmp_path)["sections"]["tests"]
    assert section["status"] == "failed" and section["skipped"] == 3


def test_a_crashing_benchmark_is_recorded_not_fatal(fake_gpu, monkeypatch, tmp_path):
    def child(name, timeout, extra):
        if name == "infonce":
            return 1, {}, "RuntimeError: CUDA error: an illegal memory access was encountered"
        if name == "attention":
            return None, {}, "killed at its budget"
        return 0, {"tflops": 700.0}, ""

    monkeypatch.setattr(gpu_check, "run_child", child)
    assert gpu_check.run(_args(tmp_path)) == 1
    sections = _report(tmp_path)["sections"]
    assert sections["infonce"]["status"] == "failed" and "illegal memory" in sections["infonce"]["log_tail"]
    assert sections["attention"]["status"] == "timed out" and sections["matmul"]["status"] == "passed"


def test_out_directory_is_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.output_path() == tmp_path / "gpu-check.json"
    monkeypatch.delenv("OUT")
    assert gpu_check.output_path().name == "gpu-check.json"


def test_the_script_fails_without_a_device(tmp_path):
    """The real launcher on this GPU-less machine: non-zero exit, and a JSON saying why."""
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", __import__("sys").executable), "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(ROOT / "launchers" / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=120
    )
    if proc.returncode == 0:
        pytest.skip("a CUDA device is visible: the real check ran")  # never on the CPU CI machines
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["sections"]["environment"]["status"] == "failed"
    assert "no CUDA device" in report["sections"]["environment"]["error"]
    assert all(s["status"] == "skipped" for n, s in report["sections"].items() if n != "environment")
