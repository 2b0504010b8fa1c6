"""The pipeline registry: what a sample must hold for a pipeline, and how its batch is built.

A pipeline is one decorated function:

    @register_pipeline("augmented", needs=("image",), optional=("label",), image_keys=("image",),
                       keys={"image": "one augmented view, float (B, C, S, S)", "label": "int64 (B,), -1 unlabeled"})
    def augmented(ctx: PipelineContext, items: list[dict], gen: torch.Generator) -> dict:
        return {"image": vision.simclr_view(ctx.images(items), ctx.out_size(), ctx.spec.augment, gen),
                "label": ctx.labels(items)}

`needs` / `optional` name the sample fields decoded for it: `image` (first of jpg;png;jpeg;webp;npy, as uint8
(C, H, W) in `ctx.channels` channels), `label` (cls or json; -1 when optional and absent), `text` (txt). A sample
lacking a needed field is skipped and counted (`missing_field`, naming the fields it had). `items` are the
decoded samples (`{"image": array, "label": int, "text": str}`), `gen` the batch's seeded generator: draw every
random number from it (exact resume depends on it). `image_keys` are the batch keys (fnmatch patterns) the
stream normalises with `StreamSpec.normalize`. A `prepare(ctx, item)` hook runs per sample (CLM tokenises there) and `packed=True`
makes the stream pack the prepared token lists into `batch_size x seq_len` blocks (CLM) instead of batching
samples. `describe()` renders every pipeline's batch keys: the one place they are documented.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sslscale.data import decode as dec
from sslscale.data import text as textlib
from sslscale.data import vision
from sslscale.data.reading import ErrorCounter, flag_reason


@dataclass(frozen=True)
class Pipeline:
    name: str
    build: Callable[[PipelineContext, list, torch.Generator], dict]
    needs: tuple[str, ...]
    optional: tuple[str, ...] = ()
    keys: Callable[[Any], dict[str, str]] = field(default=lambda spec: {})
    image_keys: tuple[str, ...] = ()
    prepare: Callable[[PipelineContext, dict], Any] | None = None
    packed: bool = False

    @property
    def fields(self) -> tuple[str, ...]:
        return self.needs + self.optional

    @property
    def uses_images(self) -> bool:
        return "image" in self.fields

    @property
    def uses_text(self) -> bool:
        return "text" in self.fields


PIPELINES: dict[str, Pipeline] = {}
FIELDS = ("image", "label", "text")


def register_pipeline(
    name: str,
    *,
    needs: tuple[str, ...],
    optional: tuple[str, ...] = (),
    keys: dict[str, str] | Callable[[Any], dict[str, str]],
    image_keys: tuple[str, ...] = (),
    prepare: Callable | None = None,
    packed: bool = False,
) -> Callable:
    """Register the decorated batch builder as pipeline `name` (see the module docstring)."""
    unknown = set(needs + optional) - set(FIELDS)
    if unknown:
        raise ValueError(f"pipeline {name!r}: unknown fields {sorted(unknown)}, expected some of {FIELDS}")
    key_fn = keys if callable(keys) else (lambda spec, _k=dict(keys): dict(_k))

    def decorate(fn: Callable) -> Callable:
        if name in PIPELINES and PIPELINES[name].build is not fn:
            raise ValueError(f"pipeline {name!r} is registered twice")
        PIPELINES[name] = Pipeline(name, fn, tuple(needs), tuple(optional), key_fn, tuple(image_keys), prepare, packed)
        return fn

    return decorate


def get_pipeline(name: str) -> Pipeline:
    if name not in PIPELINES:
        raise ValueError(f"pipeline must be one of {sorted(PIPELINES)}, got {name!r}")
    return PIPELINES[name]


@dataclass
class PipelineContext:
    """What a batch builder may read: the spec and the image format / tokenizer resolved when the stream was
    planned (identical in every worker and on resume)."""

    spec: Any  # StreamSpec
    channels: int | None = None  # every decoded image has this many channels
    image_size: int | None = None  # output side; None: stored size (then `stored_shape` is enforced)
    stored_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    tokenizer_path: str | None = None
    vocab_size: int | None = None
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:  # workers load their own tokenizer
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.tokenizer_path is not None:
            self._tokenizer = textlib.load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def out_size(self) -> int:
        """Side of augmented views: image_size, else the stored (square) side."""
        if self.image_size is not None:
            return self.image_size
        if self.stored_shape is None or self.stored_shape[1] != self.stored_shape[2]:
            raise ValueError(f"images of shape {self.stored_shape} need an output size: set image_size")
        return self.stored_shape[1]

    def images(self, items: list[dict]) -> torch.Tensor | list[torch.Tensor]:
        """uint8 (B, C, H, W) when all share a size, else a list of (C, H, W) tensors."""
        arrays = [it["image"] for it in items]
        if all(a.shape == arrays[0].shape for a in arrays):
            return torch.from_numpy(np.stack(arrays))
        return [torch.from_numpy(a.copy() if not a.flags.writeable or not a.flags.c_contiguous else a) for a in arrays]

    @staticmethod
    def labels(items: list[dict]) -> torch.Tensor:
        return torch.tensor([it.get("label", -1) for it in items], dtype=torch.int64)


def decode_sample(ctx: PipelineContext, pipe: Pipeline, raw: dict, errors: ErrorCounter, where: str) -> dict | None:
    """The fields `pipe` uses, decoded and checked; None (counted, or raised under `fail`) when unusable."""
    key = raw.get("__key__")
    out: dict = {}
    for name in pipe.fields:
        exts = {"image": dec.IMAGE_EXTS, "label": dec.LABEL_EXTS, "text": dec.TEXT_EXTS}[name]
        found = dec.find_field(raw, exts)
        if found is None:
            if name in pipe.needs:
                had = sorted(k for k in raw if not k.startswith("__"))
                reason = flag_reason(raw) or "missing_field"
                errors(reason, where, f"sample {key!r} has no {name} ({';'.join(exts)}); it has {had}")
                return None
            if name == "label":
                out["label"] = -1
            continue
        ext, value = found
        try:
            if name == "image":
                image = dec.decode_image(ext, value, ctx.channels)
                if ctx.image_size is None and ctx.stored_shape is not None and image.shape != ctx.stored_shape:
                    raise dec.Malformed(
                        "bad_image",
                        f"image shape {tuple(image.shape)} differs from the "
                        f"stream's {ctx.stored_shape} (set image_size to resize mixed sizes)",
                    )
                out["image"] = image
            elif name == "label":
                out["label"] = dec.decode_label(ext, value, ctx.num_classes)
            else:
                out["text"] = dec.decode_text(ext, value)
        except dec.Malformed as e:
            errors(e.reason, where, f"sample {key!r}: {e}")
            return None
    if pipe.prepare is not None:
        return pipe.prepare(ctx, out)
    return out


def describe() -> str:
    """A markdown table of every registered pipeline: fields it needs and the batch it yields."""
    from sslscale.data.stream import StreamSpec

    lines = ["| pipeline | sample fields | batch keys |", "|---|---|---|"]
    for name, p in sorted(PIPELINES.items()):
        fields = ", ".join(p.needs) + (f" (optional: {', '.join(p.optional)})" if p.optional else "")
        keys = "; ".join(f"`{k}`: {v}" for k, v in p.keys(StreamSpec(shards="-", pipeline=name)).items())
        lines.append(f"| `{name}` | {fields} | {keys} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- image
_LABEL = "int64 (B,), -1 where a sample has no label"


def _view_keys(spec) -> dict[str, str]:
    keys = {f"view{i + 1}": "augmented view, float32 (B, C, S, S), S = image_size" for i in range(spec.views)}
    keys.update(
        {
            f"local{i + 1}": "small augmented view (multi-crop), float32 (B, C, L, L), L = local_size"
            for i in range(spec.local_views)
        }
    )
    keys["label"] = _LABEL
    return keys


@register_pipeline("simclr", needs=("image",), optional=("label",), keys=_view_keys, image_keys=("view*", "local*"))
def simclr(ctx: PipelineContext, items: list[dict], gen: torch.Generator) -> dict:
    spec = ctx.spec
    return vision.simclr_batch(
        ctx.images(items),
        ctx.labels(items),
        ctx.out_size(),
        spec.augment,
        gen,
        views=spec.views,
        local_views=spec.local_views,
        local_size=spec.local_size,
    )


@register_pipeline(
    "augmented",
    needs=("image",),
    optional=("label",),
    image_keys=("image",),
    keys={"image": "one augmented view (SimCLR augmentation), float32 (B, C, S, S)", "label": _LABEL},
)
def augmented(ctx: PipelineContext, items: list[dict], gen: torch.Generator) -> dict:
    return {
        "image": vision.simclr_view(ctx.images(items), ctx.out_size(), ctx.spec.augment, gen),
        "label": ctx.labels(items),
    }


@register_pipeline(
    "rotation",
    needs=("image",),
    optional=("label",),
    image_keys=("image",),
    keys={
        "image": "image rotated by k x 90 degrees counter-clockwise, float32 (B, C, S, S)",
        "rotation": "k in 0..3, int64 (B,)",
        "label": _LABEL,
    },
)
def rotation(ctx: PipelineContext, items: list[dict], gen: torch.Generator) -> dict:
    return vision.rotation_batch(ctx.images(items), ctx.labels(items), gen, ctx.image_size)


@register_pipeline(
    "jigsaw",
    needs=("image",),
    optional=("label",),
    image_keys=("image",),
    keys={
        "image": "one augmented view (SimCLR augmentation), float32 (B, C, S, S)",
        "jigsaw_draw": "uniform draw in [0, 2^62) per image, int64 (B,): the jigsaw objective "
        "shuffles the image's tiles by permutation (draw mod P)",
        "label": _LABEL,
    },
)
def jigsaw(ctx: PipelineContext, items: list[dict], gen: torch.Generator) -> dict:
    # The draw comes from the batch's generator (exact resume); the tiling and the permutation set live with the
    # objective (sslscale/objectives/jigsaw.py), so the set and its classifier are defined in one place.
    image = vision.simclr_view(ctx.images(items), ctx.out_size(), ctx.spec.augment, gen)
    return {
        "image": image,
        "jigsaw_draw": torch.randint(2**62, (len(items),), generator=gen),
        "label": ctx.labels(items),
    }


@register_pipeline(
    "labeled",
    needs=("image", "label"),
    image_keys=("image",),
    keys={
        "image": "un-augmented image, float32 (B, C, H, W) (resized + centre-cropped to image_size when set)",
        "label": "int64 (B,)",
    },
)
def labeled(ctx: PipelineContext, items: list[dict], gen: torch.Generator) -> dict:
    return vision.labeled_batch(ctx.images(items), ctx.labels(items), ctx.image_size)


def _caption_ids(ctx: PipelineContext, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] caption [EOS] [PAD]...` rows of seq_len: pool at 0 ([CLS]) or at attention_mask.sum() - 1 ([EOS])."""
    return textlib.caption_ids(ctx.tokenizer, texts, ctx.spec.seq_len)


