"""Preemption through process groups, Ctrl-C, orphans and run-directory ownership.

Units: every stop signal sets the flag (ignored ones stay ignored); a DataLoader worker dies of SIGTERM unless it
ignores the stop signals (the failure reproduced first); the launcher watch stops an orphaned process and ends it
after its grace. Launches (2 ranks, a real sslscale stream with a DataLoader worker per rank): SIGTERM to the
torchrun script's process group and Ctrl-C's SIGINT to the local script's group -> checkpoint, "preempted", exit
75; a second launch on a busy run directory fails fast naming the holder; a stale lock is recovered; SIGKILL of
torchrun's process group -> the ranks checkpoint and exit within seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from sslscale.train.signals import StopRequest, ignore_stop_signals
from tests import launch_helpers as lh
from tests.data_helpers import shards


def _running(pid: int) -> bool:
    """Alive and not a zombie (a reparented zombie may wait for a reaper that never comes in a container)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], timeout: float) -> float:
    start = time.time()
    while any(_running(p) for p in pids):
        assert time.time() - start < timeout, f"still running after {timeout}s: {[p for p in pids if _running(p)]}"
        time.sleep(0.1)
    return time.time() - start


# ---- units ----


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP], ids=lambda s: signal.Signals(s).name
)
def test_every_stop_signal_only_sets_the_flag(sig):
    stop = StopRequest(watch_launcher=False)
    try:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), sig)  # a second copy (launchers deliver more than one) does not abort either
        time.sleep(0.05)
        assert stop.requested and stop.signum == sig and stop.reason == signal.Signals(sig).name
    finally:
        stop.restore()


def test_signals_ignored_at_start_stay_ignored():
    """`nohup` ignores SIGHUP and shells start background jobs with SIGINT ignored: a run must not undo that."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGHUP)}
    try:
        stop = StopRequest(watch_launcher=False)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop.restore()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Slow(torch.utils.data.IterableDataset):
    def __iter__(self):
        for i in range(60):
            time.sleep(0.02)
            yield torch.tensor([os.getpid(), i])


def _sigterm_the_worker_midway(loader) -> list[int]:
    seen = []
    for item in loader:
        pid, i = item.tolist()
        seen.append(i)
        if i == 3:
            os.kill(pid, signal.SIGTERM)  # what `kill -TERM -PGID` and torchrun's killpg do to a rank's workers
    return seen


def test_a_dataloader_worker_dies_of_sigterm_unless_it_ignores_the_stop_signals():
    with pytest.raises(RuntimeError, match=r"DataLoader worker .* (killed by signal|exited unexpectedly)"):
        _sigterm_the_worker_midway(torch.utils.data.DataLoader(_Slow(), batch_size=None, num_workers=1))
    loader = torch.utils.data.DataLoader(_Slow(), batch_size=None, num_workers=1, worker_init_fn=ignore_stop_signals)
    assert _sigterm_the_worker_midway(loader) == list(range(60))


_ORPHAN = """
import sys, time
from sslscale.train.signals import StopRequest
stop = StopRequest(watch_launcher=True, grace_s={grace})
print("ready", flush=True)
while not stop.requested:
    time.sleep(0.05)
