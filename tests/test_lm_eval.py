"""Held-out bits per character (`sslscale.adapt.lm_eval`): sliding windows score every target exactly once with
the promised context; the total equals a plain full-logits cross-entropy over the same windows; 2 ranks splitting
the windows give the 1-rank total; the pretraining hook writes eval.jsonl."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslscale.adapt.lm_eval import (
    IGNORE_INDEX,
    evaluate_texts,
    passage_stream,
    score_windows,
    sliding_windows,
)
from sslscale.data.text import EOS_ID, train_tokenizer
from sslscale.models import build_encoder
from tests.dist_utils import run_distributed

TEXTS = [
    "Hamlet: to be or not to be, that is the question.",
    "Ophelia: good my lord, how does your honour?",
    "Polonius: though this be madness, yet there is method in it.",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(TEXTS * 10, tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=90)


def _model(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_encoder("gpt", vocab_size=vocab, max_seq_len=32, dim=64, depth=2, heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize(("n", "seq_len", "stride"), [(50, 16, 8), (50, 16, 16), (17, 16, 5), (9, 16, None)])
def test_windows_score_every_target_once_with_context(n, seq_len, stride):
    stream = list(range(100, 100 + n))
    windows = sliding_windows(stream, seq_len, stride)
    scored = []
    for w in windows:
        assert len(w.ids) == len(w.targets) <= seq_len
        first = w.ids[0]
        for j, t in enumerate(w.targets):
            if t != IGNORE_INDEX:
                assert t == first + j + 1  # the next token of the window's input
                scored.append(t)
                if w is not windows[0]:
                    assert j >= seq_len - (stride or seq_len // 2) or len(w.ids) < seq_len  # enough context
    assert scored == stream[1:]


def test_passage_stream_counts_one_char_per_separator(tokenizer):
    stream, chars = passage_stream(tokenizer, TEXTS)
    assert chars == sum(map(len, TEXTS)) + len(TEXTS)
    assert stream[0] == EOS_ID and stream[-1] == EOS_ID and stream.count(EOS_ID) == len(TEXTS) + 1
    assert tokenizer.decode([t for t in stream if t != EOS_ID]).replace(" ", "") == "".join(TEXTS).replace(" ", "")


def test_bits_per_char_equals_plain_cross_entropy_over_the_windows(tokenizer):
    model = _model(tokenizer.get_vocab_size())
    result = evaluate_texts(model, TEXTS, tokenizer, seq_len=16, stride=16, batch_size=3)
    stream, chars = passage_stream(tokenizer, TEXTS)
    total = 0.0
    with torch.no_grad():
        for begin in range(0, len(stream) - 1, 16):  # non-overlapping windows, every target scored
            x = torch.tensor(stream[begin : begin + 16])
            y = torch.tensor(stream[begin + 1 : begin + 17])
            logits = model(x[None, : len(y)])[0]
            total += float(F.cross_entropy(logits, y, reduction="sum"))
    assert result["tokens"] == len(stream) - 1 and result["chars"] == chars
    assert result["bits_per_char"] == pytest.approx(total / math.log(2) / chars, rel=1e-5)
    overlapping = evaluate_texts(model, TEXTS, tokenizer, seq_len=16, stride=4)
    assert overlapping["tokens"] == result["tokens"]  # same targets, more context each
    assert overlapping["bits_per_char"] != pytest.approx(result["bits_per_char"], rel=1e-6)


def test_bad_windows_are_named():
    with pytest.raises(ValueError, match="stride=0"):
        sliding_windows([1, 2, 3], 4, 0)
    with pytest.raises(ValueError, match="no next-token target"):
        sliding_windows([1], 4)


def _split(rank, world, vocab, windows):
    return score_windows(_model(vocab), windows, batch_size=2, rank=rank, world_size=world)


@pytest.mark.dist
def test_two_ranks_splitting_the_windows_equal_one(tokenizer):
    stream, _ = passage_stream(tokenizer, TEXTS)
    windows = sliding_windows(stream, 16, 8)  # a rank short of batches repeats one, ignored
    vocab = tokenizer.get_vocab_size()
    one = score_windows(_model(vocab), windows, batch_size=2)
    for nll, count in run_distributed(_split, 2, vocab, windows):
        assert count == one[1]
        assert nll == pytest.approx(one[0], rel=1e-6)