@register_pipeline(
    "image_text",
    needs=("image", "text"),
    optional=("label",),
    image_keys=("image",),
    keys={
        "image": "random resized crop + flip (augment.crop_scale / flip_p; no colour change), float32 (B, C, S, S)",
        "input_ids": "[CLS] caption [EOS] [PAD]..., int64 (B, seq_len)",
        "attention_mask": "1 on real tokens, int64 (B, seq_len)",
        "label": _LABEL,
    },
)
def image_text(ctx: PipelineContext, items: list[dict], gen: torch.Generator) -> dict:
    image = vision.crop_flip_view(ctx.images(items), ctx.out_size(), ctx.spec.augment, gen)
    ids, mask = _caption_ids(ctx, [it["text"] for it in items])
    return {"image": image, "input_ids": ids, "attention_mask": mask, "label": ctx.labels(items)}


# -------------------------------------------------------------------------------------------------- text
def _windows(ctx: PipelineContext, items: list[dict], reserved: int, gen: torch.Generator | None):
    return textlib.tokenize_windows(ctx.tokenizer, [it["text"] for it in items], ctx.spec.seq_len - reserved, gen)


def _spans(spec) -> textlib.SpanMasking | None:
    """`masking: span` -> the span settings; None: BERT's token masking."""
    return textlib.SpanMasking(spec.span_p, spec.span_max) if spec.masking == "span" else None


