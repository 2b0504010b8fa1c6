"""In-context learning and zero-shot label scoring for causal LMs (plain functions the `sslscale adapt` runner
can call).

- `build_prompt(shots, query, template)`: k solved examples then the query, each through a template with `{x}`
  and `{y}` fields; the query is rendered from the template's text *before* `{y}`, and the builder is never
  given the query's label, so it cannot leak into the prompt.
- `label_scores(model, tokenizer, prompts, labels)`: log-likelihood of each label's tokens after each prompt
  (sum over the label's tokens; prompt and label are tokenized apart so every label follows the same prompt
  tokens). The predicted label is the argmax: zero-shot classification by label scoring.
- `icl_curve(model, tokenizer, episodes, shots)`: accuracy vs number of shots on the same queries;
  `plot_curve` writes it as a PNG (matplotlib).

`python -m sslscale.adapt.icl MODEL --out DIR` runs the curve on held-out `icl-rules` episodes (rules never seen
in pretraining, `sslscale.data.icl`) and writes DIR/icl.json and DIR/icl.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslscale.data.text import EOS_ID

DEFAULT_TEMPLATE = "{x}={y}"
DEFAULT_SEPARATOR = " "


def _split_template(template: str) -> tuple[str, str]:
    if template.count("{x}") != 1 or template.count("{y}") != 1 or template.index("{x}") > template.index("{y}"):
        raise ValueError(f"template must hold one {{x}} followed by one {{y}}, got {template!r}")
    head, tail = template.split("{y}")
    return head, tail


def build_prompt(
    shots: Sequence[tuple[str, str]], query: str, template: str = DEFAULT_TEMPLATE, separator: str = DEFAULT_SEPARATOR
) -> str:
    """`shots` rendered through `template`, joined by `separator`, then the query up to where its label goes."""
    head, _ = _split_template(template)
    parts = [template.format(x=x, y=y) for x, y in shots]
    parts.append(head.format(x=query))
    return separator.join(parts)


@torch.no_grad()
def label_scores(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], labels: Sequence[str], *, batch_size: int = 64
) -> torch.Tensor:
    """(len(prompts), len(labels)) sums of log p(label tokens | [EOS] prompt) under the causal LM `model`."""
    if not prompts or not labels:
        raise ValueError(f"need prompts and labels, got {len(prompts)} prompts and {len(labels)} labels")
    label_ids = [e.ids for e in tokenizer.encode_batch(list(labels))]
    empty = [lab for lab, ids in zip(labels, label_ids) if not ids]
    if empty:
        raise ValueError(f"labels {empty} encode to no tokens")
    prompt_ids = [[EOS_ID, *e.ids] for e in tokenizer.encode_batch(list(prompts))]
    limit = int(getattr(model, "max_seq_len", 1 << 30))
    rows = [(p, j) for p in range(len(prompts)) for j in range(len(labels))]
    device = next(model.parameters()).device
    scores = torch.empty(len(prompts), len(labels), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            seqs = [prompt_ids[p] + label_ids[j] for p, j in chunk]
            longest = max(map(len, seqs))
            if longest > limit:
                raise ValueError(f"prompt + label of {longest} tokens exceeds the model's max_seq_len={limit}")
            ids = torch.full((len(seqs), longest), EOS_ID, dtype=torch.int64)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
            logp = model(ids.to(device)).float().log_softmax(dim=-1).cpu()
            for i, (p, j) in enumerate(chunk):
                n, m = len(prompt_ids[p]), len(label_ids[j])
                positions = torch.arange(n - 1, n - 1 + m)
                scores[p, j] = logp[i, positions, torch.tensor(label_ids[j])].double().sum()
    finally:
        model.train(was_training)
    return scores


def classify(model: nn.Module, tokenizer: Any, prompts: Sequence[str], labels: Sequence[str]) -> list[int]:
    """Index into `labels` of the highest-scoring label per prompt (zero-shot / few-shot label scoring)."""
    return label_scores(model, tokenizer, prompts, labels).argmax(dim=1).tolist()


Episode = tuple[Any, Sequence[tuple[str, str]], tuple[str, str]]  # (rule, solved examples, (query x, query y))


def icl_curve(
    model: nn.Module,
    tokenizer: Any,
    episodes: Sequence[Episode],
    shots: Sequence[int],
    labels: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    separator: str = DEFAULT_SEPARATOR,
) -> dict[int, float]:
    """Accuracy of label scoring over `labels` at each number of shots k (the first k examples of each episode;
    the same queries at every k)."""
    out = {}
    for k in shots:
        if any(len(ex) < k for _, ex, _ in episodes):
            raise ValueError(f"an episode holds fewer than {k} examples")
        prompts = [build_prompt(ex[:k], q[0], template, separator) for _, ex, q in episodes]
        truth = [labels.index(q[1]) for _, _, q in episodes]
        pred = classify(model, tokenizer, prompts, labels)
        out[int(k)] = sum(p == t for p, t in zip(pred, truth)) / len(truth)
    return out


def plot_curve(curve: dict[int, float], path: str | Path, chance: float | None = None, title: str = "") -> Path:
    """Accuracy vs shots as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(curve)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(ks, [100 * curve[k] for k in ks], marker="o", label="GPT, label scoring")
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle="--", label=f"chance ({100 * chance:.0f}%)")
    ax.set_xlabel("shots (solved examples in the prompt)")
    ax.set_ylabel("accuracy on held-out rules (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from sslscale.adapt.generate import find_tokenizer
    from sslscale.data import icl as rules
    from sslscale.data.text import load_tokenizer
    from sslscale.models import load_encoder

    parser = argparse.ArgumentParser(prog="python -m sslscale.adapt.icl", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an exported causal LM pretrained on icl-rules shards")
    parser.add_argument("--out", required=True, help="directory for icl.json and icl.png")
    parser.add_argument("--episodes", type=int, default=300, help="held-out episodes (queries) per shot count")
    parser.add_argument("--max-shots", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args(argv)
    try:
        model = load_encoder(args.model)
        tokenizer = load_tokenizer(find_tokenizer(args.model, args.tokenizer))
    except (FileNotFoundError, ValueError) as err:
        print(f"icl: {err}", file=sys.stderr)
        return 2
    eps = rules.episodes("test", args.episodes, args.max_shots, seed=args.seed)
    curve = icl_curve(model, tokenizer, eps, range(args.max_shots + 1), list(rules.LABELS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chance = 1 / len(rules.LABELS)
    result = {
        "model": str(args.model),
        "episodes": args.episodes,
        "split": "test (rules never in pretraining)",
        "chance": chance,
        "accuracy": {str(k): v for k, v in curve.items()},
    }
    (out / "icl.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_curve(curve, out / "icl.png", chance, "in-context learning: symbol mappings")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
