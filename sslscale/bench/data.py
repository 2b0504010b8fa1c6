"""`sslscale bench data`: throughput of the streams the trainer consumes, with 0 / 1 / 2 DataLoader workers.

- two-view Fashion-MNIST (`simclr` pipeline): source images per second (each yields two augmented views);
- MLM and CLM on BBC News: tokens per second (MLM: non-padding tokens; CLM: every block token).

Shards are written first into a temporary directory (not timed). Each case builds a fresh stream in resampled
mode (no epoch boundary inside the measurement), takes `--warmup` batches (worker start-up, first shard reads),
then times `--batches` batches. The main process runs with torch's default thread count, workers with one
thread each. Also reported: the per-image decode cost of the shard format (.npy, cached-header fast path)
against `np.load`, since the storage format was chosen for decode speed.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from sslscale.bench import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer batches and smaller shard sets (~1 min)")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts, comma-separated")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batches", type=int, default=None, help="timed batches per case (default 40, quick 12)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 4, quick 2)")


def _stream_rate(spec, warmup: int, batches: int, count) -> tuple[float, float]:
    """(units per second over the timed batches, seconds to the first batch)."""
    from sslscale.data import build_stream

    stream = build_stream(spec)
    start = time.perf_counter()
    it = iter(stream)
    next(it)
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        next(it)
    units = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        units += count(next(it))
    elapsed = time.perf_counter() - t0
    it.close()
    return units / elapsed, first


def _decode_rows(shard_dir: Path, n: int = 2000) -> list[dict]:
    from sslscale.data.reading import _load_npy

    tar = sorted(shard_dir.glob("*.tar"))[0]
    import tarfile

    with tarfile.open(tar) as tf:
        payloads = [tf.extractfile(m).read() for m in tf if m.name.endswith(".npy")]
    payloads = (payloads * (n // len(payloads) + 1))[:n]
    rows = []
    for name, fn in (("npy fast path", _load_npy), ("np.load", lambda b: np.load(io.BytesIO(b)))):
        t0 = time.perf_counter()
        for p in payloads:
            fn(p)
        rows.append({"case": f"decode 1x28x28 ({name})", "workers": "-",
                     "rate": n / (time.perf_counter() - t0), "unit": "images/s"})
    return rows


def run(args: argparse.Namespace) -> int:
    from sslscale.data import StreamSpec
    from sslscale.data.shards import write_shards

    workers = [int(w) for w in args.workers.split(",")]
    batches = args.batches or (12 if args.quick else 40)
    warmup = args.warmup or (2 if args.quick else 4)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sslscale-bench-data-") as tmp:
        tmp = Path(tmp)
        print("writing shards ...", flush=True)
        write_shards("fashion-mnist", "train", tmp / "fm", per_shard=1000, limit=8000 if args.quick else 20000)
        write_shards("bbc-news", "train", tmp / "bbc", per_shard=100, limit=400 if args.quick else None,
                     vocab_size=8000)
        rows += _decode_rows(tmp / "fm")
        cases = [
            ("two-view fashion-mnist", dict(shards=str(tmp / "fm"), pipeline="simclr"), "samples/s",
             lambda b: b["view1"].shape[0]),
            ("mlm bbc-news", dict(shards=str(tmp / "bbc"), pipeline="mlm", seq_len=args.seq_len), "tokens/s",
             lambda b: int(b["attention_mask"].sum())),
            ("clm bbc-news", dict(shards=str(tmp / "bbc"), pipeline="clm", seq_len=args.seq_len), "tokens/s",
             lambda b: b["input_ids"].numel()),
        ]
        for name, kw, unit, count in cases:
            for w in workers:
                spec = StreamSpec(**kw, batch_size=args.batch_size, num_workers=w, mode="resampled", seed=0)
                rate, first = _stream_rate(spec, warmup, batches, count)
                rows.append({"case": name, "workers": w, "rate": rate, "unit": unit, "first_batch_s": first})
                print(f"  {name:24s} workers={w}: {rate:,.0f} {unit}", flush=True)
    common.print_table(rows, ["case", "workers", "rate", "unit", "first_batch_s"])
    two_view = [r["rate"] for r in rows if r["case"].startswith("two-view")]
    target = 2000.0
    print(f"best two-view rate {max(two_view):,.0f} samples/s (target >= {target:,.0f})")
    common.write_json(args.out, "data", {"batch_size": args.batch_size, "seq_len": args.seq_len,
                                         "timed_batches": batches, "rows": rows, "two_view_target": target})
    return 0
