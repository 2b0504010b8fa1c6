"""Streams: rank x worker split, exactly-once epochs, equal batch counts, exact resume in a new process,
corrupt-data policies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from sslscale.data import StreamSpec, build_stream
from sslscale.data.reading import CorruptDataError
from sslscale.data.stream import _Plan

from .data_helpers import image_digest, shard_image_digests, shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> Path:
    """8 shards x 32 Fashion-MNIST test images: 2 ranks x 2 workers x 2 shards x 32 = 8 batches of 8 each."""
    return shards(tmp_path_factory, "fashion-mnist", "test", per_shard=32, limit=256)


def _take(stream, n: int) -> list[dict]:
    """n batches, continuing into the next epoch(s) when one ends."""
    out: list[dict] = []
    while len(out) < n:
        for batch in stream:
            out.append(batch)
            if len(out) == n:
                break
    return out


def test_ranks_and_workers_read_disjoint_shards(fm):
    spec = StreamSpec(shards=str(fm / "manifest.json"), pipeline="labeled", batch_size=8, num_workers=2)
    seen = []
    for rank in range(2):
        plan = _Plan(spec, rank, 2)
        for worker in range(2):
            seen.extend(plan.slot_shards(epoch=0, slot=plan.slot(worker)))
    assert sorted(seen) == list(range(8))
    assert _Plan(spec, 0, 2).slot_shards(0, 0) != _Plan(spec, 0, 2).slot_shards(1, 0), "shard order not reshuffled"


@pytest.mark.parametrize("num_workers", [2, 0])
def test_every_sample_once_per_epoch_and_equal_batches(fm, num_workers):
    expected = shard_image_digests(fm)
    seen: Counter = Counter()
    counts = []
    for rank in range(2):
        stream = build_stream(
            StreamSpec(shards=str(fm), pipeline="labeled", batch_size=8, num_workers=num_workers, seed=1),
            rank=rank,
            world_size=2,
        )
        batches = list(stream)
        counts.append(len(batches))
        assert len(batches) == len(stream) == 16
        for b in batches:
            assert b["image"].shape == (8, 1, 28, 28) and b["label"].dtype == torch.int64
            seen.update(image_digest(img) for img in b["image"])
        assert stream.stats["samples"] == 128 and stream.stats["skipped_total"] == 0
    assert seen == expected


def test_uneven_shards_still_give_equal_batch_counts(tmp_path_factory):
    out = shards(tmp_path_factory, "fashion-mnist", "test", per_shard=30, limit=170)  # 5x30 + 20
    counts = []
    for rank in range(2):
        stream = build_stream(
            StreamSpec(shards=str(out), pipeline="labeled", batch_size=8, num_workers=0), rank=rank, world_size=2
        )
        for epoch in range(2):
            counts.append((len(list(stream)), stream.batches_per_epoch))
    assert len({c for c, _ in counts}) == 1, counts


def test_inputs_forms_and_determinism(fm):
    names = sorted(str(p) for p in fm.glob("*.tar"))
    pattern = str(fm / "fashion-mnist-test-{000000..000007}.tar")
    results = []
    for source in (str(fm / "manifest.json"), pattern, names, str(fm / "manifest.json")):
        stream = build_stream(StreamSpec(shards=source, pipeline="simclr", batch_size=8, num_workers=0, seed=5))
        results.append(_take(stream, 3))
    other = _take(build_stream(StreamSpec(shards=names, pipeline="simclr", batch_size=8, num_workers=0, seed=6)), 3)
    for res in results[1:]:
        for a, b in zip(results[0], res):
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(results[0][0]["view1"], other[0]["view1"])


def test_too_few_shards_for_readers(fm):
    with pytest.raises(ValueError, match=r"8 shards cannot feed 4 ranks x 3 workers = 12 readers"):
        build_stream(StreamSpec(shards=str(fm), batch_size=8, num_workers=3), rank=0, world_size=4)
    # resampled mode is the documented fallback
    stream = build_stream(
        StreamSpec(shards=str(fm), batch_size=8, num_workers=0, mode="resampled", batches_per_epoch=5),
        rank=3,
        world_size=4,
    )
    assert len(list(stream)) == 5


RESUME_CHILD = r"""
import json, sys, torch
from sslscale.data import StreamSpec, build_stream
args = json.loads(sys.argv[1])
stream = build_stream(StreamSpec(**args["spec"]), rank=args["rank"], world_size=args["world_size"])
stream.load_state_dict(torch.load(args["state"]))
out = []
while len(out) < args["n"]:
    for batch in stream:
        out.append(batch)
        if len(out) == args["n"]:
            break
