"""Data: raw sources -> webdataset shards (`sslscale shards`) -> seeded, sharded, exactly resumable batch streams.

    from sslscale.data import StreamSpec, build_stream
    stream = build_stream(StreamSpec(shards="DIR/manifest.json", pipeline="simclr"), rank=r, world_size=w)

Modules: `sources` (raw datasets), `shards` (writing shards, `--index`), `shardlist` (which shards: manifests,
paths, URLs), `tar` + `reading` (streaming tar reads, verification, corrupt-data policy), `decode` (fields ->
checked arrays), `pipelines` (the registry: sample fields -> batches), `vision` / `text` (augmentation, masking,
packing), `stream` (the resumable multi-rank stream), `captions` (the captioned Fashion-MNIST source).
"""

from sslscale.data.pipelines import PIPELINES, register_pipeline
from sslscale.data.reading import CorruptDataError
from sslscale.data.sources import SOURCES, label_names, load_arrays, load_source
from sslscale.data.stream import Stream, StreamSpec, build_stream, preprocessing, read_all
from sslscale.data.vision import AugmentConfig, Normalize

__all__ = [
    "PIPELINES",
    "SOURCES",
    "AugmentConfig",
    "CorruptDataError",
    "Normalize",
    "Stream",
    "StreamSpec",
    "build_stream",
    "label_names",
    "load_arrays",
    "load_source",
    "preprocessing",
    "read_all",
    "register_pipeline",
]
