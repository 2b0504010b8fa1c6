"""Data: raw sources -> webdataset shards (`sslscale shards`) -> seeded, sharded, exactly resumable batch streams.

    from sslscale.data import StreamSpec, build_stream
    stream = build_stream(StreamSpec(shards="DIR/manifest.json", pipeline="simclr"), rank=r, world_size=w)
"""

from sslscale.data.sources import SOURCES, label_names, load_arrays, load_source
from sslscale.data.stream import Stream, StreamSpec, build_stream
from sslscale.data.vision import AugmentConfig

__all__ = ["AugmentConfig", "SOURCES", "Stream", "StreamSpec", "build_stream", "label_names", "load_arrays",
           "load_source"]