_SELECTION = (
    "selected: 15% (mask_prob) of the ordinary tokens, i.i.d. (masking=token) or as contiguous spans "
    "(masking=span); 80% [MASK], 10% random, 10% kept (per span with spans)"
)


@register_pipeline(
    "mlm",
    needs=("text",),
    optional=("label",),
    keys={
        "input_ids": f"[CLS] window [SEP] [PAD]..., {_SELECTION}, int64 (B, seq_len)",
        "attention_mask": "int64 (B, seq_len)",
        "labels": "original id at selected positions, -100 elsewhere, int64 (B, seq_len)",
    },
)
def mlm(ctx: PipelineContext, items: list[dict], gen: torch.Generator) -> dict:
    spec = ctx.spec
    return textlib.mlm_batch(
        _windows(ctx, items, 2, gen), spec.seq_len, ctx.vocab_size, gen, spec.mask_prob, _spans(spec)
    )


@register_pipeline(
    "nsp",
    needs=("text",),
    optional=("label",),
    keys={
        "input_ids": f"[CLS] A [SEP] B [SEP] [PAD]..., MLM {_SELECTION}, int64 (B, seq_len)",
        "attention_mask": "int64 (B, seq_len)",
        "labels": "MLM targets (-100 elsewhere)",
        "token_type_ids": "0 for [CLS] A [SEP], 1 for B [SEP]",
        "next_sentence_label": "0 = B continues A, 1 = B from another document, int64 (B,)",
    },
)
def nsp(ctx: PipelineContext, items: list[dict], gen: torch.Generator) -> dict:
    spec = ctx.spec
    return textlib.nsp_batch(
        _windows(ctx, items, 3, gen), spec.seq_len, ctx.vocab_size, gen, spec.mask_prob, _spans(spec)
    )


def _clm_tokens(ctx: PipelineContext, item: dict) -> list[int]:
    return ctx.tokenizer.encode(item["text"]).ids


@register_pipeline(
    "clm",
    needs=("text",),
    optional=("label",),
    prepare=_clm_tokens,
    packed=True,
    keys={
        "input_ids": "blocks of doc0 [EOS] doc1 [EOS] ... (documents packed), int64 (B, seq_len)",
        "labels": "equal to input_ids (the model shifts), int64 (B, seq_len)",
    },
)
def clm(ctx: PipelineContext, blocks: list[list[int]], gen: torch.Generator) -> dict:
    return textlib.clm_batch(blocks)


@register_pipeline(
    "text_labeled",
    needs=("text", "label"),
    keys={
        "input_ids": "[CLS] start of the text [SEP] [PAD]..., int64 (B, seq_len)",
        "attention_mask": "int64 (B, seq_len)",
        "label": "int64 (B,)",
    },
)
def text_labeled(ctx: PipelineContext, items: list[dict], gen: torch.Generator) -> dict:
    docs = _windows(ctx, items, 2, None)
    return textlib.classify_batch(docs, [it["label"] for it in items], ctx.spec.seq_len)
