"""The `bert` objective (MLM + NSP) against a plain re-implementation, the masking contracts of the `mlm` / `nsp`
pipelines (token and SpanBERT span masking), and the vocabulary size taken from the shards' tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslscale.data import text as T
from sslscale.models import build_encoder
from sslscale.objectives import build_objective

V = 60


def _bert(**kw):
    torch.manual_seed(0)
    model = build_encoder(
        "bert",
        **{
            "vocab_size": V,
            "max_seq_len": 16,
            "dim": 32,
            "depth": 2,
            "heads": 2,
            "dropout": 0.0,
            "attn_dropout": 0.0,
            **kw,
        },
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _batch(gen_seed=0, n=5, t=14):
    gen = torch.Generator().manual_seed(gen_seed)
    docs = [
        torch.randint(T.NUM_SPECIAL, V, (int(torch.randint(6, 30, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n)
    ]
    return T.nsp_batch(docs, t, V, gen, mask_prob=0.3)


def _plain_loss(model, batch):
    """BERT's pretraining loss written out: full-vocabulary logits, cross-entropy with ignore_index, [CLS] pooler."""
    h = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    head = model.mlm_head
    x = F.layer_norm(
        F.gelu(F.linear(h, head.dense.weight, head.dense.bias)),
        (h.shape[-1],),
        head.norm.weight,
        head.norm.bias,
        head.norm.eps,
    )
    logits = x @ model.embeddings.word.weight.T + head.decoder.bias
    mlm = F.cross_entropy(logits.reshape(-1, V), batch["labels"].reshape(-1), ignore_index=-100)
    pooled = torch.tanh(F.linear(h[:, 0], model.pooler.dense.weight, model.pooler.dense.bias))
    nsp_logits = F.linear(pooled, model.nsp_head.weight, model.nsp_head.bias)
    nsp = F.cross_entropy(nsp_logits, batch["next_sentence_label"])
    sel = batch["labels"] != -100
    mlm_acc = (logits.argmax(-1)[sel] == batch["labels"][sel]).float().mean()
    nsp_acc = (nsp_logits.argmax(-1) == batch["next_sentence_label"]).float().mean()
    return mlm, nsp, mlm_acc, nsp_acc


@pytest.mark.parametrize("nsp_weight", [1.0, 0.5])
def test_loss_metrics_and_gradients_equal_a_plain_implementation(nsp_weight):
    batch = _batch()
    assert (batch["labels"] != -100).sum() > 5 and 0 < batch["next_sentence_label"].sum() < 5
    ours = build_objective("bert", _bert(), nsp_weight=nsp_weight)
    plain = _bert()
    loss, metrics = ours(batch)
    mlm, nsp, mlm_acc, nsp_acc = _plain_loss(plain, batch)
    expected = mlm + nsp_weight * nsp
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["mlm_loss"], mlm.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["nsp_loss"], nsp.detach(), rtol=1e-5, atol=1e-6)
    assert metrics["mlm_acc"] == pytest.approx(float(mlm_acc)) and metrics["nsp_acc"] == pytest.approx(float(nsp_acc))
    assert metrics["masked"] == (batch["labels"] != -100).sum()
    loss.backward()
    expected.backward()
    theirs = dict(plain.named_parameters())
    for name, p in ours.encoder.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert ours.encoder.embeddings.word.weight.grad.abs().sum() > 0
    assert ours.encoder.nsp_head.weight.grad.abs().sum() > 0


def test_mlm_only_accepts_batches_without_nsp_labels_and_accuracy_counts_hits():
    model = _bert()
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(T.NUM_SPECIAL, V, (20,), generator=gen).tolist() for _ in range(4)]
    batch = T.mlm_batch(docs, 16, V, gen, mask_prob=0.4)
    loss, metrics = build_objective("bert", model, nsp_weight=0)(batch)
    mlm, _, mlm_acc, _ = _plain_loss(
        model,
        {
            **batch,
            "token_type_ids": torch.zeros_like(batch["input_ids"]),
            "next_sentence_label": torch.zeros(4, dtype=torch.long),
        },
    )
    torch.testing.assert_close(loss, mlm, rtol=1e-5, atol=1e-6)
    assert "nsp_loss" not in metrics and metrics["mlm_acc"] == pytest.approx(float(mlm_acc))
    with pytest.raises(KeyError, match="next_sentence_label"):
        build_objective("bert", model)(batch)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="nsp_weight must be >= 0, got -1"):
        build_objective("bert", _bert(), nsp_weight=-1)
    with pytest.raises(TypeError, match=r"needs a BERT encoder .* GPT lacks \['mlm_head', 'nsp_head', 'pool'\]"):
        build_objective("bert", build_encoder("gpt", vocab_size=V, max_seq_len=16, dim=64, depth=1, heads=2))