torch.save(out, args["out"])
"""


def test_resume_in_new_process_is_exact(fm, tmp_path):
    """2 ranks x 2 workers, shuffling and two-view augmentation on: take 13 batches, save the state, rebuild in
    a fresh process, take 6 more (crossing into epoch 1): they equal the uninterrupted run's batches 13..18."""
    spec = dict(shards=str(fm / "manifest.json"), pipeline="simclr", batch_size=8, num_workers=2, seed=7)
    n_first, n_next = 13, 6
    for rank in range(2):
        reference = _take(build_stream(StreamSpec(**spec), rank=rank, world_size=2), n_first + n_next)
        stream = build_stream(StreamSpec(**spec), rank=rank, world_size=2)
        _take(stream, n_first)
        state = stream.state_dict()
        assert state["next_worker"] == 1 and state["epoch"] == 0
        torch.save(state, tmp_path / "state.pt")
        args = dict(
            spec=spec,
            rank=rank,
            world_size=2,
            n=n_next,
            state=str(tmp_path / "state.pt"),
            out=str(tmp_path / f"resumed{rank}.pt"),
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", RESUME_CHILD, json.dumps(args)], check=True, env=env, timeout=300)
        resumed = torch.load(tmp_path / f"resumed{rank}.pt")
        assert len(resumed) == n_next
        for i, (a, b) in enumerate(zip(reference[n_first:], resumed)):
            for key in ("view1", "view2", "label"):
                assert torch.equal(a[key], b[key]), f"rank {rank} batch {n_first + i} {key} differs after resume"


def test_resume_rejects_other_layout(fm):
    stream = build_stream(StreamSpec(shards=str(fm), batch_size=8, num_workers=2), rank=0, world_size=2)
    other = build_stream(StreamSpec(shards=str(fm), batch_size=8, num_workers=1), rank=0, world_size=2)
    with pytest.raises(ValueError, match="workers=2"):
        other.load_state_dict(stream.state_dict())


def _corrupt_copy(fm: Path, tmp_path: Path) -> Path:
    import webdataset as wds

    out = tmp_path / "bad"
    shutil.copytree(fm, out)
    names = sorted(p.name for p in out.glob("*.tar"))
    truncated = out / names[0]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    (out / names[1]).write_bytes(b"this is not a tar file\n" * 50)
    missing = out / names[2]
    samples = []
    import tarfile

    with tarfile.open(missing) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tf.extractfile(m).read()
    for s in samples[:3]:
        del s["npy"]
    with wds.TarWriter(str(missing), encoder=False) as w:
        for s in samples:
            w.write(s)
    return out


def test_corrupt_data_skip_counts_and_keeps_batch_counts(fm, tmp_path):
    """verify=False: the tar-level handling itself (with the manifest's checksums the three shards would be
    dropped whole, see test_data_reliability.py)."""
    bad = _corrupt_copy(fm, tmp_path)
    totals: Counter = Counter()
    events: Counter = Counter()
    for rank in range(2):
        stream = build_stream(
            StreamSpec(shards=str(bad), pipeline="labeled", batch_size=8, num_workers=2, corrupt="skip", verify=False),
            rank=rank,
            world_size=2,
        )
        batches = list(stream)
        assert len(batches) == 16, "a short rank would hang the collective"
        assert all(b["image"].shape[0] == 8 for b in batches)
        totals.update(stream.stats["skipped"])
        events.update(stream.stats["shard_errors"])
    assert events["unreadable_shard"] == 1 and totals["unreadable_shard"] == 32, "counted in samples, not events"
    assert events["truncated_shard"] == 1 and 10 <= totals["truncated_shard"] <= 22
    assert totals["missing_field"] >= 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_data_fail_policy_raises(fm, tmp_path, num_workers):
    bad = _corrupt_copy(fm, tmp_path)
    found = False
    for rank in range(2):
        stream = build_stream(
            StreamSpec(
                shards=str(bad),
                pipeline="labeled",
                batch_size=8,
                num_workers=num_workers,
                corrupt="fail",
                shuffle=False,
            ),
            rank=rank,
            world_size=2,
        )
        try:
            list(stream)
        except CorruptDataError as e:
            found = True
            assert "corrupt='fail'" in str(e)
    assert found


def test_epoch_boundaries_in_state(fm):
    spec = StreamSpec(shards=str(fm), pipeline="labeled", batch_size=8, num_workers=0, seed=2)
    stream = build_stream(spec, rank=0, world_size=2)
    full = _take(stream, len(stream))
    state = stream.state_dict()
    assert state["epoch"] == 1 and state["worker_states"] == {}, "after the last batch the state is epoch 1's start"
    stream = build_stream(spec, rank=0, world_size=2)
    _take(stream, 3)
    stream.set_epoch(0)  # the usual training-loop call must not lose the position
    rest = list(stream)
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full[3:], rest))
    stream.set_epoch(5)
    assert stream.state_dict()["epoch"] == 5
