"""Preemption, orphans and stalls: how a rank learns that it should stop, and what it does when nobody tells it.

`StopRequest`: SIGTERM, SIGINT, SIGUSR1 (SLURM's `--signal=USR1@120`) and SIGHUP only set a flag; the training loop
all-reduces it every step, so a signal delivered to any one rank (or to all of them, as `killpg` from torchrun, a
container stop or Ctrl-C do) stops every rank after the same step, with a checkpoint. A signal the process was
started with ignored (SIGHUP under `nohup`, SIGINT in a background job) stays ignored. A second signal does not
abort: launchers deliver the same stop more than once (the deepspeed launcher's SIGTERM follows Ctrl-C's SIGINT).

`LauncherWatch` (started by `StopRequest` when a launcher started the process): torchrun starts each rank in its
own session, so `kill -9` of torchrun's process group leaves the ranks training, unsupervised. The watch notices
within `poll_s` that the rank's parent (or the launch script named by `SSLSCALE_LAUNCHER_PID`) has gone, requests
a stop (checkpoint, then exit) and, if the process is still alive `grace_s` later (a peer died too, a collective
hangs), ends it with `os._exit`.

`ignore_stop_signals`: the DataLoader workers' `worker_init_fn`. Workers receive the group's signals too; torch's
worker handlers die on SIGTERM and the rank then crashes on "DataLoader worker is killed by signal". Ignoring them
leaves the decision to the rank, which stops its workers itself.

`Watchdog`: a thread that reports a rank making no step progress for `timeout_s` (which rank, which step, the
stacks of every thread via faulthandler) instead of leaving a silent hang; it reports, it does not kill.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TextIO

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
# Left alone when ignored at start: `nohup` ignores SIGHUP, shells start background jobs with SIGINT ignored.
_KEEP_IF_IGNORED = (signal.SIGINT, signal.SIGHUP)

LAUNCHER_PID_ENV = "SSLSCALE_LAUNCHER_PID"  # the launch script's pid, exported by launchers/*.sh
LAUNCHER_HOST_ENV = "SSLSCALE_LAUNCHER_HOST"  # ... and its host (the pid means nothing on another node)
GRACE_ENV = "SSLSCALE_ORPHAN_GRACE_S"  # seconds an orphaned rank may take to checkpoint before it is ended
WATCH_ENV = "SSLSCALE_WATCH_LAUNCHER"  # "0": never watch the launcher
DEFAULT_GRACE_S = 120.0
EXIT_ORPHANED = 1  # os._exit status of a rank ended by the watch (nobody waits for it: its launcher is gone)

_orphan_exit_hooks: list[Callable[[str], None]] = []


def at_orphan_exit(hook: Callable[[str], None]) -> None:
    """Run `hook(reason)` just before an orphaned rank is ended (e.g. to record the failure in status.json)."""
    _orphan_exit_hooks.append(hook)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Ignore the stop signals in this process (a DataLoader `worker_init_fn`; the rank decides, not its workers)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def launched_by_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher (torchrun, the deepspeed launcher, srun, a launchers/ script) started this process."""
    env = os.environ if environ is None else environ
    if env.get(WATCH_ENV) == "0":
        return False
    return ("RANK" in env and "WORLD_SIZE" in env) or "SLURM_PROCID" in env or LAUNCHER_PID_ENV in env


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a live pid from a reused one); None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether `pid` runs (and, with `start_ticks`, is still the same process, not a reuse of its number)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start_ticks is not None:
        now = _start_ticks(pid)
        return now is None or now == start_ticks
    return True


