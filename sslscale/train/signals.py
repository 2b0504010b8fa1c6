"""Preemption and stalls.

`StopRequest`: SIGTERM or SIGUSR1 (SLURM's `--signal=USR1@120`) only sets a flag; the training loop all-reduces it
every step, so a signal delivered to any one rank stops all of them after the same step, with a checkpoint.

`Watchdog`: a thread that reports a rank making no step progress for `timeout_s` (which rank, which step, the
stacks of every thread via faulthandler) instead of leaving a silent hang; it reports, it does not kill.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
import time
from typing import TextIO

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signum: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


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
                print(f"[sslscale watchdog] rank {self.rank} stalled: no step progress for {idle:.0f}s after "
                      f"step {self.step} (watchdog_s={self.timeout_s:g}); stacks of every thread follow",
                      file=self.stream, flush=True)
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
