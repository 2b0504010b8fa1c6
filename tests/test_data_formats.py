"""Real-world webdataset data: shards written by webdataset's own ShardWriter (PAX headers) in img2dataset layouts,
JPEG/PNG/WebP, grey and RGB, mixed sizes, read through local paths, pipe:cat, file:// and a local http.server;
streaming reads, exact resume over URLs in a new process, corrupt JPEGs, `--index`, image folders, captions."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sslscale.cli import main as cli_main
from sslscale.data import CorruptDataError, StreamSpec, build_stream, read_all
from sslscale.data import text as T
from sslscale.data.stream import _Plan

from .data_helpers import HttpServer, shards, smooth_image, writer_shards

REPO = Path(__file__).resolve().parents[1]
SIZES = ((20, 24), (32, 28), (24, 24))
N_SHARDS, PER_SHARD = 8, 6


@pytest.fixture(scope="module")
def jpg(tmp_path_factory) -> Path:
    """8 ShardWriter shards x 6 RGB JPEGs ({key}.jpg + {key}.cls, class = sample index), three sizes, every 5th
    image grey."""
    return writer_shards(
        tmp_path_factory.mktemp("jpg"), n_shards=N_SHARDS, per_shard=PER_SHARD, sizes=SIZES, grey_every=5
    )


@pytest.fixture(scope="module")
def server(jpg):
    srv = HttpServer(jpg)
    yield srv
    srv.close()


def _forms(jpg: Path, server: HttpServer) -> dict[str, object]:
    last = N_SHARDS - 1
    return {
        "path": str(jpg),
        "pipe": f"pipe:cat {jpg}/shard-{{000000..{last:06d}}}.tar",
        "file": [f"file://{jpg}/shard-{i:06d}.tar" for i in range(N_SHARDS)],
        "http": f"{server.url}/shard-{{000000..{last:06d}}}.tar",
    }


@pytest.mark.parametrize("form", ["path", "pipe", "file", "http"])
def test_writer_shards_every_sample_once_over_2_ranks_x_2_workers(jpg, server, form):
    """Header counting (no manifest) gives epoch mode; 2 ranks x 2 workers: http with real DataLoader workers,
    the other forms as 4 in-process readers (the same slot layout). Every label exactly once per epoch."""
    shards_ = _forms(jpg, server)[form]
    layout = [(2, 2)] if form == "http" else [(4, 0)]
    for world, workers in layout:
        seen: Counter = Counter()
        lengths = set()
        for rank in range(world):
            stream = build_stream(
                StreamSpec(
                    shards=shards_,
                    pipeline="labeled",
                    batch_size=4,
                    num_workers=workers,
                    image_size=16,
                    channels=3,
                    seed=3,
                ),
                rank=rank,
                world_size=world,
            )
            batches = list(stream)
            lengths.add(len(batches))
            for b in batches:
                assert b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.float32
                seen.update(b["label"].tolist())
            assert stream.stats["skipped_total"] == 0
        assert len(lengths) == 1
        assert seen == Counter(range(N_SHARDS * PER_SHARD)), f"{form}: not every sample once"


def test_channels_and_sizes_from_the_first_image_and_conversions(jpg):
    plan = _Plan(StreamSpec(shards=str(jpg), pipeline="labeled", batch_size=4, num_workers=0, image_size=16), 0, 1)
    assert plan.ctx.channels == 1, "sample 0 is grey: channels None follows the first image"
    batch = next(
        iter(
            build_stream(
                StreamSpec(
                    shards=str(jpg),
                    pipeline="simclr",
                    batch_size=6,
                    num_workers=0,
                    image_size=12,
                    channels=3,
                    shuffle=False,
                )
            )
        )
    )
    assert batch["view1"].shape == (6, 3, 12, 12) and batch["label"].tolist() == list(range(6))
    plain = next(
        iter(
            build_stream(
                StreamSpec(
                    shards=str(jpg),
                    pipeline="labeled",
                    batch_size=6,
                    num_workers=0,
                    image_size=12,
                    channels=3,
                    shuffle=False,
                )
            )
        )
    )["image"]
    assert torch.equal(plain[0, 0], plain[0, 1]) and torch.equal(plain[0, 0], plain[0, 2]), "grey -> RGB repeats"
    assert not torch.equal(plain[1, 0], plain[1, 1]), "RGB stays RGB"
    grey = next(
        iter(
            build_stream(
                StreamSpec(
                    shards=str(jpg),
                    pipeline="labeled",
                    batch_size=6,
                    num_workers=0,
                    image_size=12,
                    channels=1,
                    shuffle=False,
                )
            )
        )
    )["image"]
    luma = 0.299 * plain[1, 0] + 0.587 * plain[1, 1] + 0.114 * plain[1, 2]
    assert grey.shape == (6, 1, 12, 12) and (grey[1, 0] - luma).abs().max() < 0.02, "RGB -> luma"
    with pytest.raises(
        CorruptDataError, match=r"bad_image .* differs from the stream's \(3, 20, 24\) \(set image_size"
    ):
        list(
            build_stream(
                StreamSpec(
                    shards=str(jpg),
                    pipeline="labeled",
                    batch_size=6,
                    num_workers=0,
                    channels=3,
                    corrupt="fail",
                    shuffle=False,
                )
            )
        )


def test_streamed_and_in_memory_reads_hold_the_same_samples_and_resume_exactly(jpg):
    """in_memory_mb=0 streams every shard through a seeded shuffle buffer: same samples per epoch as the in-memory
    permutation, a different order; a state taken mid-shard resumes to the same batches."""
    base = dict(shards=str(jpg), pipeline="labeled", batch_size=4, num_workers=0, image_size=16, channels=3, seed=1)
    streamed = StreamSpec(**base, in_memory_mb=0, shuffle_buffer=4)
    labels = {
        name: sorted(int(y) for b in build_stream(spec) for y in b["label"])
        for name, spec in (("memory", StreamSpec(**base)), ("stream", streamed))
    }
    assert labels["memory"] == labels["stream"] == list(range(N_SHARDS * PER_SHARD))
    reference = list(build_stream(streamed))
    stream = build_stream(streamed)
    it = iter(stream)
    for _ in range(5):  # 20 samples: inside the 4th shard
        next(it)
    state = stream.state_dict()
    assert state["worker_states"]["0"]["offset"] not in (0, PER_SHARD), "the test should resume inside a shard"
    resumed = build_stream(streamed)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - 5
    for a, b in zip(reference[5:], rest):
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["image"], b["image"])


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


def test_resume_over_http_in_new_process_is_exact(jpg, server, tmp_path):
    """http URLs (streamed: no manifest, size unknown), two-view RGB augmentation, 2 workers, crossing an epoch."""
    spec = dict(
        shards=_forms(jpg, server)["http"],
        pipeline="simclr",
        batch_size=4,
        num_workers=2,
        image_size=16,
        channels=3,
        seed=11,
        shuffle_buffer=3,
    )
    rank, n_first, n_next = 1, 4, 4
    reference = []
    stream = build_stream(StreamSpec(**spec), rank=rank, world_size=2)
    while len(reference) < n_first + n_next:
        reference.extend(stream)
    stream = build_stream(StreamSpec(**spec), rank=rank, world_size=2)
    it = iter(stream)
    for _ in range(n_first):
        next(it)
    it.close()
    torch.save(stream.state_dict(), tmp_path / "state.pt")
    args = dict(
        spec=spec, rank=rank, world_size=2, n=n_next, state=str(tmp_path / "state.pt"), out=str(tmp_path / "resumed.pt")
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", RESUME_CHILD, json.dumps(args)], check=True, env=env, timeout=300)
    resumed = torch.load(tmp_path / "resumed.pt")
    for i, (a, b) in enumerate(zip(reference[n_first:], resumed)):
        for key in ("view1", "view2", "label"):
            assert torch.equal(a[key], b[key]), f"batch {n_first + i} {key} differs after resume"


def test_caption_layout_json_labels_and_image_text_pipeline(tmp_path):
    """img2dataset's {key}.jpg + {key}.txt + {key}.json: labels from json, captions tokenised with [CLS] ... [EOS]."""
    out = writer_shards(tmp_path / "cap", n_shards=2, per_shard=5, layout="caption", sizes=((20, 20), (26, 22)))
    captions = [f"a picture number {i}" for i in range(10)]
    T.train_tokenizer(captions * 3, out / "tokenizer.json", vocab_size=200)
    spec = StreamSpec(
        shards=str(out),
        pipeline="image_text",
        batch_size=5,
        num_workers=0,
        image_size=16,
        tokenizer=str(out / "tokenizer.json"),
        seq_len=48,
        shuffle=False,
    )
    tok = T.load_tokenizer(out / "tokenizer.json")
    seen = []
    for batch in build_stream(spec):
        assert set(batch) == {"image", "input_ids", "attention_mask", "label"}
        assert batch["image"].shape == (5, 3, 16, 16)
        for row, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["label"]):
            n = int(mask.sum())
            assert row[0] == T.CLS_ID and row[n - 1] == T.EOS_ID and (row[n:] == T.PAD_ID).all()
            assert tok.decode(row[1 : n - 1].tolist()).strip() == captions[int(label)]
            seen.append(int(label))
    assert sorted(seen) == list(range(10))


