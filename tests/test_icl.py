"""In-context learning: the prompt builder never sees (so never leaks) the query's label; label scoring equals a
plain per-sequence log-likelihood; the icl-rules source keeps every test rule out of the train sequences; the
curve is computed on the same queries at every shot count and plotted."""

from __future__ import annotations

import re

import pytest
import torch

from sslscale.adapt.icl import build_prompt, classify, icl_curve, label_scores, plot_curve
from sslscale.data import icl as rules
from sslscale.data.text import EOS_ID, train_tokenizer
from sslscale.models import build_encoder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(
        rules.sequences("train", 300), tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=300
    )


def _model(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_encoder("gpt", vocab_size=vocab, max_seq_len=64, dim=64, depth=2, heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def test_prompt_holds_the_shots_and_the_query_but_never_its_label():
    shots = [("K", "7"), ("B", "2")]
    assert build_prompt(shots, "K") == "K=7 B=2 K="
    assert build_prompt([], "W") == "W="
    prompt = build_prompt(shots, "Q", template="in: {x} out: {y}.", separator="\n")
    assert prompt == "in: K out: 7.\nin: B out: 2.\nin: Q out: "
    sentinel = "LABEL-SENTINEL"  # a query label that is nowhere else: the builder has no way to write it
    for template in ("{x}={y}", "Q: {x} A: {y}", "{x} -> {y};"):
        assert sentinel not in build_prompt(shots, "Q", template)
    with pytest.raises(ValueError, match="one \\{x\\} followed by one \\{y\\}"):
        build_prompt(shots, "Q", template="{y}={x}")


def test_label_scores_equal_a_plain_log_likelihood(tokenizer):
    model = _model(tokenizer.get_vocab_size())
    prompts, labels = ["K=7 B=2 K=", "W="], ["7", "2", "B=2"]  # "B=2": a label of several tokens
    scores = label_scores(model, tokenizer, prompts, labels, batch_size=4)
    for p, prompt in enumerate(prompts):
        for j, label in enumerate(labels):
            context = [EOS_ID, *tokenizer.encode(prompt).ids]
            target = tokenizer.encode(label).ids
            total, ids = 0.0, list(context)
            for t in target:  # token by token, the whole prefix recomputed
                with torch.no_grad():
                    logp = model(torch.tensor([ids]))[0, -1].log_softmax(-1)
                total += float(logp[t])
                ids.append(t)
            assert float(scores[p, j]) == pytest.approx(total, rel=1e-4, abs=1e-4)
    assert classify(model, tokenizer, prompts, labels) == scores.argmax(1).tolist()
    with pytest.raises(ValueError, match="need prompts and labels"):
        label_scores(model, tokenizer, [], labels)


def _mapping(sequence: str) -> rules.Rule:
    pairs = sorted(set(re.findall(r"([A-Z])=(\d)", sequence)))
    return rules.Rule(tuple(x for x, _ in pairs), tuple(y for _, y in pairs))


def test_no_test_rule_occurs_in_the_train_sequences():
    train = rules.sequences("train", 3000)
    test = rules.sequences("test", 300)
    assert train == rules.sequences("train", 3000)  # deterministic
    train_rules = {_mapping(s).key for s in train}
    for s in train:  # 16 examples of one rule: a function of the inputs, at most 3 of them
        rule = _mapping(s)
        assert len(set(rule.inputs)) == len(rule.inputs) <= rules.SET_SIZE and not rules.is_test_rule(rule)
    eps = rules.episodes("test", 200, 8)
    for rule, shots, (x, y) in eps:
        assert rules.is_test_rule(rule) and rule.key not in train_rules
        assert all(rule(a) == b for a, b in shots) and rule(x) == y
    assert all(rules.is_test_rule(_mapping(s)) for s in test if len(_mapping(s).inputs) == rules.SET_SIZE)


def test_curve_uses_the_same_queries_at_every_shot_count_and_plots(tokenizer, tmp_path):
    model = _model(tokenizer.get_vocab_size())
    eps = rules.episodes("test", 12, 4, seed=3)
    curve = icl_curve(model, tokenizer, eps, [0, 2, 4], list(rules.LABELS))
    assert sorted(curve) == [0, 2, 4] and all(0 <= v <= 1 for v in curve.values())
    k2 = [build_prompt(ex[:2], q[0]) for _, ex, q in eps]
    truth = [rules.LABELS.index(q[1]) for _, _, q in eps]
    pred = classify(model, tokenizer, k2, list(rules.LABELS))
    assert curve[2] == sum(p == t for p, t in zip(pred, truth)) / len(eps)
    with pytest.raises(ValueError, match="fewer than 5 examples"):
        icl_curve(model, tokenizer, eps, [5], list(rules.LABELS))
    png = plot_curve(curve, tmp_path / "icl.png", chance=0.1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
