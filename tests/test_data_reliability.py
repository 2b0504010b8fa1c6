"""The data side of reliability (issue 12): payload corruption, flipped tar-header bytes, malformed samples,
manifest escapes and unbounded reads, unopenable URLs, a missing shards directory, refill warnings. Each test
first shows the failure the old reader had (or how the bad data looks), then the handling."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sslscale.data import CorruptDataError, StreamSpec, build_stream, read_all
from sslscale.data.reading import ErrorCounter, ReadOptions, visit_shard
from sslscale.data.shardlist import ShardInfo

from .data_helpers import HttpServer, image_digest, shards, tar_samples


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> Path:
    return shards(tmp_path_factory, "fashion-mnist", "test", per_shard=32, limit=256)


def _names(d: Path) -> list[str]:
    return [s["name"] for s in json.loads((d / "manifest.json").read_text())["shards"]]


def _write_tar(path: Path, samples: list[dict]) -> None:
    """Plain ustar tar (mtime 0), like `sslscale shards` writes."""
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)


def _samples(path: Path) -> list[dict]:
    return [{"__key__": k, **v} for k, v in tar_samples(path).items()]


def _delivered(spec: StreamSpec) -> tuple[list[dict], dict]:
    stream = build_stream(spec)
    return list(stream), stream.stats


# ------------------------------------------------------------------------------------ payload corruption
def test_payload_corruption_is_caught_by_the_manifest_checksum(fm, tmp_path):
    bad = tmp_path / "payload"
    shutil.copytree(fm, bad)
    name = _names(bad)[2]
    samples = _samples(bad / name)
    arr = np.load(io.BytesIO(samples[5]["npy"])).copy()
    arr[0, 14, 14] ^= 0xFF  # one altered pixel
    buf = io.BytesIO()
    np.save(buf, arr)
    samples[5]["npy"] = buf.getvalue()
    samples[6]["cls"] = str((int(samples[6]["cls"]) + 3) % 10).encode()  # one altered label
    _write_tar(bad / name, samples)
    altered = image_digest(torch.from_numpy(arr))
    base = dict(shards=str(bad), pipeline="labeled", batch_size=8, num_workers=0)

    # the failure: without the check, the altered samples are delivered
    batches, stats = _delivered(StreamSpec(**base, verify=False))
    assert altered in {image_digest(img) for b in batches for img in b["image"]}
    assert stats["skipped_total"] == 0

    # in memory (the default for small shards): verified before use, the whole shard is dropped, counted in samples
    batches, stats = _delivered(StreamSpec(**base))
    assert altered not in {image_digest(img) for b in batches for img in b["image"]}
    assert stats["skipped"] == {"checksum_mismatch": 32} and stats["shard_errors"] == {"checksum_mismatch": 1}
    assert len(batches) == 32, "the epoch keeps its length (refilled)"
    with pytest.raises(CorruptDataError, match=rf"checksum_mismatch in .*{name}: sha256 .* manifest says"):
        _delivered(StreamSpec(**base, corrupt="fail"))

    # streamed: hashed on the way, detected at the shard's end (after delivery), counted / raised
    streamed = dict(base, in_memory_mb=0, shuffle=False)
    _, stats = _delivered(StreamSpec(**streamed))
    assert stats["shard_errors"].get("checksum_mismatch") == 1
    with pytest.raises(CorruptDataError, match="delivered before the check could fail"):
        _delivered(StreamSpec(**streamed, corrupt="fail"))


# -------------------------------------------------------------------------------------- damaged headers
def _flip_header_byte(path: Path, member: int) -> None:
    """Flip one byte inside the name field of the `member`-th tar header."""
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        offset = tf.getmembers()[member].offset
    data[offset + 3] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_header_byte_costs_one_sample_not_the_rest_of_the_shard(fm, tmp_path):
    bad = tmp_path / "header"
    shutil.copytree(fm, bad)
    name = _names(bad)[0]
    _flip_header_byte(bad / name, member=21)  # sample 10's second member (cls, npy per sample)

    # the failure: tarfile (under webdataset's iterator too) ends quietly at the damaged header
    with tarfile.open(bad / name) as tf:
        assert len(tf.getmembers()) == 21, "the 43 members after the damage are silently gone"

    info = ShardInfo(str(bad / name), str(bad / name), count=32)
    errors = ErrorCounter("skip")
    raw = list(
        visit_shard(info, in_memory=True, order_seed=None, offset=0, opts=ReadOptions(verify=False), errors=errors)
    )
    assert len(raw) == 32 and sum("npy" in s for s in raw) == 31, "everything after the damage is recovered"
    assert errors.events == {"damaged_header": 1}

    base = dict(shards=[str(bad / name)], pipeline="labeled", batch_size=31, num_workers=0, shuffle=False, verify=False)
    batches = list(read_all(StreamSpec(**base)))
    assert sum(len(b["label"]) for b in batches) == 31
    stream = build_stream(StreamSpec(**{**base, "shards": str(bad)}, corrupt="skip"))
    list(stream)
    assert stream.stats["skipped"].get("damaged_header") == 1, "the lost sample is counted under its cause"
    # with the manifest's checksum on, the shard cannot be trusted: dropped, and said so (not silently short)
    stream = build_stream(StreamSpec(shards=str(bad), pipeline="labeled", batch_size=8, num_workers=0))
    list(stream)
    assert stream.stats["skipped"] == {"checksum_mismatch": 32}


def test_damaged_pax_headers_of_shardwriter_shards_recover(tmp_path):
    from .data_helpers import writer_shards

    out = writer_shards(tmp_path / "pax", n_shards=1, per_shard=12, sizes=((12, 12),))
    tar = next(out.glob("*.tar"))
    data = bytearray(tar.read_bytes())
    headers = [p for p in range(0, len(data), 512) if data[p + 257 : p + 262] == b"ustar"]
    assert data[headers[0] + 156 : headers[0] + 157] == b"x", "ShardWriter writes PAX headers"
    data[headers[13] + 5] ^= 0x40  # sample 3's cls member header (pax, real) x (cls, jpg) per sample
    tar.write_bytes(bytes(data))
    stream = build_stream(
        StreamSpec(shards=str(out), pipeline="labeled", batch_size=11, num_workers=0, channels=3, shuffle=False)
    )
    labels = [int(y) for b in stream for y in b["label"]]
    assert sorted(labels) == [i for i in range(12) if i != 3]
    assert stream.stats["skipped"] == {"damaged_header": 1}


# ------------------------------------------------------------------------------------ malformed samples
def test_malformed_samples_are_skipped_counted_and_resume_does_not_loop(fm, tmp_path):
    bad = tmp_path / "malformed"
    shutil.copytree(fm, bad)
    name = _names(bad)[1]
    samples = _samples(bad / name)
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 32, 32), np.uint8))
    samples[3]["npy"] = buf.getvalue()  # decodable, wrong shape
    samples[8]["cls"] = b"1" * 30  # overflows int64
    samples[12]["cls"] = b"-7"
    samples[20]["cls"] = b"99"  # 10 classes in the manifest
    _write_tar(bad / name, samples)
    keys = [samples[i]["__key__"] for i in (3, 8, 12, 20)]
    spec = dict(shards=str(bad), pipeline="labeled", batch_size=8, num_workers=0, seed=4, verify=False)

    # the failure: the old stream crashed in np.stack / torch.tensor at a fixed step, again after each resume
    with pytest.raises(
        CorruptDataError,
        match=rf"bad_image in .*{name}: sample '{keys[0]}': image shape "
        r"\(1, 32, 32\) differs",
    ):
        list(read_all(StreamSpec(**spec, corrupt="fail", shuffle=False)))

    reference = list(build_stream(StreamSpec(**spec)))
    stream = build_stream(StreamSpec(**spec))
    assert len(reference) == len(stream) == 32
    stats = build_stream(StreamSpec(**spec))
    list(stats)
    assert stats.stats["skipped"] == {"bad_image": 1, "bad_label": 3}
    for cut in (3, 17):  # resume from a state before / after the bad samples of that shard
        stream = build_stream(StreamSpec(**spec))
        it = iter(stream)
        for _ in range(cut):
            next(it)
        state = stream.state_dict()
        resumed = build_stream(StreamSpec(**spec))
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(rest) == 32 - cut, "resume continues past the bad samples"
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(reference[cut:], rest))
        assert resumed.stats["skipped"] == {"bad_image": 1, "bad_label": 3}, "counted once, resumes included"
    labels = torch.cat([b["label"] for b in reference])
    assert labels.min() >= 0 and labels.max() <= 9


# ------------------------------------------------------------------------------- manifests, bounded reads
@pytest.mark.parametrize(
    "name",
    ["../other/x.tar", "/etc/passwd", "/dev/zero", "sub/../../x.tar", "http://evil/x.tar", "pipe:cat /etc/passwd"],
)
def test_manifest_entries_are_confined_to_their_directory(fm, tmp_path, name):
    d = tmp_path / "escape"
    shutil.copytree(fm, d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="leaves the manifest's directory"):
        build_stream(StreamSpec(shards=str(d), pipeline="labeled", batch_size=8, num_workers=0))


def test_bad_manifest_values_are_named(fm, tmp_path):
    d = tmp_path / "values"
    shutil.copytree(fm, d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["shards"][1]["count"] = "lots"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError,
        match=r"entry 'fashion-mnist-test-000001.tar' has count='lots', expected an "
        "integer >= 0",
    ):
        build_stream(StreamSpec(shards=str(d), pipeline="labeled", batch_size=8, num_workers=0))


def test_reads_are_bounded(fm, tmp_path):
    # a device given as a shard (not through a manifest) is streamed, never slurped: it ends at the zero blocks
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="gave no usable sample"):
        list(
            build_stream(
                StreamSpec(
                    shards=["/dev/zero"],
                    pipeline="labeled",
                    batch_size=8,
                    num_workers=0,
                    mode="resampled",
                    batches_per_epoch=1,
                    channels=1,
                    image_size=28,
                )
            )
        )
    assert time.monotonic() - start < 30
    # a member above max_sample_mb is skipped unread and counted
    stream = build_stream(
        StreamSpec(
            shards=str(fm),
            pipeline="labeled",
            batch_size=8,
            num_workers=0,
            max_sample_mb=1e-4,
            mode="resampled",
            batches_per_epoch=1,
        )
    )
    with pytest.raises(RuntimeError, match="oversized_member"):
        list(stream)
    # a header declaring an 8 GiB member in a small file: skipped, reported as a cut, no 8 GiB read
    big = tarfile.TarInfo("00000000.npy")
    big.size = (8 << 30) - 512
    header = big.tobuf(format=tarfile.USTAR_FORMAT)
    (tmp_path / "huge.tar").write_bytes(header + b"\0" * 4096)
    errors = ErrorCounter("skip")
    info = ShardInfo(str(tmp_path / "huge.tar"), str(tmp_path / "huge.tar"))
    start = time.monotonic()
    assert list(visit_shard(info, in_memory=False, order_seed=None, offset=0, opts=ReadOptions(), errors=errors)) == []
    assert errors.events == {"truncated_shard": 1} and time.monotonic() - start < 5


# ----------------------------------------------------------------------------------- what cannot be opened
def test_missing_shards_directory_names_the_cause(tmp_path):
    missing = tmp_path / "data-cache" / "fmnist-train"
    # the old message: "batch_size 64 is larger than what the smallest of 1 readers holds"
    with pytest.raises(FileNotFoundError, match=rf"shards '{missing}': no such file or directory"):
        build_stream(StreamSpec(shards=str(missing), pipeline="simclr", batch_size=64, num_workers=0))
    with pytest.raises(FileNotFoundError, match=r"2 of 3 shards do not exist, first"):
        build_stream(StreamSpec(shards=[str(missing / f"{i}.tar") for i in range(2)] + ["/dev/null"], num_workers=0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no manifest.json and no \\*.tar files"):
        build_stream(StreamSpec(shards=str(tmp_path / "empty"), num_workers=0))


def test_unopenable_urls_are_named_with_their_cause(fm, tmp_path):
    server = HttpServer(fm)
    try:
        url = f"{server.url}/no-such-shard.tar"
        # epoch mode must count samples: an unopenable shard is an error, not an empty shard
        with pytest.raises(OSError, match=rf"cannot read shard {url}: command `curl .*` exited with status 22"):
            build_stream(StreamSpec(shards=[url], pipeline="labeled", batch_size=8, num_workers=0))
        # resampled mode: a counted skip (the good shard keeps the stream going), or an error under `fail`
        good = f"{server.url}/{_names(fm)[0]}"
        stream = build_stream(
            StreamSpec(
                shards=[url, good],
                pipeline="labeled",
                batch_size=8,
                num_workers=0,
                mode="resampled",
                batches_per_epoch=12,
            )
        )
        assert len(list(stream)) == 12
        assert stream.stats["shard_errors"].get("unreadable_shard", 0) >= 1
        with pytest.raises(CorruptDataError, match=rf"unreadable_shard in {url}: .* status 22"):
            list(
                build_stream(
                    StreamSpec(
                        shards=[url],
                        pipeline="labeled",
                        batch_size=8,
                        num_workers=0,
                        mode="resampled",
                        batches_per_epoch=1,
                        corrupt="fail",
                        channels=1,
                        image_size=28,
                    )
                )
            )
        with pytest.raises(ValueError, match=rf"cannot tell the image format .*{url}: .* status 22"):
            build_stream(StreamSpec(shards=[url], pipeline="labeled", mode="resampled", num_workers=0))
    finally:
        server.close()
    with pytest.raises(CorruptDataError, match=r"unreadable_shard in pipe:exit 3: .*`exit 3` exited with status 3"):
        list(
            build_stream(
                StreamSpec(
                    shards=["pipe:exit 3"],
                    pipeline="labeled",
                    batch_size=8,
                    num_workers=0,
                    mode="resampled",
                    batches_per_epoch=1,
                    corrupt="fail",
                    channels=1,
                    image_size=28,
                )
            )
        )


# --------------------------------------------------------------------------------------------- refills
def test_refills_are_counted_in_samples_and_warned_about(fm, tmp_path, caplog):
    bad = tmp_path / "refill"
    shutil.copytree(fm, bad)
    (bad / _names(bad)[3]).write_bytes(b"not a tar file\n" * 100)
    totals: Counter = Counter()
    with caplog.at_level(logging.WARNING, logger="sslscale.data"):
        for rank in range(4):  # 4 readers of 2 shards each: one reader loses half its epoch
            stream = build_stream(
                StreamSpec(shards=str(bad), pipeline="labeled", batch_size=8, num_workers=0, refill_warn=0.1),
                rank=rank,
                world_size=4,
            )
            assert len(list(stream)) == 8
            totals["refill_samples"] += stream.stats["refill_samples"]
            totals.update(stream.stats["skipped"])
    assert totals["checksum_mismatch"] == 32, "samples lost, not events"
    assert totals["refill_samples"] == 32
    assert "refill passes supplied 32 samples of epoch 0 (over refill_warn=10% of 64)" in caplog.text