def test_unlabeled_layout_feeds_ssl_pipelines_not_labeled(tmp_path):
    out = writer_shards(tmp_path / "nolabel", n_shards=2, per_shard=4, layout="none")
    batch = next(
        iter(build_stream(StreamSpec(shards=str(out), pipeline="simclr", batch_size=4, num_workers=0, channels=3)))
    )
    assert batch["view1"].shape == (4, 3, 24, 24) and (batch["label"] == -1).all()
    with pytest.raises(CorruptDataError, match=r"has no label \(cls;json\); it has \['jpg'\]"):
        list(build_stream(StreamSpec(shards=str(out), pipeline="labeled", batch_size=4, num_workers=0, corrupt="fail")))


def test_corrupt_jpegs_skipped_and_counted(tmp_path):
    import webdataset as wds

    out = tmp_path / "badjpg"
    out.mkdir()
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(out / "s-%06d.tar"), maxcount=6, verbose=0) as w:
        for i in range(12):
            good = i % 4 != 1
            w.write(
                {
                    "__key__": f"{i:06d}",
                    "jpg": smooth_image(rng, 16, 16) if good else b"\xff\xd8\xff not a jpeg",
                    "cls": i,
                }
            )
    spec = StreamSpec(shards=str(out), pipeline="labeled", batch_size=3, num_workers=0, channels=3)
    labels = [int(y) for b in read_all(spec) for y in b["label"]]
    assert labels == [i for i in range(12) if i % 4 != 1], "every decodable sample, in order"
    stream = build_stream(spec)
    assert len(list(stream)) == 4, "the epoch is refilled to its planned length"
    assert stream.stats["skipped"] == {"decode_error": 3} and stream.stats["refill_shards"] >= 1
    with pytest.raises(CorruptDataError, match=r"decode_error in .*s-000000.tar: sample '000001'"):
        list(
            build_stream(
                StreamSpec(
                    shards=str(out),
                    pipeline="labeled",
                    batch_size=3,
                    num_workers=0,
                    channels=3,
                    corrupt="fail",
                    shuffle=False,
                )
            )
        )


