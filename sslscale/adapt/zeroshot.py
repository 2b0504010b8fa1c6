"""Zero-shot classification with a CLIP: class prompts from several templates -> one text embedding per class,
images scored against them (Radford et al. 2021, "prompt ensembling").

The classifier row of class c is `normalize(mean_t normalize(encode_text(templates[t].format(names[c]))))`:
each prompt's embedding is normalised first so no template outweighs another, and the mean is normalised again
so that image-class scores are cosine similarities. Prompts are tokenised exactly as training captions are
(`sslscale.data.text.caption_ids`: `[CLS] prompt [EOS] [PAD]...`).

Plain functions, for `sslscale adapt` and scripts:
- `zero_shot_classifier(model, tokenizer, class_names, templates)` -> (C, D) normalised class embeddings;
- `zero_shot_logits(model, classifier, images)` -> (N, C) scaled cosine similarities;
- `zero_shot_predict(model, classifier, images)` -> (N,) class indices;
- `zero_shot_accuracy(model, classifier, images, labels)` -> float;
- `load_clip(path)` -> (CLIP, tokenizer) from an export (`sslscale export` of a `clip` run: the whole CLIP and a
  copy of its training tokenizer, named in the metadata).

`python -m sslscale.adapt.zeroshot EXPORT.safetensors` reports zero-shot accuracy on the Fashion-MNIST test split
(chance 10%) next to the linear probe of the same model's image tower (`sslscale.adapt.evaluate`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslscale.models.clip import CLIP

# Prompt names of the Fashion-MNIST classes (index = label): the dataset's names in plain lower-case words.
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Generic product-photo templates (in the spirit of CLIP's ImageNet prompt set), "{}" = the class name.
TEMPLATES = (
    "a photo of a {}.",
    "a low-resolution picture of a {}.",
    "a black-and-white image of a {}.",
    "{}, product shot.",
    "catalogue item: {}.",
    "a photo of the {}.",
)


def _tokenizer(tokenizer: Any) -> Any:
    from sslscale.data.text import load_tokenizer

    return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer


def _seq_len(model: CLIP, seq_len: int | None) -> int:
    if seq_len is not None:
        return seq_len
    text = getattr(model, "config", {}).get("text_encoder", {})
    if "max_seq_len" not in text:
        raise ValueError("seq_len is not given and the model's config has no text_encoder.max_seq_len")
    return int(text["max_seq_len"])


def _check_model(model: nn.Module) -> None:
    for method in ("encode_image", "encode_text", "logit_scale"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"zero-shot needs a CLIP-like model with {method}(); got {type(model).__name__}")


@torch.no_grad()
def encode_prompts(
    model: CLIP, tokenizer: Any, texts: Sequence[str], seq_len: int | None = None, batch_size: int = 256
) -> torch.Tensor:
    """(len(texts), D) normalised text embeddings of `texts`, tokenised as training captions are."""
    from sslscale.data.text import caption_ids

    _check_model(model)
    tok, n = _tokenizer(tokenizer), _seq_len(model, seq_len)
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = caption_ids(tok, list(texts[i : i + batch_size]), n)
            out.append(F.normalize(model.encode_text(ids, mask).float(), dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def zero_shot_classifier(
    model: CLIP,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
    seq_len: int | None = None,
) -> torch.Tensor:
    """(C, D) class embeddings: per class the normalised mean of its normalised template embeddings.

    `tokenizer`: a `tokenizers.Tokenizer` or the path of a tokenizer.json; `templates`: strings with one "{}"
    for the class name; `seq_len`: prompt length (default the text tower's max_seq_len)."""
    if not class_names:
        raise ValueError("class_names is empty: expected one name per class")
    if not templates:
        raise ValueError("templates is empty: expected at least one template such as 'a photo of a {}.'")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"every template needs exactly one '{{}}' for the class name; got {bad}")
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = encode_prompts(model, tokenizer, prompts, seq_len).view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=1)


@torch.no_grad()
def zero_shot_logits(
    model: CLIP, classifier: torch.Tensor, images: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    """(N, C) logit_scale x cosine(image embedding, class embedding), in eval mode (mode restored)."""
    _check_model(model)
    if classifier.dim() != 2:
        raise ValueError(f"classifier must be (classes, dim), got shape {tuple(classifier.shape)}")
    was_training = model.training
    model.eval()
    try:
        scale = float(model.logit_scale())
        out = []
        for i in range(0, len(images), batch_size):
            emb = F.normalize(model.encode_image(images[i : i + batch_size]).float(), dim=1)
            out.append(scale * emb @ classifier.T.to(emb))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, classifier.shape[0])


