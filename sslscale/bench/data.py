"""`sslscale bench data`: throughput and memory of the streams the trainer consumes, 0 / 1 / 2 DataLoader workers.

- two-view JPEG streams (`simclr` pipeline, RGB, full SimCLR augmentation with colour jitter) at 64 px (from
  72 px JPEGs) and 224 px (from 256 px JPEGs), over shards of `--shard-mb` (256 MB: streamed, never held whole),
  side by side with a plain webdataset pipeline doing the same work: `WebDataset(resampled) .shuffle(1000)
  .decode("rgb8") .to_tuple .batched`, then the same batched augmentation (`sslscale.data.vision.simclr_batch`).
  Reported: source images per second (mean of two visits per side, in ABBA order) and the peak extra resident
  memory per worker (VmHWM above the worker's size at start; with 0 workers, the main process's);
- the data path alone at 256 px (read, decode, batch; `labeled` pipeline vs webdataset's decode("rgb8") + collate);
- two-view Fashion-MNIST (`.npy` shards of 1,000 samples: read in memory) and the same shards streamed;
- MLM and CLM on BBC News: tokens per second (MLM: non-padding tokens; CLM: every block token);
- per-image decode rates: `.npy` (cached-header fast path) vs `np.load`, JPEG with simplejpeg vs Pillow.

Shards are written first into a temporary directory (not timed) and deleted after. Each case builds a fresh
stream in resampled mode (no epoch boundary inside the measurement), takes `--warmup` batches (worker start-up,
shuffle-buffer fill), then times `--batches` batches. The main process runs with torch's default thread count,
workers with one thread each.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from sslscale.bench import common

JPEG_CASES = ((64, 72), (224, 256))  # (output side, stored JPEG side)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer batches and small shards (~2 min)")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts, comma-separated")
    parser.add_argument("--batch-size", type=int, default=256, help="Fashion-MNIST and text batch size")
    parser.add_argument("--jpeg-batch-size", type=int, default=64, help="JPEG stream batch size")
    parser.add_argument("--shard-mb", type=float, default=None, help="JPEG shard size (default 256, quick 16)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--batches",
        type=int,
        default=None,
        help="timed batches per case (default 40, quick 12; JPEG cases a quarter of it)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 4, quick 2)")
    parser.add_argument("--skip", default="", help="comma-separated case groups to skip: jpeg,wds,fmnist,text")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


class _MainPeak:
    """Peak extra resident memory of this process from now on (used for 0-worker cases)."""

    def __init__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _rss_kib("VmRSS")

    def mib(self) -> float:
        return max(_rss_kib("VmHWM") - self.base, 0) / 1024


def _timed(it, warmup: int, batches: int, count) -> tuple[float, float]:
    """(units per second over the timed batches, seconds to the first batch)."""
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        next(it)
    units = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        units += count(next(it))
    return units / (time.perf_counter() - t0), first


def _stream_case(spec, warmup: int, batches: int, count) -> dict:
    from sslscale.data import build_stream

    main = _MainPeak() if spec.num_workers == 0 else None
    stream = build_stream(spec)
    it = iter(stream)
    rate, first = _timed(it, warmup, batches, count)
    it.close()
    peaks = stream.stats["worker_peak_mib"]
    peak = main.mib() if main is not None else (max(peaks.values()) if peaks else None)
    return {"rate": rate, "first_batch_s": first, "peak_mib_per_worker": peak}


def _wds_pipeline_class():
    import torch

    class _WdsPipeline(torch.utils.data.IterableDataset):
        """The webdataset baseline yielding (two-view batch, worker peak MiB)."""

        __init__ = _WdsBody.__init__
        __iter__ = _WdsBody.__iter__

    return _WdsPipeline


class _WdsBody:
    def __init__(self, urls: list[str], batch_size: int, size: int | None):
        self.urls, self.batch_size, self.size = urls, batch_size, size  # size None: decode + batch only

    def __iter__(self):
        import torch
        import webdataset as wds

        from sslscale.data import vision

        info = torch.utils.data.get_worker_info()
        peak = None
        if info is not None:
            torch.set_num_threads(1)
            peak = _MainPeak()
        cfg = vision.AugmentConfig()

        def collate(samples):
            images = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2).contiguous()
            return images, torch.tensor([int(s[1]) for s in samples])

        ds = (
            wds.WebDataset(
                self.urls,
                resampled=True,
                shardshuffle=False,
                nodesplitter=None,
                empty_check=False,
                seed=info.id if info is not None else 0,
            )
            .shuffle(1000)
            .decode("rgb8")
            .to_tuple("jpg", "cls")
            .batched(self.batch_size, collation_fn=collate)
        )
        for index, (images, labels) in enumerate(ds):
            if self.size is None:
                batch = vision.labeled_batch(images, labels)
            else:
                batch = vision.simclr_batch(images, labels, self.size, cfg, torch.Generator().manual_seed(index))
            yield batch, (peak.mib() if peak is not None else None)


def _wds_case(urls: list[str], workers: int, batch_size: int, size: int | None, warmup: int, batches: int) -> dict:
    import torch

    main = _MainPeak() if workers == 0 else None
    dataset = _wds_pipeline_class()(urls, batch_size, size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None
    )
    peaks: list[float] = []

    def count(item):
        batch, peak = item
        if peak is not None:
            peaks.append(peak)
        return batch["view1" if size is not None else "image"].shape[0]

    it = iter(loader) if workers else iter(dataset)
    before = torch.get_num_threads()
    if not workers:
        torch.set_num_threads(1)  # as the sslscale stream assembles inline batches (inline_threads=1)
    try:
        rate, first = _timed(it, warmup, batches, count)
    finally:
        torch.set_num_threads(before)
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    peak = main.mib() if main is not None else (max(peaks) if peaks else None)
    return {"rate": rate, "first_batch_s": first, "peak_mib_per_worker": peak}


def _write_jpeg_shards(out: Path, side: int, shard_mb: float, n_shards: int = 2, pool: int = 400) -> list[str]:
    """`n_shards` tars of ~shard_mb of RGB JPEGs (q90): a pool of distinct smooth random images, repeated under
    distinct keys (decoding cost is per image, whatever its content repeats)."""
    import webdataset as wds

    from sslscale.data.decode import encode_image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(pool):
        coarse = rng.integers(0, 256, (side // 16 + 2, side // 16 + 2, 3)).astype(np.float32)
        idx = np.linspace(0, coarse.shape[0] - 1.001, side)
        i0, f = idx.astype(int), (idx - idx.astype(int))
        rows = coarse[i0] * (1 - f)[:, None, None] + coarse[i0 + 1] * f[:, None, None]
        img = rows[:, i0] * (1 - f)[None, :, None] + rows[:, i0 + 1] * f[None, :, None]
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        images.append(encode_image(img.transpose(2, 0, 1), "jpg", 90))
    out.mkdir(parents=True)
    paths, key = [], 0
    for s in range(n_shards):
        path = out / f"jpeg{side}-{s:06d}.tar"
        with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
            size = 0
            while size < shard_mb * (1 << 20):
                data = images[key % pool]
                w.write({"__key__": f"{key:09d}", "jpg": data, "cls": str(key % 10).encode()})
                size += len(data) + 2048
                key += 1
        paths.append(str(path))
    return paths


def _decode_rows(shard_dir: Path, jpeg_dirs: dict[int, list[str]], n: int = 2000) -> list[dict]:
    import tarfile

    from sslscale.data.decode import _jpeg_array, _pil_array, load_npy

    rows = []
    tar = sorted(shard_dir.glob("*.tar"))[0]
    with tarfile.open(tar) as tf:
        payloads = [tf.extractfile(m).read() for m in tf if m.name.endswith(".npy")]
    payloads = (payloads * (n // len(payloads) + 1))[:n]
    for name, fn in (("npy fast path", load_npy), ("np.load", lambda b: np.load(io.BytesIO(b)))):
        t0 = time.perf_counter()
        for p in payloads:
            fn(p)
        rows.append(
            {
                "case": f"decode 1x28x28 ({name})",
                "impl": "-",
                "workers": "-",
                "rate": n / (time.perf_counter() - t0),
                "unit": "images/s",
            }
        )
    for side, paths in jpeg_dirs.items():
        with tarfile.open(paths[0]) as tf:
            jpegs = []
            for m in tf:
                if m.name.endswith(".jpg"):
                    jpegs.append(tf.extractfile(m).read())
                if len(jpegs) == 400:
                    break
        count = 300 if side > 100 else 1500
        data = (jpegs * (count // len(jpegs) + 1))[:count]
        for name, fn in (("simplejpeg", lambda b: _jpeg_array(b, 3)), ("Pillow", lambda b: _pil_array(b, 3))):
            t0 = time.perf_counter()
            for b in data:
                fn(b)
            rows.append(
                {
                    "case": f"decode {side}px RGB JPEG",
                    "impl": name,
                    "workers": "-",
                    "rate": count / (time.perf_counter() - t0),
                    "unit": "images/s",
                }
            )
    return rows


def run(args: argparse.Namespace) -> int:
    from sslscale.data import StreamSpec
    from sslscale.data.shards import write_shards

    common._pin_malloc()  # freed large blocks go back to the OS: peaks are not hidden by reuse of an earlier case's heap
    workers = [int(w) for w in args.workers.split(",")]
    batches = args.batches or (12 if args.quick else 40)
    warmup = args.warmup or (2 if args.quick else 4)
    shard_mb = args.shard_mb or (16.0 if args.quick else 256.0)
    jpeg_batches = max(batches // 4, 2)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        peak = row.get("peak_mib_per_worker")
        print(
            f"  {row['case']:34s} {row['impl']:10s} workers={row['workers']}: {row['rate']:,.0f} {row['unit']}"
            + (f", peak {peak:,.0f} MiB/worker" if peak is not None else ""),
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="sslscale-bench-data-") as tmp:
        tmp = Path(tmp)
        print("writing shards ...", flush=True)
        write_shards("fashion-mnist", "train", tmp / "fm", per_shard=1000, limit=8000 if args.quick else 20000)
        jpeg_dirs = {}
        if "jpeg" not in skip:
            for size, side in JPEG_CASES:
                jpeg_dirs[side] = _write_jpeg_shards(tmp / f"jpeg{side}", side, shard_mb)
        for r in _decode_rows(tmp / "fm", jpeg_dirs):
            add(r)
        jpeg_cases = [
            (f"two-view JPEG {side}->{size}px", size, side, "simclr", jpeg_batches) for size, side in JPEG_CASES
        ]
        jpeg_cases.append(
            (f"decode+batch JPEG {JPEG_CASES[-1][1]}px", None, JPEG_CASES[-1][1], "labeled", 4 * jpeg_batches)
        )  # the data path alone: read, decode, batch; no augmentation
        for name, size, side, pipeline, n in jpeg_cases if "jpeg" not in skip else ():
            urls = jpeg_dirs[side]
            mb = Path(urls[0]).stat().st_size / (1 << 20)
            key = "view1" if size is not None else "image"
            for w in workers:
                spec = StreamSpec(
                    shards=urls,
                    pipeline=pipeline,
                    batch_size=args.jpeg_batch_size,
                    num_workers=w,
                    mode="resampled",
                    seed=0,
                    image_size=size,
                    channels=3,
                )
                runs: dict[str, list[dict]] = {"sslscale": [], "webdataset": []}
                # ABBA: the shared machine's speed drifts within minutes; each side is measured twice
                for impl in ("sslscale", "webdataset", "webdataset", "sslscale"):
                    if impl == "webdataset" and "wds" in skip:
                        continue
                    runs[impl].append(
                        _stream_case(spec, warmup, n, lambda b, k=key: b[k].shape[0])
                        if impl == "sslscale"
                        else _wds_case(urls, w, args.jpeg_batch_size, size, warmup, n)
                    )
                for impl, results in runs.items():
                    if results:
                        add(
                            {
                                "case": name,
                                "impl": impl,
                                "workers": w,
                                "unit": "samples/s",
                                "shard_mb": mb,
                                "rate": sum(r["rate"] for r in results) / len(results),
                                "rates": [r["rate"] for r in results],
                                "first_batch_s": max(r["first_batch_s"] for r in results),
                                "peak_mib_per_worker": max((r["peak_mib_per_worker"] or 0) for r in results),
                            }
                        )
        if "fmnist" not in skip:
            for label, extra in (
                ("two-view fashion-mnist", {}),
                ("two-view fashion-mnist streamed", {"in_memory_mb": 0}),
            ):
                for w in workers:
                    spec = StreamSpec(
                        shards=str(tmp / "fm"),
                        pipeline="simclr",
                        batch_size=args.batch_size,
                        num_workers=w,
                        mode="resampled",
                        seed=0,
                        **extra,
                    )
                    add(
                        {
                            "case": label,
                            "impl": "sslscale",
                            "workers": w,
                            "unit": "samples/s",
                            **_stream_case(spec, warmup, batches, lambda b: b["view1"].shape[0]),
                        }
                    )
        if "text" not in skip:
            write_shards(
                "bbc-news", "train", tmp / "bbc", per_shard=100, limit=400 if args.quick else None, vocab_size=8000
            )
            cases = [
                ("mlm bbc-news", dict(pipeline="mlm"), "tokens/s", lambda b: int(b["attention_mask"].sum())),
                ("clm bbc-news", dict(pipeline="clm"), "tokens/s", lambda b: b["input_ids"].numel()),
            ]
            for name, kw, unit, count in cases:
                for w in workers:
                    spec = StreamSpec(
                        shards=str(tmp / "bbc"),
                        **kw,
                        seq_len=args.seq_len,
                        batch_size=args.batch_size,
                        num_workers=w,
                        mode="resampled",
                        seed=0,
                    )
                    add(
                        {
                            "case": name,
                            "impl": "sslscale",
                            "workers": w,
                            "unit": unit,
                            **_stream_case(spec, warmup, batches, count),
                        }
                    )
    common.print_table(rows, ["case", "impl", "workers", "rate", "unit", "first_batch_s", "peak_mib_per_worker"])
    two_view = [r["rate"] for r in rows if r["case"] == "two-view fashion-mnist"]
    target = 2000.0
    if two_view:
        print(f"best two-view Fashion-MNIST rate {max(two_view):,.0f} samples/s (target >= {target:,.0f})")
    for name in dict.fromkeys(r["case"] for r in rows if "JPEG" in r["case"] and r["impl"] != "-"):
        for w in workers:
            pair = {r["impl"]: r["rate"] for r in rows if r["case"] == name and r["workers"] == w}
            if len(pair) == 2:
                print(f"{name}, {w} workers: sslscale / webdataset = {pair['sslscale'] / pair['webdataset']:.2f}x")
    common.write_json(
        args.out,
        "data",
        {
            "batch_size": args.batch_size,
            "jpeg_batch_size": args.jpeg_batch_size,
            "seq_len": args.seq_len,
            "timed_batches": batches,
            "jpeg_timed_batches": jpeg_batches,
            "shard_mb": shard_mb,
            "rows": rows,
            "two_view_target": target,
        },
    )
    return 0
