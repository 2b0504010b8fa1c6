"""`sslscale shards`: write one split of a source as webdataset tar shards plus `manifest.json`, or write a
manifest for existing shards (`--index`).

Samples are shuffled with `--seed` before sharding (sources are often sorted by class), so every shard mixes
classes; the output is byte-for-byte deterministic given the source, split, seed, limit and shard size (tar
mtimes are fixed). Each sample holds `cls` (class index as ascii), and an image and / or `txt` (utf-8). Images
are stored per `--image-format`: `npy` (uint8 (C, H, W); decodes in microseconds), `jpg` (re-encoded at
`--jpeg-quality`), `png`, `webp`, or `auto` (default): `.npy` for the array sources, and an image folder's files
as they are (a JPEG stays the same JPEG bytes; `.npy` files become `npy`).

Crash safety: shards are written as `.tmp-<name>` and renamed when complete; `manifest.json` (counts, bytes,
sha256 per shard, channels and image shape when uniform) is written last through a temporary file and an
atomic rename, so a directory without a manifest is never mistaken for a finished one. Text and image-text
sources also get `tokenizer.json` (a byte-level BPE trained on this split, or the one given by `--tokenizer`)
with the Hugging Face config files declaring its special tokens, and text sources per-shard token counts, which
the CLM stream needs to give every rank the same number of batches.

`--index DIR_OR_PATTERN` reads existing shards (written by webdataset's ShardWriter, img2dataset, ...) once,
without rewriting them, and writes `manifest.json` beside them: sample counts from the tar headers, bytes,
sha256, the fields found, and with `--tokenizer` the token counts of their `txt` fields.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from sslscale.data import decode as dec
from sslscale.data.shardlist import MANIFEST, confine, read_manifest  # noqa: F401  (read_manifest re-exported)
from sslscale.data.sources import SOURCES, ImageFiles, SourceData, load_source

TOKENIZER = "tokenizer.json"
IMAGE_FORMATS = ("auto", "npy", "jpg", "png", "webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help=f"one of: {', '.join(SOURCES)}")
    parser.add_argument("--split", choices=["train", "test"])
    parser.add_argument(
        "--out", help="output directory (with --index: where manifest.json goes, default the shards' directory)"
    )
    parser.add_argument("--per-shard", type=int, help="samples per shard")
    parser.add_argument("--limit", type=int, default=None, help="keep only N samples (a seeded random subset)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace the contents of a non-empty --out (with --index: replace an existing manifest.json)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="text sources: reuse this tokenizer.json (e.g. the "
        "train split's for the test split) instead of training one; --index: count tokens with it",
    )
    parser.add_argument("--vocab-size", type=int, default=8000, help="text sources: BPE vocabulary size")
    parser.add_argument(
        "--image-format",
        default="auto",
        choices=IMAGE_FORMATS,
        help="how images are stored (auto: .npy for array sources, image files unchanged)",
    )
    parser.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEG / WebP (1-100)")
    parser.add_argument(
        "--index",
        default=None,
        metavar="DIR_OR_PATTERN",
        help="write a manifest for existing shards (a directory of *.tar, or paths / a brace "
        "pattern) instead of writing shards",
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.index is not None:
            manifest = index_shards(args.index, out=args.out, force=args.force, tokenizer=args.tokenizer)
            print(
                f"indexed {len(manifest['shards'])} shards, {manifest['total']} samples "
                f"(fields {manifest['fields']}) -> {manifest['_path']}"
            )
            return 0
        missing = [
            f"--{k.replace('_', '-')}" for k in ("source", "split", "out", "per_shard") if getattr(args, k) is None
        ]
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (or pass --index DIR to index existing shards)")
        manifest = write_shards(
            args.source,
            args.split,
            args.out,
            args.per_shard,
            limit=args.limit,
            seed=args.seed,
            force=args.force,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            image_format=args.image_format,
            jpeg_quality=args.jpeg_quality,
        )
    except (FileExistsError, FileNotFoundError, ValueError, OSError) as e:
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


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


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


class _ImageFormat:
    """Encodes a source's images and keeps what the manifest says about them (channels, shape if uniform)."""

    def __init__(self, data: SourceData, fmt: str, quality: int):
        if fmt not in IMAGE_FORMATS:
            raise ValueError(f"--image-format must be one of {IMAGE_FORMATS}, got {fmt!r}")
        if not 1 <= quality <= 100:
            raise ValueError(f"--jpeg-quality must be in 1..100, got {quality}")
        self.images, self.fmt, self.quality = data.images, fmt, quality
        self.channels: set[int] = set()
        self.shapes: set[tuple[int, ...]] = set()
        self.formats: Counter = Counter()

    def encode(self, index: int) -> tuple[str, bytes]:
        image = self.images[index]  # decoded (checks every file, and tells channels / size)
        self.channels.add(int(image.shape[0]))
        self.shapes.add(tuple(int(d) for d in image.shape))
        if self.fmt == "auto" and isinstance(self.images, ImageFiles):
            ext, raw = self.images.encoded(index)
            if ext != "npy":
                self.formats[ext] += 1
                return ext, raw
        fmt = "npy" if self.fmt == "auto" else self.fmt
        self.formats[fmt] += 1
        return fmt, dec.encode_image(np.asarray(image), fmt, self.quality)

    def manifest_fields(self) -> dict:
        out: dict = {"image_format": dict(self.formats)}
        if self.channels:
            out["channels"] = max(self.channels)
        if len(self.shapes) == 1:
            out["image_shape"] = list(next(iter(self.shapes)))
        return out