# ------------------------------------------------------------------------------------------------ masking
def _docs(n, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(T.NUM_SPECIAL, V, (length,), generator=gen).tolist() for _ in range(n)]


def _unmasked_reference(builder, docs, seq_len, seed, **kw):
    """The same batch with nothing masked: the original ids at every position (the generator draws the same
    windows and pairs first, so mask_prob only changes the masking)."""
    return builder(docs, seq_len, V, torch.Generator().manual_seed(seed), mask_prob=0.0, **kw)["input_ids"]


@pytest.mark.parametrize("builder", [T.mlm_batch, T.nsp_batch], ids=["mlm", "nsp"])
@pytest.mark.parametrize("spans", [None, T.SpanMasking()], ids=["token", "span"])
def test_labels_are_minus_100_exactly_where_nothing_is_predicted(builder, spans):
    docs = _docs(256, 200)
    batch = builder(docs, 64, V, torch.Generator().manual_seed(3), mask_prob=0.15, spans=spans)
    original = _unmasked_reference(builder, docs, 64, 3, spans=spans)
    ids, labels = batch["input_ids"], batch["labels"]
    selected = labels != -100
    assert torch.equal(labels[selected], original[selected])  # labels hold the original token
    assert not (selected & (original < T.NUM_SPECIAL)).any()  # never a special or a pad
    assert torch.equal(ids[~selected], original[~selected])  # unselected positions are untouched
    maskable = (original >= T.NUM_SPECIAL).sum(1)
    frac = selected.sum(1).float() / maskable.float()
    if spans is None:
        assert abs(float(frac.mean()) - 0.15) < 0.02
    else:  # the budget is met exactly per row: round(15% of the maskable tokens)
        assert torch.equal(selected.sum(1), (0.15 * maskable.double()).round().long())
    changed = ids[selected] != original[selected]
    as_mask = ids[selected] == T.MASK_ID
    assert abs(float(as_mask.float().mean()) - 0.8) < 0.06  # 80% [MASK]
    kept = float((~changed).float().mean())  # 10% kept (+ random draws equal to the original)
    assert abs(kept - (0.1 + 0.1 / (V - T.NUM_SPECIAL))) < 0.05


def _truncated_geometric(p, max_len):
    w = [p * (1 - p) ** (k - 1) for k in range(1, max_len + 1)]
    return [x / sum(w) for x in w]


def test_span_lengths_follow_the_geometric_distribution_clipped_at_10():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    lengths = T.span_lengths(n, T.SpanMasking(p=0.2, max_len=10), gen)
    assert lengths.min() >= 1 and lengths.max() == 10
    expected = _truncated_geometric(0.2, 10)
    observed = torch.bincount(lengths, minlength=11)[1:].double() / n
    for k, (o, e) in enumerate(zip(observed.tolist(), expected), start=1):
        assert abs(o - e) < 4 * math.sqrt(e * (1 - e) / n), (k, o, e)  # 4 standard errors
    assert float(lengths.double().mean()) == pytest.approx(sum(k * e for k, e in enumerate(expected, 1)), abs=0.02)
    assert sum(k * e for k, e in enumerate(expected, 1)) == pytest.approx(3.8, abs=0.05)  # SpanBERT's mean span


def test_masked_spans_are_contiguous_runs_with_the_drawn_lengths():
    """Long rows and a small budget: spans rarely touch and few are cut by the row's budget (one per row, ~1 in
    20 here), so the runs of selected positions follow the length distribution, and every run gets one
    treatment (all [MASK], all random or all kept)."""
    docs = _docs(60, 4100, seed=1)
    spans = T.SpanMasking()
    batch = T.mlm_batch(docs, 4096, V, torch.Generator().manual_seed(5), mask_prob=0.02, spans=spans)
    selected = batch["labels"] != -100
    runs, mixed = [], 0
    for row, ids in zip(selected, batch["input_ids"]):
        padded = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int()
        starts = (padded.diff() == 1).nonzero().flatten().tolist()
        ends = (padded.diff() == -1).nonzero().flatten().tolist()
        for s, e in zip(starts, ends):
            runs.append(e - s)
            mixed += len(set((ids[s:e] == T.MASK_ID).tolist())) > 1
    counts = torch.bincount(torch.tensor(runs), minlength=21).double()
    short = counts[1:11] / counts[1:11].sum()
    expected = _truncated_geometric(0.2, 10)
    assert max(abs(a - b) for a, b in zip(short.tolist(), expected)) < 0.035, short  # ~1,400 runs
    assert counts[11:].sum() / counts.sum() < 0.05  # merged neighbours only
    assert mixed / len(runs) < 0.03  # one action per span (merged neighbours aside)


