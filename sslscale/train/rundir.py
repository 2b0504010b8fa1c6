"""The run directory: one job owns it at a time, `status.json` says what state it is in, and the exit status of
every rank (and of every `launchers/` script) says how the run ended.

Exit statuses (`EXIT_*`):
    0   finished
    1   failed: an error; status.json has state "failed" and the error
    2   bad input before training: config, unwritable run directory, run directory in use by another job
    3   stopped on a non-finite loss (`nonfinite: stop`); status.json has state "failed" and the reason
    75  preempted: a stop signal (or the loss of the launcher) was honoured and the checkpoint written; run the same
        command again to resume (75 is EX_TEMPFAIL of sysexits.h: "try again later")

Lock: `RUN_DIR/run.lock`, an `flock` taken by rank 0 before anything is written and held until the run ends. The
kernel drops it when the holder dies however it dies, so a lock left by a dead job is recovered by the next launch
(which says whose it was); a live holder makes the launch fail on every rank, naming host, pid and start time. The
file itself is never deleted (deleting a lock file races with the next locker); on NFS `flock` goes through the
server's lock manager; where the file system has no locks, a warning says the run directory is unguarded.

Status: `RUN_DIR/status.json`, replaced atomically: {"state": running|finished|preempted|failed, "step", "time",
"run_id", "host", "pid", "exit_code", "error"}. Rank 0 writes running/finished/preempted; a failing rank writes
"failed" unless this run already recorded a failure (the first failure is usually the cause).

Exit file: torchrun exits 1 after any signal and the deepspeed runner dies of it, so their status cannot say
"preempted". A launch script creates a file and exports `SSLSCALE_EXIT_FILE` (and `SSLSCALE_LAUNCHER_HOST`);
every rank on that host appends "RANK CODE" before the run's final barrier (before any rank can be killed for
exiting early), and `python -m sslscale.train.rundir exit-code FILE --expect N --launcher-rc RC` makes the
script's exit status out of those lines and the launcher's own status.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from sslscale.train import signals

EXIT_FINISHED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75
EXIT_MEANING = {
    EXIT_FINISHED: "finished",
    EXIT_FAILED: "failed",
    EXIT_USAGE: "bad input",
    EXIT_NONFINITE: "stopped on a non-finite loss",
    EXIT_PREEMPTED: "preempted: checkpointed, rerun to resume",
}

LOCK_NAME = "run.lock"
STATUS_NAME = "status.json"
EXIT_FILE_ENV = "SSLSCALE_EXIT_FILE"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirError(RuntimeError):
    """The run directory cannot be used: not writable, or owned by another live job."""


def _now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class Holder:
    """Who holds (or held) a run directory's lock."""

    host: str
    pid: int
    started: str  # ISO time the lock was taken
    job: str | None = None  # the launcher's job id, when there is one
    released: str | None = None  # ISO time of a clean release

    @classmethod
    def me(cls) -> Holder:
        from sslscale.distributed.env import job_description

        return cls(socket.gethostname(), os.getpid(), _now_iso(), job_description())

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), str(data["started"]), data.get("job"), data.get("released"))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        job = f", {self.job}" if self.job else ""
        return f"pid {self.pid} on host {self.host} (started {self.started}{job})"

    def alive(self) -> bool | None:
        """True/False on this host; None for a holder on another host (not checkable from here)."""
        if self.host != socket.gethostname():
            return None
        return signals.process_alive(self.pid)