def write_shards(
    source: str,
    split: str,
    out: str | os.PathLike,
    per_shard: int,
    *,
    limit: int | None = None,
    seed: int = 0,
    force: bool = False,
    tokenizer: str | None = None,
    vocab_size: int = 8000,
    image_format: str = "auto",
    jpeg_quality: int = 95,
) -> dict:
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
    images = _ImageFormat(data, image_format, jpeg_quality) if data.images is not None else None
    _prepare_out(out, force)

    order = np.random.default_rng(seed).permutation(len(data))
    if limit is not None:
        order = order[:limit]
    token_counts = None
    if data.texts is not None:
        counts = _prepare_tokenizer(data, order, out, tokenizer, vocab_size)
        token_counts = counts if data.kind == "text" else None

    prefix = _prefix(source, split)
    written: list[str] = []

    def finish(tmp_name: str) -> None:
        tmp = Path(tmp_name)
        final = tmp.with_name(tmp.name[len(".tmp-") :])
        tmp.replace(final)
        written.append(final.name)

    with wds.ShardWriter(
        str(out / f".tmp-{prefix}-%06d.tar"),
        maxcount=per_shard,
        maxsize=float("inf"),
        post=finish,
        verbose=0,
        encoder=False,
        mtime=0,
    ) as writer:
        for n, i in enumerate(order):
            writer.write(_sample(data, images, int(i), n))

    shards = []
    for k, name in enumerate(written):
        path = out / name
        count = min(per_shard, len(order) - k * per_shard)
        entry = {"name": name, "count": count, "bytes": path.stat().st_size, "sha256": _sha256(path)}
        if token_counts is not None:
            entry["tokens"] = int(token_counts[k * per_shard : (k + 1) * per_shard].sum())
        shards.append(entry)
    manifest = {
        "source": source,
        "split": split,
        "total": len(order),
        "labels": data.label_names,
        "kind": data.kind,
        "seed": seed,
        "shards": shards,
    }
    if images is not None:
        manifest.update(images.manifest_fields())
    if data.texts is not None:
        manifest["tokenizer"] = TOKENIZER
        manifest["tokenizer_sha256"] = _sha256(out / TOKENIZER)
    _write_json(out / MANIFEST, manifest)
    return manifest


def _sample(data: SourceData, images: _ImageFormat | None, index: int, position: int) -> dict:
    sample = {"__key__": f"{position:08d}", "cls": str(int(data.labels[index])).encode()}
    if images is not None:
        ext, raw = images.encode(index)
        sample[ext] = raw
    if data.texts is not None:
        sample["txt"] = data.texts[index].encode("utf-8")
    return sample


def _prepare_tokenizer(
    data: SourceData, order: np.ndarray, out: Path, tokenizer: str | None, vocab_size: int
) -> np.ndarray:
    """Train (or copy) the tokenizer into `out`; return tokens per sample in shard order (ids + one EOS)."""
    from sslscale.data.text import load_tokenizer, train_tokenizer, write_hf_config

    texts = [data.texts[i] for i in order]
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER)
        write_hf_config(out)
        tok = load_tokenizer(out / TOKENIZER)
    else:
        if data.split != "train":
            print(
                f"note: training a tokenizer on the {data.split} split; pass --tokenizer TRAIN_DIR/{TOKENIZER} "
                "to share the train split's vocabulary",
                file=sys.stderr,
            )
        tok = train_tokenizer(texts, out / TOKENIZER, vocab_size=vocab_size)
    return np.array([len(e.ids) + 1 for e in tok.encode_batch(texts)], dtype=np.int64)


