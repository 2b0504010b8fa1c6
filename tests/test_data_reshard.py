"""A stream resumed on another world size (sslscale.data.reshard): the interrupted epoch is finished with the
old run's own batches, dealt over the new ranks, with nothing consumed seen twice and at most M - 1 trailing
batches dropped; then the new layout's epochs cover every sample once."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from sslscale.data import StreamSpec, build_stream

from .data_helpers import image_digest, shard_image_digests, shards


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    """8 shards x 32 images."""
    return shards(tmp_path_factory, "fashion-mnist", "test", per_shard=32, limit=256)


def _spec(fm, workers: int = 0) -> StreamSpec:
    return StreamSpec(shards=str(fm), pipeline="labeled", batch_size=8, num_workers=workers, seed=5)


def _first(stream, n: int) -> list[dict]:
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _digests(batches) -> Counter:
    return Counter(image_digest(img) for b in batches for img in b["image"])


def _old_run(fm, world: int, consumed: int, workers: int = 0):
    """Each old rank takes `consumed` batches and saves; also the straight continuation in the old run's global
    order (step by step, rank 0 first), which is what the replay must reproduce."""
    states, taken, rest = [], [], []
    for rank in range(world):
        stream = build_stream(_spec(fm, workers), rank=rank, world_size=world)
        batches = list(stream)  # one whole epoch of this rank
        taken.append(batches[:consumed])
        rest.append(batches[consumed:])
        again = build_stream(_spec(fm, workers), rank=rank, world_size=world)
        _first(again, consumed)
        states.append(again.state_dict())
    order = [rest[r][t] for t in range(len(rest[0])) for r in range(world)]
    return states, [b for bs in taken for b in bs], order


@pytest.mark.parametrize("old_world, new_world, old_workers", [(2, 1, 0), (1, 2, 0), (2, 3, 0), (2, 1, 2)])
def test_interrupted_epoch_is_finished_on_the_new_world_size(fm, old_world, new_world, old_workers):
    """(2 DataLoader workers per old rank: their round-robin order is part of what the replay reproduces.)"""
    states, consumed, order = _old_run(fm, old_world, consumed=5, workers=old_workers)
    replays = []
    for rank in range(new_world):
        stream = build_stream(_spec(fm), rank=rank, world_size=new_world)
        stream.load_resharded(states)
        replays.append(list(stream))  # the rest of the interrupted epoch
        assert stream.state_dict()["epoch"] == 1
        if rank == 0:  # then the new layout's own epoch
            fresh = build_stream(_spec(fm), rank=0, world_size=new_world)
            fresh.set_epoch(1)
            assert [torch.equal(a["image"], b["image"]) for a, b in zip(stream, fresh, strict=True)] == [True] * len(
                fresh
            )
    n = len(order) // new_world
    assert [len(r) for r in replays] == [n] * new_world
    for rank, replay in enumerate(replays):  # rank k has the old order's batches k, k + M, ...
        for j, batch in enumerate(replay):
            assert torch.equal(batch["image"], order[rank + j * new_world]["image"])
    seen = _digests(consumed) + _digests(b for r in replays for b in r)
    dropped = _digests(order[n * new_world :])
    assert len(order) - n * new_world < new_world
    assert max(seen.values()) == 1 and seen + dropped == shard_image_digests(fm)


def test_reshard_again_during_the_replay_continues_it(fm):
    states, consumed, order = _old_run(fm, 1, consumed=4)  # 28 batches left
    mid, first_part = [], []
    for rank in range(2):
        stream = build_stream(_spec(fm), rank=rank, world_size=2)
        stream.load_resharded(states)
        first_part.extend(_first(stream, 3))
        mid.append(stream.state_dict())
    stream = build_stream(_spec(fm), rank=0, world_size=1)
    stream.load_resharded(mid)
    rest = list(stream)
    assert len(rest) == 28 - 6
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, order[6:]))
    seen = _digests(consumed) + _digests(first_part) + _digests(rest)
    assert seen == shard_image_digests(fm)


def test_same_layout_resume_inside_the_replay_is_exact(fm):
    states, _, order = _old_run(fm, 2, consumed=5)
    stream = build_stream(_spec(fm), rank=1, world_size=3)
    stream.load_resharded(states)
    _first(stream, 2)
    again = build_stream(_spec(fm), rank=1, world_size=3)
    again.load_state_dict(stream.state_dict())
    rest = list(again)
    assert [torch.equal(b["image"], order[1 + (2 + j) * 3]["image"]) for j, b in enumerate(rest)] == [True] * (
        len(order) // 3 - 2
    )


def test_reshard_refuses_other_data_or_batch_size(fm):
    states, _, _ = _old_run(fm, 2, consumed=1)
    stream = build_stream(StreamSpec(shards=str(fm), pipeline="labeled", batch_size=16, num_workers=0, seed=5))
    with pytest.raises(ValueError, match=r"batch_size=\[8\] but this stream has batch_size=16"):
        stream.load_resharded(states)
    with pytest.raises(ValueError, match=r"every old rank in rank order, got ranks \[1\]"):
        build_stream(_spec(fm)).load_resharded(states[1:])