def zero_shot_predict(
    model: CLIP, classifier: torch.Tensor, images: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    """(N,) int64 predicted class of each image: the class embedding most similar to its image embedding."""
    return zero_shot_logits(model, classifier, images, batch_size).argmax(dim=1)


def zero_shot_accuracy(
    model: CLIP, classifier: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return float((zero_shot_predict(model, classifier, images, batch_size) == labels).float().mean())


def load_clip(path: str | os.PathLike) -> tuple[CLIP, Any]:
    """(CLIP in eval mode, its tokenizer) from an exported CLIP: the tokenizer file the metadata names, resolved
    next to the export (`sslscale export` copies the run's tokenizer there)."""
    from sslscale.data.text import load_tokenizer
    from sslscale.models import load_encoder, read_metadata

    model = load_encoder(str(path))
    _check_model(model)
    assert isinstance(model, CLIP)
    name = read_metadata(str(path)).get("tokenizer")
    if not name:
        raise ValueError(
            f"{path}: the export names no tokenizer (metadata 'tokenizer'); export it from a run that "
            "trained on text shards, or pass the tokenizer.json yourself"
        )
    return model, load_tokenizer(Path(path).parent / name)


# ------------------------------------------------------------------------------------- python -m ... report
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sslscale.adapt.zeroshot", description=__doc__.split("\n")[0])
    parser.add_argument("clip", help="exported CLIP (.safetensors from `sslscale export` of a clip run)")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="also the linear probe of the image tower "
        "(pretrained vs random init vs raw pixels, `sslscale evaluate`'s table)",
    )
    parser.add_argument("--labels-per-class", type=int, default=10, help="few-label probe's k (default 10)")
    parser.add_argument("--seeds", type=int, default=3, help="few-label probe's label subsets (default 3)")
    parser.add_argument("--limit-test", type=int, default=None, help="score only the first N test images")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)

    from sslscale.adapt import evaluate
    from sslscale.adapt.datasets import load_split
    from sslscale.models import encoder_from_config, image_encoder, read_metadata

    torch.set_flush_denormal(True)
    start = time.perf_counter()
    try:
        model, tokenizer = load_clip(args.clip)
    except (FileNotFoundError, TypeError, ValueError) as err:
        print(f"zeroshot: {err}", file=sys.stderr)
        return 2
    pre = read_metadata(args.clip).get("preprocessing")
    test_x, test_y = load_split("fashion-mnist", "test", preprocessing=pre)
    if args.limit_test:
        test_x, test_y = test_x[: args.limit_test], test_y[: args.limit_test]
    torch.manual_seed(0)
    random_model = encoder_from_config(model.config).eval()  # the same CLIP at a seed-fixed random init
    assert isinstance(random_model, CLIP)
    res: dict[str, Any] = {
        "clip": str(args.clip),
        "templates": list(TEMPLATES),
        "classes": list(FASHION_MNIST_CLASSES),
        "num_test": len(test_y),
        "zero_shot": {},
    }
    for row, m in (("pretrained", model), ("random_init", random_model)):
        classifier = zero_shot_classifier(m, tokenizer, FASHION_MNIST_CLASSES, TEMPLATES)
        single = zero_shot_classifier(m, tokenizer, FASHION_MNIST_CLASSES, TEMPLATES[:1])
        res["zero_shot"][row] = {
            "accuracy": zero_shot_accuracy(m, classifier, test_x, test_y),
            "accuracy_first_template_only": zero_shot_accuracy(m, single, test_x, test_y),
        }
    print(
        "zero-shot, Fashion-MNIST test acc %   "
        f"{len(TEMPLATES)} templates   1 template   (chance 10.0, n={len(test_y)})"
    )
    for row, r in res["zero_shot"].items():
        print(f"{row:<36} {100 * r['accuracy']:>11.1f}   {100 * r['accuracy_first_template_only']:>10.1f}")
    if args.probe:
        train = load_split("fashion-mnist", "train", preprocessing=pre)
        probe = evaluate.evaluate(image_encoder(model), train, (test_x, test_y), args.labels_per_class, args.seeds)
        res["linear_probe"] = probe
        print("\nimage tower (before projection):")
        evaluate.print_results(probe)
    res["seconds"] = round(time.perf_counter() - start, 2)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
