"""Hooks into the training loop, named in the config (`callbacks: [{fn: "package.module:Factory", kwargs: {...}}]`,
kwargs checked against the factory's signature at load). Every hook defaults to nothing, so a callback overrides
only what it needs; the loop calls all of them on every callback.

The reliability tests use one (tests/train_callbacks.py) to SIGKILL every rank right after a checkpoint is complete;
the loop itself has no test hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Callback:
    def on_step_end(self, session: Any, step: int, record: dict | None) -> None:
        """After optimizer step `step` (1-based), logged or not (`record`: the logged JSON line, or None)."""

    def on_checkpoint(self, session: Any, step: int, path: Path) -> None:
        """After the checkpoint of `step` is complete on every rank (its COMPLETE marker written)."""