def test_index_writes_a_manifest_for_existing_shards(jpg, tmp_path):
    import hashlib
    import shutil

    copy = tmp_path / "indexed"
    shutil.copytree(jpg, copy)
    assert cli_main(["shards", "--index", str(copy)]) == 0
    manifest = json.loads((copy / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [PER_SHARD] * N_SHARDS
    assert manifest["fields"] == {"jpg": 48, "cls": 48} and manifest["kind"] == "image"
    for s in manifest["shards"]:
        data = (copy / s["name"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)
    assert cli_main(["shards", "--index", str(copy)]) == 2, "an existing manifest needs --force"
    plan = _Plan(StreamSpec(shards=str(copy), pipeline="labeled", batch_size=4, num_workers=0, image_size=16), 0, 1)
    assert all(plan.in_memory) and all(s.sha256 for s in plan.shards), "indexed shards are verified in memory"


def test_imagefolder_keeps_channels_sizes_and_bytes(tmp_path):
    """RGB stays RGB (PNG, JPEG, WebP, .npy), grey stays grey, sizes may differ; `auto` stores the files' own
    bytes, `png` re-encodes losslessly; the stream reads them back."""
    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path / "folder"
    expected = {}
    for cls, (ext, size) in {
        "a": ("png", (18, 22)),
        "b": ("jpg", (30, 20)),
        "c": ("webp", (16, 16)),
        "d": ("npy", (12, 14)),
    }.items():
        (root / "train" / cls).mkdir(parents=True)
        for i in range(3):
            img = smooth_image(rng, *size)
            if cls == "a" and i == 0:
                img = img[..., 0]  # one grey PNG
            path = root / "train" / cls / f"{i}.{ext}"
            if ext == "npy":
                np.save(path, img.transpose(2, 0, 1))
            else:
                Image.fromarray(img).save(
                    path, **({"quality": 95} if ext == "jpg" else {"lossless": True} if ext == "webp" else {})
                )
            expected[(cls, i)] = (path, img)
    for fmt in ("auto", "png"):
        out = tmp_path / f"shards-{fmt}"
        assert (
            cli_main(
                [
                    "shards",
                    "--source",
                    f"imagefolder:{root}",
                    "--split",
                    "train",
                    "--out",
                    str(out),
                    "--per-shard",
                    "4",
                    "--image-format",
                    fmt,
                ]
            )
            == 0
        )
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["channels"] == 3 and "image_shape" not in manifest, "mixed sizes and channels"
        from .data_helpers import tar_samples

        stored = [f for tar in sorted(out.glob("*.tar")) for f in tar_samples(tar).values()]
        assert len(stored) == 12
        if fmt == "auto":
            originals = {p.read_bytes() for p, _ in expected.values() if p.suffix != ".npy"}
            assert sum(f.get("jpg", f.get("png", f.get("webp"))) in originals for f in stored) == 9
        else:
            assert all(set(f) == {"cls", "png"} for f in stored)
            decoded = {np.asarray(Image.open(io.BytesIO(f["png"]))).tobytes() for f in stored}
            for (cls, i), (path, img) in expected.items():
                if cls in ("a", "c", "d"):  # lossless sources round-trip exactly, channels kept
                    assert img.tobytes() in decoded, (cls, i)
        batch = next(iter(read_all(StreamSpec(shards=str(out), pipeline="labeled", batch_size=12, image_size=10))))
        assert batch["image"].shape == (12, 3, 10, 10), "RGB stays RGB through the stream"


def test_fashion_mnist_captions_source(tmp_path_factory):
    from sslscale.data.captions import NOUNS, TONES, tone
    from sslscale.data.sources import load_source

    data = load_source("fashion-mnist-captions", "test")
    again = load_source("fashion-mnist-captions", "test")
    assert data.kind == "image-text" and data.texts[:50] == again.texts[:50], "deterministic"
    assert len({t.split(" ")[0] for t in data.texts[:200]}) >= 5, "several templates"
    import re

    for i in range(200):
        text, label = data.texts[i], int(data.labels[i])
        assert any(noun in text for noun in NOUNS[label]), text
        words = re.findall(r"[a-z-]+", text)
        if "black-and-white" not in text:  # the one template without a tone word
            assert any(w in words for w in TONES[tone(data.images[i])]), text
    out = shards(tmp_path_factory, "fashion-mnist-captions", "test", per_shard=20, limit=40, vocab_size=300)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "image-text" and manifest["tokenizer"] == "tokenizer.json"
    batch = next(
        iter(build_stream(StreamSpec(shards=str(out), pipeline="image_text", batch_size=8, num_workers=0, seq_len=24)))
    )
    assert batch["image"].shape == (8, 1, 28, 28) and batch["input_ids"].shape == (8, 24)


def test_tokenizer_loads_in_transformers_with_special_tokens(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    out = shards(tmp_path_factory, "fashion-mnist-captions", "test", per_shard=20, limit=40, vocab_size=300)
    ours = T.load_tokenizer(out / "tokenizer.json")
    for hf in (
        transformers.PreTrainedTokenizerFast.from_pretrained(str(out)),
        transformers.AutoTokenizer.from_pretrained(str(out)),
    ):
        ids = {
            name: hf.convert_tokens_to_ids(getattr(hf, f"{name}_token"))
            for name in ("pad", "cls", "sep", "mask", "eos", "unk")
        }
        assert ids == {
            "pad": T.PAD_ID,
            "cls": T.CLS_ID,
            "sep": T.SEP_ID,
            "mask": T.MASK_ID,
            "eos": T.EOS_ID,
            "unk": T.UNK_ID,
        }
        assert hf.pad_token_id == 0 and hf.mask_token_id == 3 and len(hf) == ours.get_vocab_size()
        text = "a photo of a dark warm coat."
        assert hf(text)["input_ids"] == ours.encode(text).ids
    direct = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert direct.convert_tokens_to_ids("[MASK]") == T.MASK_ID