class RunLock:
    """`RUN_DIR/run.lock`: an exclusive flock plus the holder's description (JSON) inside the file."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self.holder: Holder | None = None
        self.guarded = True

    def acquire(self) -> Holder | None:
        """Take the lock or raise `RunDirError` naming the live holder. Returns the previous holder when it died
        without releasing the lock (a stale lock, now recovered), else None."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirError(f"run_dir {self.path.parent}: cannot create {self.path.name} ({err.strerror})") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = self.path.read_text() if self.path.exists() else ""
            os.close(fd)
            holder = Holder.parse(text)
            who = holder.describe() if holder else "a job that has not written its details yet"
            raise RunDirError(
                f"run_dir {self.path.parent} is in use by {who}; lock file {self.path}. Wait for "
                "that run to end or stop it, or choose another run_dir"
            ) from None
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            self.guarded = False
            print(
                f"[sslscale] warning: run_dir {self.path.parent}: this file system has no file locks "
                f"({err.strerror}); nothing stops a second job from writing the same run directory",
                file=sys.stderr,
                flush=True,
            )
        previous = Holder.parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
        self.holder = Holder.me()
        self._write(fd, self.holder)
        self._fd = fd
        return previous if previous is not None and previous.released is None else None

    @staticmethod
    def _write(fd: int, holder: Holder) -> None:
        data = json.dumps(asdict(holder)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data + b"\n", 0)
        os.fsync(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self.holder is not None:
                self.holder.released = _now_iso()
                self._write(self._fd, self.holder)
        except OSError:
            pass  # a full or vanished disk must not hide the run's own outcome
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def check_writable(run_dir: str | Path) -> Path:
    """Create `run_dir` if needed and make sure files can be written in it; a clear `RunDirError` otherwise.
    Cheap and local, so every rank calls it before any process group starts."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run_dir {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(
            f"run_dir {path}: cannot create it ({err.strerror or err}); set run_dir to a writable "
            "directory (--set run_dir=PATH)"
        ) from err
    if not os.access(path, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "it is on a read-only file system" if read_only else "no write permission for this user"
        raise RunDirError(
            f"run_dir {path}: cannot write there ({why}); set run_dir to a writable directory (--set run_dir=PATH)"
        )
    return path


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, allow_nan=False, default=str) + "\n")
    tmp.replace(path)


def read_status(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return None


def exit_code_for(state: str) -> int:
    return EXIT_PREEMPTED if state == "preempted" else EXIT_FINISHED


_reported: int | None = None


def report_exit(code: int, rank: int | None = None) -> int:
    """Append "RANK CODE" to the launch script's exit file (once per process); returns `code`. A no-op without
    `SSLSCALE_EXIT_FILE`, on another host than the script's, or when the file does not exist there."""
    global _reported
    path = os.environ.get(EXIT_FILE_ENV)
    host = os.environ.get(signals.LAUNCHER_HOST_ENV)
    if _reported is not None or not path or (host and host != socket.gethostname()):
        return code
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # no O_CREAT: only the file the script made
    except OSError:
        return code
    try:
        os.write(fd, f"{rank} {code}\n".encode())
        _reported = code
    finally:
        os.close(fd)
    return code


class RunDir:
    """One job's hold on its run directory, as seen by one rank."""

    def __init__(self, path: str | Path, rank: int, world: int) -> None:
        self.path = Path(path)
        self.rank, self.world = rank, world
        self.run_id: str | None = None
        self.lock: RunLock | None = None
        self.step = 0
        self.closed = False

    def status(self, state: str, step: int, **extra: object) -> None:
        """Rank 0 records the run's state (running at the start, then finished / preempted)."""
        self.step = step
        if self.rank == 0:
            self._write_status(state, step, **extra)

    def _write_status(self, state: str, step: int, **extra: object) -> None:
        data = {
            "state": state,
            "step": step,
            "time": time.time(),
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "rank": self.rank,
            **extra,
        }
        write_json_atomic(self.path / STATUS_NAME, data)

    def finish(self, state: str, step: int) -> int:
        """The run ended as agreed by every rank: status, exit code for the launcher, final barrier, unlock."""
        code = exit_code_for(state)
        self.status(state, step, exit_code=code)
        report_exit(code, self.rank)
        _barrier(self.world)  # nobody exits (and gets its peers killed by the launcher) before all have reported
        self.close()
        return code

    def fail(self, error: BaseException | str, code: int = EXIT_FAILED) -> int:
        """This rank is leaving with an error: status "failed" (unless this run already recorded a failure),
        its exit code for the launcher, the lock released."""
        message = str(error) if isinstance(error, str) else f"{type(error).__name__}: {error}"
        try:
            current = read_status(self.path)
            if not (current and current.get("run_id") == self.run_id and current.get("state") == "failed"):
                self._write_status("failed", self.step, exit_code=code, error=message[-2000:])
        except OSError as err:
            print(f"[sslscale] could not record the failure in {self.path / STATUS_NAME}: {err}", file=sys.stderr)
        report_exit(code, self.rank)
        self.close()
        return code

    def close(self) -> None:
        global _active
        if self.lock is not None:
            self.lock.release()
        self.closed = True
        if _active is self:
            _active = None


_active: RunDir | None = None


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def _agree(value: object, world: int) -> object:
    """Rank 0's `value` on every rank."""
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            holder = [value]
            dist.broadcast_object_list(holder, src=0)
            return holder[0]
    return value


def claim(run_dir: str | Path, rank: int, world: int) -> RunDir:
    """Own `run_dir` for this job: rank 0 creates it and takes the lock; every rank learns the outcome, so a busy
    or unwritable run directory is the same `RunDirError` on every rank (nothing has been written to it)."""
    global _active
    if _active is not None:  # an earlier run in this process ended without finish() (an in-process caller)
        _active.close()
    owner = RunDir(run_dir, rank, world)
    outcome: dict = {"error": None, "run_id": None}
    recovered = None
    if rank == 0:
        try:
            check_writable(run_dir)
            owner.lock = RunLock(run_dir)
            recovered = owner.lock.acquire()
            outcome["run_id"] = uuid.uuid4().hex[:12]
        except RunDirError as err:
            outcome["error"] = str(err)
    outcome = _agree(outcome, world)  # type: ignore[assignment]
    if outcome["error"]:
        raise RunDirError(outcome["error"])
    owner.run_id = outcome["run_id"]
    if recovered is not None:
        state = {True: "still running but not holding it", False: "no longer running", None: "on another host"}
        print(
            f"[sslscale] run_dir {owner.path}: recovered the lock left by {recovered.describe()} "
            f"({state[recovered.alive()]})",
            file=sys.stderr,
            flush=True,
        )
    _active = owner
    return owner


def active() -> RunDir | None:
    """The run this process is in (between `claim` and its end)."""
    return _active


def fail_active(error: BaseException | str, code: int = EXIT_FAILED) -> int:
    """Record a failure of the active run (if any) and report `code`; returns `code`."""
    if _active is not None and not _active.closed:
        return _active.fail(error, code)
    return report_exit(code)


def _orphan_exit(reason: str) -> None:
    fail_active(f"ended by the launcher watch: {reason} and the run did not stop within {signals.GRACE_ENV}")


signals.at_orphan_exit(_orphan_exit)


def combine_exit_codes(lines: list[str], expect: int, launcher_rc: int) -> int:
    """The exit status of a launch script: the ranks' reported codes where they tell the story (all ranks on this
    host reported; torchrun's own 1 after a signal then means nothing), else the launcher's status."""
    codes = []
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            codes.append(int(parts[1]))
    errors = [c for c in codes if c not in (EXIT_FINISHED, EXIT_PREEMPTED)]
    if errors:
        return errors[0]
    if codes and (launcher_rc == 0 or len(codes) >= expect):
        return max(codes)
    return launcher_rc  # a rank on this host died without reporting (or none was started)


def main(argv: list[str] | None = None) -> int:
    """`python -m sslscale.train.rundir exit-code FILE --expect N --launcher-rc RC` (used by launchers/)."""
    parser = argparse.ArgumentParser(prog="python -m sslscale.train.rundir")
    sub = parser.add_subparsers(dest="command", required=True)
    ec = sub.add_parser("exit-code", help="a launch script's exit status from its ranks' reports")
    ec.add_argument("file")
    ec.add_argument("--expect", type=int, default=0, help="ranks started on this host")
    ec.add_argument("--launcher-rc", type=int, required=True, help="the launcher's own exit status")
    args = parser.parse_args(argv)
    try:
        lines = Path(args.file).read_text().splitlines()
    except OSError:
        lines = []
    code = combine_exit_codes(lines, args.expect, args.launcher_rc)
    reported = " ".join(line.split()[-1] for line in lines if line.strip()) or "none"
    print(
        f"[sslscale] launcher exit status {args.launcher_rc}, ranks reported: {reported} -> exit {code} "
        f"({EXIT_MEANING.get(code, 'launcher status')})",
        file=sys.stderr,
        flush=True,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