class LauncherWatch:
    """A daemon thread calling `on_orphaned(reason)` once the parent process or the launch script has gone, then
    ending the process `grace_s` later unless it exited by itself."""

    def __init__(
        self,
        on_orphaned: Callable[[str], None],
        grace_s: float = DEFAULT_GRACE_S,
        poll_s: float = 0.5,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.on_orphaned = on_orphaned
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.orphaned: str | None = None
        self._ppid = os.getppid()
        self._launcher: tuple[int, int | None] | None = None
        pid, host = env.get(LAUNCHER_PID_ENV), env.get(LAUNCHER_HOST_ENV)
        same_host = not host or host == socket.gethostname()
        if pid and pid.isdigit() and same_host and int(pid) != os.getpid() and process_alive(int(pid)):
            self._launcher = (int(pid), _start_ticks(int(pid)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sslscale-launcher-watch", daemon=True)
        self._thread.start()

    def gone(self) -> str | None:
        """Why this process is orphaned, or None while its launcher lives."""
        if os.getppid() != self._ppid:
            return f"its launcher (parent pid {self._ppid}) exited"
        if self._launcher is not None and not process_alive(*self._launcher):
            return f"its launch script (pid {self._launcher[0]}) exited"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            reason = self.gone()
            if reason is None:
                continue
            self.orphaned = reason
            self.on_orphaned(reason)
            # From here on the deadline holds whatever happens to the rest of the process (close() included).
            time.sleep(self.grace_s)
            rank = os.environ.get("RANK", "?")
            print(
                f"[sslscale] rank {rank}: still running {self.grace_s:g}s after {reason}; exiting now "
                f"({GRACE_ENV} sets this grace)",
                file=sys.stderr,
                flush=True,
            )
            for hook in _orphan_exit_hooks:
                try:
                    hook(reason)
                except Exception as err:  # best effort on the way out
                    print(f"[sslscale] orphan exit hook failed: {err}", file=sys.stderr, flush=True)
            os._exit(EXIT_ORPHANED)

    def close(self) -> None:
        """Stop watching (the run ended normally). A deadline already running is kept."""
        self._stop.set()


class StopRequest:
    """The stop flag of one run: set by a stop signal or by the launcher watch."""

    def __init__(
        self, signals: tuple[int, ...] = STOP_SIGNALS, watch_launcher: bool | None = None, grace_s: float | None = None
    ) -> None:
        self.signum: int | None = None
        self.reason: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                if sig in _KEEP_IF_IGNORED and signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        self.watch: LauncherWatch | None = None
        if watch_launcher is None:
            watch_launcher = launched_by_launcher()
        if watch_launcher:
            if grace_s is None:
                grace_s = float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S))
            self.watch = LauncherWatch(self._orphaned, grace_s=grace_s)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            self.reason = signal.Signals(signum).name

    def _orphaned(self, reason: str) -> None:
        rank = os.environ.get("RANK", "?")
        grace = self.watch.grace_s if self.watch else DEFAULT_GRACE_S
        print(
            f"[sslscale] rank {rank}: {reason}; stopping after this step with a checkpoint (exit at the latest "
            f"in {grace:g}s)",
            file=sys.stderr,
            flush=True,
        )
        self.request(reason)

    def request(self, reason: str) -> None:
        """Ask for a stop from code (the launcher watch; tests)."""
        if self.reason is None:
            self.reason = reason
            if self.signum is None:
                self.signum = 0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        """Put the previous signal handlers back and stop watching the launcher."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self.watch is not None:
            self.watch.close()


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, stream: TextIO | None = None) -> None:
        self.timeout_s = timeout_s
        self.rank = rank
        self.stream = stream or sys.stderr
        self.step = 0
        self.stalls = 0
        self._last = time.monotonic()
        self._reported = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="sslscale-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        """Progress: call after every step."""
        self.step = step
        self._last = time.monotonic()
        self._reported = False

    def _watch(self) -> None:
        period = min(max(self.timeout_s / 4, 0.05), 10.0)
        while not self._stop.wait(period):
            idle = time.monotonic() - self._last
            if idle >= self.timeout_s and not self._reported:
                self._reported = True
                self.stalls += 1
                print(
                    f"[sslscale watchdog] rank {self.rank} stalled: no step progress for {idle:.0f}s after "
                    f"step {self.step} (watchdog_s={self.timeout_s:g}); stacks of every thread follow",
                    file=self.stream,
                    flush=True,
                )
                try:
                    faulthandler.dump_traceback(file=self.stream, all_threads=True)
                except (ValueError, OSError, AttributeError):  # a stream without a file descriptor
                    import traceback

                    for tid, frame in sys._current_frames().items():
                        print(f"Thread {tid}:", file=self.stream)
                        traceback.print_stack(frame, file=self.stream)
                self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
