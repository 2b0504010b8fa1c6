"""The `sslscale` command itself: a one-line description, `--version`, a readable `sslscale info` (reasons wrapped to
the width, never cut), metric lines shown above the progress bar on a real terminal (a pty), and environment
OSErrors as one line instead of a traceback."""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from sslscale import __version__, cli
from sslscale.info import collect, format_table
from sslscale.train.monitor import Monitor
from tests import launch_helpers as lh


def test_help_has_a_one_line_description_and_version_needs_no_torch():
    out = subprocess.run(
        [sys.executable, "-m", "sslscale.cli", "--help"],
        capture_output=True,
        text=True,
        env={**lh.env(), "COLUMNS": "80"},
        check=True,
    ).stdout
    assert out.splitlines()[2] == cli.DESCRIPTION and len(cli.DESCRIPTION) <= 78
    for name, (_, help_text) in cli.COMMANDS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(help_text)}$", out, re.M), name
    probe = "import sys; from sslscale import cli; cli.main(['--version'])"
    version = subprocess.run(
        [sys.executable, "-c", probe + "\n"], capture_output=True, text=True, env=lh.env(), check=False
    )
    assert version.returncode == 0 and version.stdout.strip() == f"sslscale {__version__}"
    no_torch = (
        "import sys; from sslscale import cli\ntry: cli.main(['--version'])\nexcept SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", no_torch], env=lh.env(), check=True, capture_output=True)


@pytest.mark.parametrize("width", [60, 100])
def test_info_table_fits_the_width_and_keeps_every_reason_whole(width):
    info = collect()
    long_reason = "needs a CUDA device with compute capability 8.0 or newer and a torch built with CUDA " * 2
    info["backends"]["attention"]["cuda"]["why"] = long_reason.strip()
    text = format_table(info, width=width)
    assert all(len(line) <= width for line in text.splitlines()), max(text.splitlines(), key=len)
    flat = " ".join(text.split())
    for table in info["backends"].values():
        for cell in table.values():
            assert " ".join(cell["why"].split()) in flat
    assert info["torch"] in text and "kernel backends" in text


def test_metric_lines_show_above_the_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    term = os.fdopen(slave, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    monitor = Monitor(tmp_path, rank=0, total_steps=4, progress=True)
    records = [{"step": s, "loss": 1.0 / s, "lr": 0.1} for s in range(1, 4)]
    records[-1]["probe_acc"] = 0.625
    records.append({"step": 4, "loss": float("nan")})
    for record in records:
        monitor.advance()
        monitor.log(record)
    monitor.close()
    term.close()
    raw = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO once the slave side is closed and drained
            break
        if not chunk:
            break
        raw += chunk
    os.close(master)
    text = raw.decode()
    # every line, with the bar's carriage-return redraws removed, is either bar output or a whole JSON record
    shown = [seg.rstrip("\r").split("\r")[-1].strip() for seg in text.split("\n")]  # the pty ends lines in CR LF
    logged = [json.loads(line) for line in shown if line.startswith("{")]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert logged[3]["loss"] is None  # strict JSON: NaN is written as null
    assert "4/4" in text and "loss=0.3333" in text and "probe=0.625" in text
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == logged


def _denied_run(args: argparse.Namespace) -> int:
    raise PermissionError(errno.EACCES, "Permission denied", "/data/out/encoder.safetensors")


def test_environment_oserrors_are_one_line_without_traceback(monkeypatch, capsys):
    module = type(sys)("fake_command")
    module.add_arguments = lambda parser: None
    module.run = _denied_run
    monkeypatch.setitem(sys.modules, "fake_command", module)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_command", "a command that cannot write its output"))
    assert cli.main(["fake"]) == 1
    assert capsys.readouterr().err == "sslscale fake: Permission denied: /data/out/encoder.safetensors\n"
    module.run = lambda args: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error"))  # not the user's doing
    with pytest.raises(OSError, match="I/O error"):
        cli.main(["fake"])