# ------------------------------------------------------------------------------------------------- --index
def _index_paths(target: str) -> list[Path]:
    if os.path.isdir(target):
        paths = sorted(
            glob.glob(os.path.join(glob.escape(target), "*.tar"))
            + glob.glob(os.path.join(glob.escape(target), "*.tar.gz"))
        )
    else:
        import braceexpand

        paths = sorted({p for pattern in braceexpand.braceexpand(target) for p in (glob.glob(pattern) or [pattern])})
    if not paths:
        raise FileNotFoundError(f"--index {target}: no *.tar files found")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing and len(paths) == 1:
        raise FileNotFoundError(f"--index {target}: no such directory or shard file")
    if missing:
        raise FileNotFoundError(f"--index {target}: {len(missing)} shards do not exist, first {missing[0]!r}")
    return [Path(p) for p in paths]


def _index_one(path: Path, tokenizer) -> tuple[dict, Counter, list[str]]:
    """(manifest entry, extension counts, problems) of one shard: counts from its headers, then its sha256."""
    import gzip

    from sslscale.data.tar import StreamSource, TarReader, group_samples

    problems: list[str] = []
    with open(path, "rb", buffering=1 << 20) as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith((".gz", ".tgz")) else raw
        source = StreamSource(stream, seekable=stream is raw)  # headers only: seek over payloads
        reader = TarReader(
            source, 1 << 40, lambda kind, detail: problems.append(f"{kind}: {detail}"), headers_only=tokenizer is None
        )
        fields: Counter = Counter()
        count, tokens = 0, 0
        for sample in group_samples(iter(reader)):
            count += 1
            fields.update(k for k in sample if not k.startswith("__"))
            if tokenizer is not None and sample.get("txt") is not None:
                tokens += len(tokenizer.encode(sample["txt"].decode("utf-8", "replace")).ids) + 1
    entry = {"name": None, "count": count, "bytes": path.stat().st_size, "sha256": _sha256(path)}
    if tokenizer is not None:
        entry["tokens"] = tokens
    return entry, fields, problems


def index_shards(target: str, out: str | None = None, force: bool = False, tokenizer: str | None = None) -> dict:
    """Write `manifest.json` for existing shards (see the module docstring); returns it (with `_path`)."""
    from sslscale.data.text import load_tokenizer, write_hf_config

    paths = _index_paths(target)
    directory = Path(out) if out is not None else Path(os.path.commonpath([str(p.parent.resolve()) for p in paths]))
    if not directory.is_dir():
        raise FileNotFoundError(f"--out {directory} is not a directory")
    manifest_path = directory / MANIFEST
    if manifest_path.exists() and not force:
        raise FileExistsError(f"{manifest_path} exists; pass --force to replace it")
    tok = None
    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise FileNotFoundError(f"--tokenizer {tokenizer} is not a file")
        tok = load_tokenizer(tokenizer)
    shards, fields, total = [], Counter(), 0
    for path in paths:
        name = os.path.relpath(path.resolve(), directory.resolve())
        confine(name, f"--index (shard {path} is outside {directory})")
        entry, found, problems = _index_one(path, tok)
        entry["name"] = name
        for p in problems:
            print(f"warning: {path}: {p}", file=sys.stderr)
        shards.append(entry)
        fields.update(found)
        total += entry["count"]
    has_image = any(e in fields for e in dec.IMAGE_EXTS)
    kind = ("image-text" if "txt" in fields else "image") if has_image else "text"
    manifest = {
        "source": f"index:{target}",
        "split": None,
        "total": total,
        "labels": None,
        "kind": kind,
        "fields": dict(fields),
        "indexed": True,
        "shards": shards,
    }
    if tok is not None:
        dest = directory / TOKENIZER
        if Path(tokenizer).resolve() != dest.resolve():
            shutil.copyfile(tokenizer, dest)
        write_hf_config(directory)
        manifest["tokenizer"] = TOKENIZER
        manifest["tokenizer_sha256"] = _sha256(dest)
    _write_json(manifest_path, manifest)
    return {**manifest, "_path": str(manifest_path)}
