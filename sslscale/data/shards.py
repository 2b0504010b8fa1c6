"""`sslscale shards`: write one split of a source as webdataset tar shards plus `manifest.json`.

Samples are shuffled with `--seed` before sharding (sources are often sorted by class), so every shard mixes
classes; the output is byte-for-byte deterministic given the source, split, seed, limit and shard size (tar
mtimes are fixed). Each sample holds `cls` (class index as ascii) and either `npy` (the uint8 image, (1, H, W),
in .npy format: decodes in a few microseconds, no image library needed) or `txt` (utf-8).

Crash safety: shards are written as `.tmp-<name>` and renamed when complete; `manifest.json` (counts, bytes,
sha256 per shard) is written last through a temporary file and an atomic rename, so a directory without a
manifest is never mistaken for a finished one. Text sources also get `tokenizer.json` (a byte-level BPE trained on
this split, or the one given by `--tokenizer`) and per-shard token counts, which the CLM stream needs to give
every rank the same number of batches.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from sslscale.data.sources import SOURCES, SourceData, load_source

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help=f"one of: {', '.join(SOURCES)}")
    parser.add_argument("--split", required=True, choices=["train", "test"])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--per-shard", type=int, required=True, help="samples per shard")
    parser.add_argument("--limit", type=int, default=None, help="keep only N samples (a seeded random subset)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    parser.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    parser.add_argument("--tokenizer", default=None, help="text sources: reuse this tokenizer.json "
                        "(e.g. the train split's for the test split) instead of training one")
    parser.add_argument("--vocab-size", type=int, default=8000, help="text sources: BPE vocabulary size")


def run(args: argparse.Namespace) -> int:
    try:
        manifest = write_shards(args.source, args.split, args.out, args.per_shard, limit=args.limit,
                                seed=args.seed, force=args.force, tokenizer=args.tokenizer,
                                vocab_size=args.vocab_size)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"sslscale shards: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(manifest['shards'])} shards, {manifest['total']} samples to {args.out}")
    return 0


def _prefix(source: str, split: str) -> str:
    base = source.split(":", 1)[0] if ":" in source else source
    return f"{base}-{split}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _encode_npy(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
    return buf.getvalue()


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"--out {out} is not empty; pass --force to replace its contents")
        manifest = out / MANIFEST
        if manifest.exists():
            manifest.unlink()  # first, so a half-replaced directory never looks complete
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_shards(source: str, split: str, out: str | os.PathLike, per_shard: int, *, limit: int | None = None,
                 seed: int = 0, force: bool = False, tokenizer: str | None = None, vocab_size: int = 8000) -> dict:
    """Write the shards and the manifest; returns the manifest dict."""
    import webdataset as wds

    if per_shard < 1:
        raise ValueError(f"--per-shard must be >= 1, got {per_shard}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"--tokenizer {tokenizer} is not a file")
    out = Path(out)
    data = load_source(source, split)  # fail on a missing source before touching --out
    _prepare_out(out, force)

    order = np.random.default_rng(seed).permutation(len(data))
    if limit is not None:
        order = order[:limit]
    token_counts = None
    if data.kind == "text":
        token_counts = _prepare_tokenizer(data, order, out, tokenizer, vocab_size)

    prefix = _prefix(source, split)
    written: list[str] = []

    def finish(tmp_name: str) -> None:
        tmp = Path(tmp_name)
        final = tmp.with_name(tmp.name[len(".tmp-"):])
        tmp.replace(final)
        written.append(final.name)

    samples = [_sample(data, int(i), n) for n, i in enumerate(order)]
    with wds.ShardWriter(str(out / f".tmp-{prefix}-%06d.tar"), maxcount=per_shard, maxsize=float("inf"),
                         post=finish, verbose=0, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)

    shards = []
    for k, name in enumerate(written):
        path = out / name
        count = min(per_shard, len(order) - k * per_shard)
        entry = {"name": name, "count": count, "bytes": path.stat().st_size, "sha256": _sha256(path)}
        if token_counts is not None:
            entry["tokens"] = int(token_counts[k * per_shard:(k + 1) * per_shard].sum())
        shards.append(entry)
    manifest = {"source": source, "split": split, "total": int(len(order)), "labels": data.label_names,
                "kind": data.kind, "seed": seed, "shards": shards}
    if token_counts is not None:
        manifest["tokenizer"] = TOKENIZER
        manifest["tokenizer_sha256"] = _sha256(out / TOKENIZER)
    tmp = out / f".tmp-{MANIFEST}"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    return manifest


def _sample(data: SourceData, index: int, position: int) -> dict:
    sample = {"__key__": f"{position:08d}", "cls": str(int(data.labels[index])).encode()}
    if data.kind == "image":
        sample["npy"] = _encode_npy(data.images[index])
    else:
        sample["txt"] = data.texts[index].encode("utf-8")
    return sample


def _prepare_tokenizer(data: SourceData, order: np.ndarray, out: Path, tokenizer: str | None,
                       vocab_size: int) -> np.ndarray:
    """Train (or copy) the tokenizer into `out`; return tokens per sample in shard order (ids + one EOS)."""
    from sslscale.data.text import load_tokenizer, train_tokenizer

    texts = [data.texts[i] for i in order]
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER)
        tok = load_tokenizer(out / TOKENIZER)
    else:
        if data.split != "train":
            print(f"note: training a tokenizer on the {data.split} split; pass --tokenizer TRAIN_DIR/{TOKENIZER} "
                  "to share the train split's vocabulary", file=sys.stderr)
        tok = train_tokenizer(texts, out / TOKENIZER, vocab_size=vocab_size)
    return np.array([len(e.ids) + 1 for e in tok.encode_batch(texts)], dtype=np.int64)


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path} (was `sslscale shards` interrupted?)")
    return json.loads(path.read_text())