print("stop requested:", stop.reason, flush=True)
time.sleep(60)  # like a rank stuck in a collective with a dead peer: the deadline must end it
"""


def test_orphaned_process_is_asked_to_stop_and_ended_after_its_grace(tmp_path):
    log = tmp_path / "child.txt"
    child = (
        f"open({str(log)!r}, 'w').close(); import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {_ORPHAN.format(grace=1.5)!r}], "
        f"stdout=open({str(log)!r}, 'w'), stderr=subprocess.STDOUT)\nprint(p.pid, flush=True)\np.wait()"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, env=lh.env(), start_new_session=True
    )
    pid = int(parent.stdout.readline())
    deadline = time.time() + 60
    while "ready" not in log.read_text():
        assert time.time() < deadline and _running(pid), log.read_text()
        time.sleep(0.05)
    parent.kill()  # its launcher dies, as `kill -9` of torchrun's group does
    parent.wait()
    killed = time.time()
    took = _wait_gone([pid], timeout=20)
    text = log.read_text()
    assert f"stop requested: its launcher (parent pid {parent.pid}) exited" in text
    assert "exiting now" in text and time.time() - killed >= 1.5 and took < 10, (took, text)


def test_death_of_the_launch_script_is_noticed_through_its_pid(tmp_path):
    script = subprocess.Popen(["sleep", "600"])  # stands in for a launchers/ script (the rank's grandparent)
    code = _ORPHAN.format(grace=30)
    log = tmp_path / "child.txt"
    with open(log, "w") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=lh.env(SSLSCALE_LAUNCHER_PID=str(script.pid), SSLSCALE_LAUNCHER_HOST=socket.gethostname()),
        )
    try:
        deadline = time.time() + 60
        while "ready" not in log.read_text():
            assert time.time() < deadline and child.poll() is None, log.read_text()
            time.sleep(0.05)
        script.kill()
        script.wait()
        while "stop requested" not in log.read_text():
            assert time.time() < deadline and child.poll() is None, log.read_text()
            time.sleep(0.05)
        assert f"its launch script (pid {script.pid}) exited" in log.read_text()
    finally:
        child.kill()
        script.kill()


# ---- launches ----


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    return shards(tmp_path_factory, "fashion-mnist", "test", per_shard=32, limit=256)


def _assert_preempted(run_dir, rc: int, out: str) -> int:
    assert rc == 75, out[-4000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["exit_code"] == 75, status
    assert (run_dir / "checkpoints" / f"step{status['step']:08d}" / "COMPLETE").is_file()
    assert "killed by signal" not in out and "exited unexpectedly" not in out, out[-4000:]
    assert "ranks reported: 75 75 -> exit 75" in out
    return status["step"]


@pytest.mark.dist
@pytest.mark.slow
def test_sigterm_to_the_torchrun_scripts_group_checkpoints_and_a_second_launch_fails_fast(tmp_path, image_shards):
    run_dir = tmp_path / "run"
    cfg = lh.stream_config(tmp_path / "c.yaml", run_dir, image_shards, num_workers=1)
    log = tmp_path / "log.txt"
    job = lh.start(lh.script("torchrun/pretrain.sh") + [str(cfg)], log, lh.env(NPROC="2", **lh.port_env()))
    try:
        lh.wait_for_steps(run_dir, 3, job, log)
        config_before = (run_dir / "config.yaml").read_bytes()
        t0 = time.time()
        second = subprocess.run(
            [sys.executable, "-m", "sslscale.cli", "pretrain", str(cfg)],
            cwd=lh.REPO,
            env=lh.env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert time.time() - t0 < 60
        message = second.stderr
        assert f"run_dir {run_dir} is in use by pid" in message and f"on host {socket.gethostname()}" in message
        assert "(started 20" in message and "Traceback" not in message, message
        assert (run_dir / "config.yaml").read_bytes() == config_before  # the second launch wrote nothing
        assert job.poll() is None, "the first run goes on"
        os.killpg(job.pid, signal.SIGTERM)  # a container stop / `kill -TERM -PGID` of the job
        rc, out = lh.finish(job, log)
    finally:
        if job.poll() is None:
            lh.kill_group(job)
    step = _assert_preempted(run_dir, rc, out)
    assert step >= 3
    assert json.loads((run_dir / "run.lock").read_text())["released"]


@pytest.mark.dist
@pytest.mark.slow
def test_ctrl_c_to_the_local_script_recovers_a_stale_lock_and_checkpoints(tmp_path, image_shards):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "started": "2026-01-01T00:00:00+00:00", "job": None}
    (run_dir / "run.lock").write_text(json.dumps(stale))  # left by a job that was killed -9
    cfg = lh.stream_config(tmp_path / "c.yaml", run_dir, image_shards, num_workers=1)
    log = tmp_path / "log.txt"
    job = lh.start(lh.script("local/pretrain_2proc.sh") + [str(cfg)], log, lh.env())
    try:
        lh.wait_for_steps(run_dir, 3, job, log)
        os.killpg(job.pid, signal.SIGINT)  # Ctrl-C in the terminal: SIGINT to the foreground process group
        rc, out = lh.finish(job, log)
    finally:
        if job.poll() is None:
            lh.kill_group(job)
    _assert_preempted(run_dir, rc, out)
    assert f"recovered the lock left by pid {dead.pid} on host {socket.gethostname()}" in out
    assert "(no longer running)" in out


@pytest.mark.dist
@pytest.mark.slow
def test_sigkill_of_torchruns_group_stops_its_ranks_within_seconds(tmp_path, image_shards):
    run_dir = tmp_path / "run"
    cfg = lh.stream_config(tmp_path / "c.yaml", run_dir, image_shards, num_workers=1)
    log = tmp_path / "log.txt"
    torchrun = lh.start(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "sslscale.cli",
            "pretrain",
            str(cfg),
        ],
        log,
        lh.env(),
    )
    try:
        lh.wait_for_steps(run_dir, 3, torchrun, log)
        ranks = psutil.Process(torchrun.pid).children()
        workers = [w.pid for r in ranks for w in r.children(recursive=True)]
        assert len(ranks) == 2 and len(workers) >= 2  # one DataLoader worker per rank
        os.killpg(torchrun.pid, signal.SIGKILL)  # the ranks live in sessions of their own: they survive this
        torchrun.wait()
        took = _wait_gone([r.pid for r in ranks] + workers, timeout=30)
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
    out = log.read_text()
    assert took < 15, out[-3000:]
    assert "its launcher (parent pid" in out
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted", (status, out[-3000:])
    assert (run_dir / "checkpoints" / f"step{status['step']:08d}" / "COMPLETE").is_file()
