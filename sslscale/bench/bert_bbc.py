"""Evidence for a BERT pretrained on BBC News (configs/pretrain/bert_bbc.yaml): held-out pretraining accuracy and a
few-label topic probe against a bag-of-words baseline.

    python -m sslscale.bench.bert_bbc RUN_DIR [--test-shards data-cache/bbc-test] [--seeds 5]

1. Held-out MLM / NSP accuracy: the run's objective (eval mode) over the test shards through the run's own
   pipeline settings (`nsp`, its masking), masks and pairs seeded per batch, so every encoder sees the same ones.
   MLM accuracy counts masked tokens (all batches pooled), NSP accuracy pairs (chance 50%).
2. Linear probe on the 5 BBC classes at 1 / 10 / 100 labels per class (and all): [CLS] pooler and mean-pooled
   last hidden states (padding excluded) of the first seq_len tokens of each article (the `text_labeled`
   batches), standardised with all training articles, `sslscale.adapt.probe.linear_probe` (weight decay by CV on
   the labelled ones). Baseline: TF-IDF bag of words of the whole article (vocabulary and idf from all training
   articles) through the same logistic regression, on the same label subsets (`probe.sample_per_class`).
   The same BERT with random weights is the third row: what pretraining adds.
This is a thin script: the general few-label runner is `sslscale adapt`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from sslscale.adapt import probe as P
from sslscale.data import text as textlib

LABELS_PER_CLASS = (1, 10, 100)


def held_out_accuracy(
    encoder: torch.nn.Module, shards: str, data: dict, nsp_weight: float = 1.0, batch_size: int = 64, seed: int = 1234
) -> dict[str, float]:
    """MLM top-1 over every masked token and NSP accuracy over every pair of `shards`, with the run's pipeline
    and masking settings (`data`: the run's data section) and a fixed seed."""
    from sslscale.data import StreamSpec, read_all
    from sslscale.objectives.bert import BertPretraining

    keys = ("pipeline", "seq_len", "mask_prob", "masking", "span_p", "span_max")
    spec = StreamSpec(
        shards=shards, batch_size=batch_size, num_workers=0, seed=seed, **{k: data[k] for k in keys if k in data}
    )
    objective = BertPretraining(encoder, nsp_weight=nsp_weight).eval()
    hits = masked = pairs = nsp_hits = 0.0
    with torch.no_grad():
        for batch in read_all(spec):
            _, m = objective(batch)
            masked += float(m["masked"])
            hits += float(m["mlm_acc"]) * float(m["masked"])
            if "nsp_acc" in m:
                n = len(batch["input_ids"])
                pairs += n
                nsp_hits += float(m["nsp_acc"]) * n
    out = {"mlm_acc": hits / max(masked, 1), "masked_tokens": masked}
    if pairs:
        out.update(nsp_acc=nsp_hits / pairs, pairs=pairs)
    return out


def article_ids(tokenizer, texts: list[str], seq_len: int) -> dict[str, torch.Tensor]:
    """The `text_labeled` batch of `texts`: [CLS] first tokens [SEP] [PAD]..."""
    docs = textlib.tokenize_windows(tokenizer, texts, seq_len - 2, None)
    return textlib.classify_batch(docs, [0] * len(docs), seq_len)


@torch.no_grad()
def bert_features(encoder: Any, batch: dict[str, torch.Tensor], chunk: int = 128) -> dict[str, torch.Tensor]:
    """{"cls": pooler output, "mean": mean of the last hidden states over real tokens}, float32 (N, dim)."""
    encoder.eval()
    cls, mean = [], []
    for i in range(0, len(batch["input_ids"]), chunk):
        ids, mask = batch["input_ids"][i : i + chunk], batch["attention_mask"][i : i + chunk]
        h = encoder(ids, None, mask)
        cls.append(encoder.pool(h).float())
        w = mask.unsqueeze(-1).float()
        mean.append((h.float() * w).sum(1) / w.sum(1).clamp(min=1))
    return {"cls": torch.cat(cls), "mean": torch.cat(mean)}


def probe_rows(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, seeds: int, classes: int
) -> dict[str, list[float]]:
    """Test accuracies per labels-per-class setting ("1", "10", "100", "all"), one per seed."""
    mean, scale = P.standardizer(train_x)
    tr, te = (train_x - mean) / scale, (test_x - mean) / scale
    rows: dict[str, list[float]] = {}
    for k in LABELS_PER_CLASS:
        rows[str(k)] = []
        for seed in range(seeds):
            idx = P.sample_per_class(train_y, k, seed)
            rows[str(k)].append(P.linear_probe(tr[idx], train_y[idx], te, test_y, classes, seed=seed)["accuracy"])
    rows["all"] = [P.linear_probe(tr, train_y, te, test_y, classes)["accuracy"]]
    return rows


def tfidf(
    train_texts: list[str], test_texts: list[str], min_df: int = 2, max_words: int = 5000
) -> tuple[torch.Tensor, torch.Tensor]:
    """TF-IDF bag of words (lower-cased word tokens; vocabulary and idf from the training articles; sublinear tf;
    rows L2-normalised), as dense float32 (N, words). Written here because scikit-learn is not installed."""
    import re
    from collections import Counter

    word = re.compile(r"[a-z0-9']+")
    train_tokens = [word.findall(t.lower()) for t in train_texts]
    df = Counter(w for toks in train_tokens for w in set(toks))
    ranked = sorted(df, key=lambda w: (-df[w], w))  # ties by word: the same vocabulary whatever the hash seed
    vocab = [w for w in ranked[:max_words] if df[w] >= min_df]
    index = {w: i for i, w in enumerate(vocab)}
    idf = torch.tensor([math.log((1 + len(train_texts)) / (1 + df[w])) + 1 for w in vocab])

    def matrix(token_lists: list[list[str]]) -> torch.Tensor:
        x = torch.zeros(len(token_lists), len(vocab))
        for row, toks in enumerate(token_lists):
            for w, c in Counter(toks).items():
                if w in index:
                    x[row, index[w]] = 1 + math.log(c)
        x = x * idf
        return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)

    return matrix(train_tokens), matrix([word.findall(t.lower()) for t in test_texts])


