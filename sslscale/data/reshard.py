"""Resuming a stream on another layout (world size and/or DataLoader workers per rank).

A stream's position is per logical worker of the old layout (N ranks x W workers = N*W slots, each reading its own
shards), so it cannot simply be handed to M ranks. Instead, in epoch mode the new ranks first *finish the
interrupted epoch as the old layout would have produced it*, then continue with their own layout:

- The old run consumed batches in a fixed global order: at each step, rank 0's next batch, rank 1's, ...; within
  old rank r the t-th batch after the checkpoint comes from logical worker (next_worker_r + t) % W. The remaining
  batches of the epoch, numbered i = 0, 1, ... in that order, are exactly the batches the old run would still
  have trained on (same samples, same per-batch augmentation seeds, which are keyed by the old slot).
- New rank k of M takes batches i = k, k + M, k + 2M, ...; each rank takes floor(R / M) of the R remaining, so all
  ranks yield the same number (no collective hangs). The last R mod M (< M) batches of the epoch are dropped.
- Guarantee (epoch mode): within the interrupted epoch, no sample the checkpoint had consumed is seen again, and
  no sample is lost except those of the < M dropped trailing batches (plus the old layout's own end-of-epoch
  leftovers, as without a reshard). "Consumed" means handed to the training loop before the checkpoint: batches a
  DataLoader had prefetched but the loop had not taken are not consumed and come back. From the next epoch on the
  new layout's assignment applies. A second reshard during the replay continues it (the replay's position is
  the global count of its batches taken: ranks x batches each).
- Cost: the replay runs in the training process (no DataLoader workers) and a new rank reads, without building
  the batch, every remaining batch of the old ranks it draws from (all of them when M does not divide N). This
  lasts until the end of one epoch.
- Resampled mode draws shards with replacement, so there is nothing to finish: the new layout starts the next
  epoch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

__all__ = ["Remainder", "origin_of"]


def origin_of(states: list[dict], target: int) -> dict | None:
    """What the replay needs from the N old ranks' stream states (rank order): None when the epoch had not
    started (nothing to finish). `target`: batches per logical worker per epoch under the old layout."""
    first = states[0]
    if first.get("remainder"):  # resharded again during a replay: continue the same replay
        origins = [s["remainder"]["origin"] for s in states]
        taken = {s["remainder"]["taken"] for s in states}
        if any(o != origins[0] for o in origins) or len(taken) != 1:
            raise ValueError("the ranks' stream states are at different points of a replayed epoch")
        origin = dict(origins[0])
        origin["skip"] += taken.pop() * len(states)
        return origin
    if not any(s["worker_states"] for s in states):
        return None
    workers = first["workers"]
    slot_states: dict[str, dict] = {}
    remaining = []
    for r, st in enumerate(states):
        done = 0
        for w in range(workers):
            ws = st["worker_states"].get(str(w))
            done += ws["batches"] if ws else 0
            if ws:
                slot_states[str(r * workers + w)] = ws
        remaining.append(target * workers - done)
    if len(set(remaining)) != 1:
        raise ValueError(
            f"the ranks' stream states have different batches left in epoch {first['epoch']} "
            f"({remaining}); they were not saved at the same step"
        )
    return {
        "epoch": first["epoch"],
        "world": len(states),
        "workers": workers,
        "next": [int(s["next_worker"]) for s in states],
        "states": slot_states,
        "skip": 0,
        "remaining": remaining[0],
    }


class Remainder:
    """The rest of an interrupted epoch (`origin`) as new rank `rank` of `world` sees it; `taken` batches of it
    already yielded (resume inside the replay)."""

    def __init__(self, plan, origin: dict, rank: int, world: int, taken: int = 0) -> None:
        from sslscale.data.stream import _Worker

        self._worker_cls = _Worker
        self.plan, self.origin, self.rank, self.world, self.taken = plan, origin, rank, world, taken
        total = origin["remaining"] * origin["world"]
        self.count = max(total - origin["skip"], 0) // world
        self._iters: dict[tuple[int, int], list] = {}  # (old rank, worker) -> [worker, iterator, batches pulled]

    def __len__(self) -> int:
        return self.count

    def _old_plan(self, old_rank: int):
        plan = copy.copy(self.plan)
        plan.rank, plan.world_size, plan.workers = old_rank, self.origin["world"], self.origin["workers"]
        plan.slots = plan.world_size * plan.workers
        return plan

    def _pull(self, old_rank: int, worker: int, local: int) -> dict:
        """Batch number `local` (after the checkpoint) of old logical worker (old_rank, worker)."""
        key = (old_rank, worker)
        if key not in self._iters:
            slot = old_rank * self.origin["workers"] + worker
            w = self._worker_cls(
                self._old_plan(old_rank), worker, self.origin["epoch"], self.origin["states"].get(str(slot))
            )
            self._iters[key] = [w, iter(w), 0]
        w, it, pulled = self._iters[key]
        try:
            while True:
                w.assemble = pulled == local
                batch, _ = next(it)
                pulled += 1
                self._iters[key][2] = pulled
                if pulled > local:
                    return batch
        except StopIteration:
            raise RuntimeError(
                f"replaying epoch {self.origin['epoch']}: old worker {worker} of rank {old_rank} "
                f"ended before its batch {local}"
            ) from None

    def __iter__(self) -> Iterator[dict]:
        o = self.origin
        n_old, workers = o["world"], o["workers"]
        while self.taken < self.count:
            i = o["skip"] + self.rank + self.taken * self.world
            t, old_rank = divmod(i, n_old)
            worker = (o["next"][old_rank] + t) % workers
            batch = self._pull(old_rank, worker, t // workers)
            self.taken += 1
            yield batch

    def state(self) -> dict:
        return {"origin": self.origin, "taken": self.taken}
