"""The run directory's lock, status file and exit statuses: the lock across real processes (busy names the holder,
a dead holder's lock is recovered, a released one is not reported), unwritable run directories as one clear
error before any process group, status "failed" with the error after a crash, and how a launch script's exit
status is made of its ranks' reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from sslscale.cli import main
from sslscale.train import rundir
from tests import launch_helpers as lh

_HOLD = """
import sys, time
from sslscale.train.rundir import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=lh.env()
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_held_by_a_live_process_names_it_and_a_dead_ones_is_recovered(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(rundir.RunDirError) as err:
            rundir.RunLock(tmp_path).acquire()
        message = str(err.value)
        assert f"is in use by pid {holder.pid} on host {socket.gethostname()} (started 20" in message
        assert str(tmp_path / "run.lock") in message
    finally:
        holder.kill()  # SIGKILL: no release, the file still names the dead holder
        holder.wait()
    lock = rundir.RunLock(tmp_path)
    previous = lock.acquire()
    assert previous is not None and previous.pid == holder.pid and previous.alive() is False
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    again = rundir.RunLock(tmp_path)
    assert again.acquire() is None  # released cleanly: nothing to recover
    again.release()


def test_unwritable_run_dirs_are_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(rundir.RunDirError, match="cannot create it"):
        rundir.check_writable(tmp_path / "file" / "run")
    with pytest.raises(rundir.RunDirError, match="exists and is not a directory"):
        rundir.check_writable(tmp_path / "file")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(rundir.RunDirError, match="no write permission"):
            rundir.check_writable(ro)
    elif os.path.isdir("/proc/sys"):  # root writes anywhere except where the kernel says no
        with pytest.raises(rundir.RunDirError, match="cannot write there"):
            rundir.check_writable("/proc/sys")
    assert rundir.check_writable(tmp_path / "a" / "b").is_dir()


def test_pretrain_on_an_unwritable_run_dir_fails_before_any_process_group(tmp_path, capsys):
    cfg = lh.tiny_config(tmp_path / "c.yaml", tmp_path / "file" / "run")
    (tmp_path / "file").write_text("x")
    assert main(["pretrain", str(cfg)]) == rundir.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"run_dir {tmp_path / 'file' / 'run'}: cannot create it" in err and "Traceback" not in err
    assert not dist.is_initialized()


def test_a_crash_inside_the_run_leaves_status_failed_with_the_error(tmp_path):
    run_dir = tmp_path / "run"
    cfg = lh.tiny_config(tmp_path / "c.yaml", run_dir, **{"model.builder": "tests.launch_helpers:exploding_objective"})
    exit_file = tmp_path / "exit"
    exit_file.write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "sslscale.cli", "pretrain", str(cfg)],
        cwd=lh.REPO,
        env=lh.env(SSLSCALE_EXIT_FILE=str(exit_file)),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert "the objective exploded" in out.stderr  # the traceback is still shown
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 1
    assert status["error"] == "RuntimeError: the objective exploded (test double)"
    assert exit_file.read_text() == "0 1\n"
    assert json.loads((run_dir / "run.lock").read_text())["released"]


def test_report_exit_appends_once_and_only_to_the_scripts_own_file(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "_reported", None)
    monkeypatch.setenv(rundir.EXIT_FILE_ENV, str(tmp_path / "missing"))
    assert rundir.report_exit(75, rank=1) == 75 and not (tmp_path / "missing").exists()  # never created
    path = tmp_path / "exit"
    path.write_text("")
    monkeypatch.setenv(rundir.EXIT_FILE_ENV, str(path))
    monkeypatch.setenv("SSLSCALE_LAUNCHER_HOST", "another-host")
    rundir.report_exit(75, rank=1)
    assert path.read_text() == ""  # a rank on another node than the script's
    monkeypatch.setenv("SSLSCALE_LAUNCHER_HOST", socket.gethostname())
    rundir.report_exit(75, rank=1)
    rundir.report_exit(1, rank=1)  # the first report of a process is its outcome
    assert path.read_text() == "1 75\n"


@pytest.mark.parametrize(
    ("lines", "expect", "launcher_rc", "code"),
    [
        (["0 75", "1 75"], 2, 1, 75),  # torchrun exits 1 after a signal; both ranks were preempted cleanly
        (["0 75", "1 75"], 2, 143, 75),  # the deepspeed runner died of the signal
        (["0 0", "1 0"], 2, 0, 0),
        (["0 75"], 2, 1, 1),  # one rank died without a word: the launcher's status stands
        (["1 75", "0 3"], 2, 1, 3),  # a real outcome beats a preemption
        (["0 2", "1 2"], 2, 1, 2),  # busy run directory on every rank
        ([], 2, 137, 137),  # nothing reported: the launcher's status
        (["0 75", "1 75", "2 75"], 1, 137, 75),  # more ranks on this host than expected (simulated nodes)
        (["garbage"], 1, 1, 1),
    ],
)
def test_launch_script_exit_status_from_rank_reports(lines, expect, launcher_rc, code):
    assert rundir.combine_exit_codes(lines, expect, launcher_rc) == code


def test_exit_code_command_prints_what_it_decided(tmp_path):
    (tmp_path / "exit").write_text("0 75\n1 75\n")
    t0 = time.time()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sslscale.train.rundir",
            "exit-code",
            str(tmp_path / "exit"),
            "--expect",
            "2",
            "--launcher-rc",
            "1",
        ],
        env=lh.env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 75 and "ranks reported: 75 75 -> exit 75 (preempted" in out.stderr
    assert time.time() - t0 < 10  # no torch import on the way out of a launch script