def bag_of_words_rows(
    train_texts: list[str], train_y: torch.Tensor, test_texts: list[str], test_y: torch.Tensor, seeds: int, classes: int
) -> dict[str, list[float]]:
    """TF-IDF features through the same logistic regression (`probe.linear_probe`, weight decay by CV) on the same
    label subsets as `probe_rows` (no standardisation: the rows are L2-normalised sparse counts)."""
    tr, te = tfidf(train_texts, test_texts)
    rows: dict[str, list[float]] = {}
    for k in LABELS_PER_CLASS:
        rows[str(k)] = []
        for seed in range(seeds):
            idx = P.sample_per_class(train_y, k, seed)
            rows[str(k)].append(P.linear_probe(tr[idx], train_y[idx], te, test_y, classes, seed=seed)["accuracy"])
    rows["all"] = [P.linear_probe(tr, train_y, te, test_y, classes)["accuracy"]]
    return rows


def evaluate(run_dir: str | Path, test_shards: str, seeds: int = 5) -> dict:
    from sslscale.data import load_source
    from sslscale.models import encoder_from_config, load_encoder
    from sslscale.train.export import export, run_tokenizer

    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    data, nsp_weight = cfg["data"], (cfg["objective"].get("kwargs") or {}).get("nsp_weight", 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        meta = export(run_dir, Path(tmp) / "bert.safetensors")
        trained: Any = load_encoder(str(Path(tmp) / "bert.safetensors"))
    torch.manual_seed(0)
    random_init = encoder_from_config(dict(trained.config)).eval()
    tokenizer_file = run_tokenizer(run_dir)
    if tokenizer_file is None:
        raise ValueError(f"{run_dir} did not train on text (data.pipeline={data.get('pipeline')!r})")
    tokenizer = textlib.load_tokenizer(tokenizer_file)
    train, test = load_source("bbc-news", "train"), load_source("bbc-news", "test")
    assert train.texts is not None and test.texts is not None  # a text source
    train_y, test_y = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    classes = len(train.label_names)
    train_ids = article_ids(tokenizer, train.texts, data["seq_len"])
    test_ids = article_ids(tokenizer, test.texts, data["seq_len"])
    result: dict = {
        "run_dir": str(run_dir),
        "step": meta["step"],
        "seeds": seeds,
        "classes": train.label_names,
        "held_out": {},
        "probe": {},
    }
    for name, enc in (("pretrained", trained), ("random_init", random_init)):
        result["held_out"][name] = held_out_accuracy(enc, test_shards, data, nsp_weight)
        print(f"[bert_bbc] {name} held-out: {result['held_out'][name]}", file=sys.stderr, flush=True)
        f_train, f_test = bert_features(enc, train_ids), bert_features(enc, test_ids)
        for pool in ("cls", "mean"):
            print(f"[bert_bbc] probing {name}/{pool}", file=sys.stderr, flush=True)
            result["probe"][f"{name}/{pool}"] = probe_rows(f_train[pool], train_y, f_test[pool], test_y, seeds, classes)
    result["probe"]["bag_of_words/tfidf"] = bag_of_words_rows(train.texts, train_y, test.texts, test_y, seeds, classes)
    return result


def table(result: dict) -> str:
    """Markdown: held-out accuracies, then probe accuracy (mean +- std over seeds) per labels per class."""
    lines = ["| encoder | held-out MLM acc | held-out NSP acc |", "|---|---|---|"]
    for name, r in result["held_out"].items():
        lines.append(f"| {name} | {r['mlm_acc']:.3f} | {r.get('nsp_acc', float('nan')):.3f} |")
    cols = [*map(str, LABELS_PER_CLASS), "all"]
    lines += [
        "",
        "| features | " + " | ".join(f"{c}/class" if c != "all" else "all" for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, rows in result["probe"].items():
        cells = []
        for c in cols:
            m, sd = P.mean_std(rows[c])
            cells.append(f"{m:.3f} ± {sd:.3f}" if len(rows[c]) > 1 else f"{m:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sslscale.bench.bert_bbc", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory of configs/pretrain/bert_bbc.yaml")
    parser.add_argument("--test-shards", default="data-cache/bbc-test", help="held-out BBC News shards")
    parser.add_argument("--seeds", type=int, default=5, help="label subsets per labels-per-class setting")
    parser.add_argument("--out", default="bench-results/bert_bbc.json", help="JSON output")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    torch.set_flush_denormal(True)
    result = evaluate(args.run_dir, args.test_shards, args.seeds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"-> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