def test_span_masking_is_seeded_per_batch():
    docs = _docs(8, 100)
    a = T.mlm_batch(docs, 64, V, torch.Generator().manual_seed(7), spans=T.SpanMasking())
    b = T.mlm_batch(docs, 64, V, torch.Generator().manual_seed(7), spans=T.SpanMasking())
    c = T.mlm_batch(docs, 64, V, torch.Generator().manual_seed(8), spans=T.SpanMasking())
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])


@pytest.mark.parametrize("kw, message", [({"p": 0.0}, "span p must be in"), ({"max_len": 0}, "max_len must be")])
def test_bad_span_settings_name_the_value(kw, message):
    with pytest.raises(ValueError, match=message):
        T.SpanMasking(**kw)


# ------------------------------------------------------------------------------- stream and config seams
@pytest.fixture(scope="module")
def bbc(tmp_path_factory):
    from tests.data_helpers import shards

    return shards(tmp_path_factory, "bbc-news", "train", per_shard=30, limit=120, vocab_size=1500)


def test_nsp_stream_with_span_masking_yields_both_targets(bbc):
    from sslscale.data import StreamSpec, build_stream

    spec = dict(shards=str(bbc), pipeline="nsp", batch_size=8, num_workers=0, seq_len=64, masking="span")
    batch = next(iter(build_stream(StreamSpec(**spec))))
    again = next(iter(build_stream(StreamSpec(**spec))))
    assert torch.equal(batch["labels"], again["labels"])  # seeded per batch
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "token_type_ids", "next_sentence_label"}
    selected = batch["labels"] != -100
    maskable = (batch["labels"] >= T.NUM_SPECIAL) | (batch["input_ids"] >= T.NUM_SPECIAL)
    assert torch.equal(selected.sum(1), (0.15 * maskable.sum(1).double()).round().long())
    model = build_encoder("bert", vocab_size=1500, max_seq_len=64, dim=32, depth=1, heads=2)
    loss, metrics = build_objective("bert", model)(batch)
    assert torch.isfinite(loss) and {"mlm_acc", "nsp_acc"} <= set(metrics)
    with pytest.raises(ValueError, match="masking must be 'token' or 'span', got 'spans'"):
        StreamSpec(**{**spec, "masking": "spans"})
    with pytest.raises(ValueError, match="span max_len must be >= 1, got 0"):
        StreamSpec(**{**spec, "span_max": 0})


def test_vocab_size_comes_from_the_shards_tokenizer(bbc):
    from sslscale.train import config
    from sslscale.train.build import resolve_data_kwargs

    base = [
        "model.encoder=bert",
        "objective.name=bert",
        f"data.shards={bbc}",
        "data.pipeline=nsp",
        "model.encoder_kwargs={dim: 32, depth: 1, heads: 2}",
    ]
    cfg = config.load(None, base)  # no vocab_size: the data supplies it
    assert "vocab_size" not in cfg.model.encoder_kwargs
    tokens = T.load_tokenizer(bbc / "tokenizer.json").get_vocab_size()
    assert resolve_data_kwargs(cfg).model.encoder_kwargs["vocab_size"] == tokens == 1500
    small = config.load(None, [*base, "model.encoder_kwargs.vocab_size=100"])
    with pytest.raises(config.ConfigError, match="vocab_size=100 is smaller than the 1500 tokens"):
        resolve_data_kwargs(small)
    missing = config.load(None, [*base[:2], "data.shards=/nonexistent/shards", *base[3:]])
    with pytest.raises(config.ConfigError, match=r"vocab_size comes from the tokenizer of data\.shards='/nonexistent"):
        resolve_data_kwargs(missing)
    with pytest.raises(config.ConfigError, match=r"needs \['vocab_size'\]"):  # image data supplies none
        config.load(None, [*base[:4], "data.pipeline=labeled", base[4]])


def test_tfidf_baseline_matches_the_formula():
    """sslscale.bench.bert_bbc's bag of words: (1 + log tf) x (log((1 + N) / (1 + df)) + 1), rows L2-normalised;
    words of the test texts outside the training vocabulary are dropped."""
    from sslscale.bench.bert_bbc import tfidf

    train = ["Apple apple banana", "banana cherry", "apple cherry cherry cherry"]
    tr, te = tfidf(train, ["cherry durian"], min_df=1)
    docs = [t.lower().split() for t in train]
    vocab = sorted({w for d in docs for w in d}, key=lambda w: (-sum(w in d for d in docs), w))
    idf = {w: math.log(4 / (1 + sum(w in d for d in docs))) + 1 for w in vocab}
    for row, d in zip(tr, docs):
        want = torch.tensor([(1 + math.log(d.count(w))) * idf[w] if w in d else 0.0 for w in vocab])
        torch.testing.assert_close(row, want / want.norm())
    assert torch.equal(te[0] != 0, torch.tensor([w == "cherry" for w in vocab]))
