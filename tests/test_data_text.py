"""Text pipelines: MLM masking statistics, NSP pairs, CLM packing against an independent re-packing, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sslscale.data import StreamSpec, build_stream
from sslscale.data import text as T

from .data_helpers import shards, tar_samples


@pytest.fixture(scope="module")
def bbc(tmp_path_factory) -> Path:
    return shards(tmp_path_factory, "bbc-news", "train", per_shard=30, limit=120, vocab_size=1500)


def test_mask_tokens_statistics():
    gen = torch.Generator().manual_seed(0)
    vocab = 1000
    ids = torch.randint(T.NUM_SPECIAL, vocab, (256, 128), generator=gen)
    ids[:, 0], ids[:, -1], ids[:, 60:70] = T.CLS_ID, T.SEP_ID, T.PAD_ID
    masked, labels = T.mask_tokens(ids, vocab, gen, 0.15)
    special = ids < T.NUM_SPECIAL
    selected = labels != T.IGNORE
    assert not (selected & special).any(), "special tokens must never be masked"
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(labels[selected], ids[selected])
    rate = selected.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.01, rate
    n = selected.sum().item()
    to_mask = (masked[selected] == T.MASK_ID).sum().item() / n
    kept = (masked[selected] == ids[selected]).sum().item() / n
    randomised = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.02 and abs(randomised - 0.1) < 0.02
    assert (masked[selected & (masked != T.MASK_ID)] >= T.NUM_SPECIAL).all(), "random tokens are never specials"
    assert torch.equal(masked[~selected], ids[~selected])


def test_mlm_and_nsp_streams(bbc):
    mlm = next(
        iter(build_stream(StreamSpec(shards=str(bbc), pipeline="mlm", batch_size=16, num_workers=0, seq_len=64)))
    )
    assert mlm["input_ids"].shape == (16, 64)
    assert (mlm["input_ids"][:, 0] == T.CLS_ID).all()
    real = mlm["attention_mask"].bool()
    assert ((mlm["labels"] != T.IGNORE) <= real).all(), "padding is never a target"
    assert (mlm["input_ids"][~real] == T.PAD_ID).all()

    stream = build_stream(StreamSpec(shards=str(bbc), pipeline="nsp", batch_size=16, num_workers=0, seq_len=64))
    for batch in stream:
        assert batch["next_sentence_label"].sum() == 8, "exactly half the pairs are random"
        ids, types = batch["input_ids"], batch["token_type_ids"]
        unmasked_sep = (ids == T.SEP_ID) | (batch["labels"] == T.SEP_ID)
        assert (unmasked_sep.sum(1) == 2).all(), "[CLS] A [SEP] B [SEP]"
        for row in range(16):
            seps = unmasked_sep[row].nonzero().flatten()
            assert (types[row, : seps[0] + 1] == 0).all() and (types[row, seps[0] + 1 : seps[1] + 1] == 1).all()
            assert (types[row, seps[1] + 1 :] == 0).all() and (ids[row, seps[1] + 1 :] == T.PAD_ID).all()


def test_nsp_pairs_come_from_the_right_documents():
    gen = torch.Generator().manual_seed(0)
    docs = [[T.NUM_SPECIAL + 100 * d + i for i in range(20)] for d in range(6)]  # token // 100 = document
    batch = T.nsp_batch(docs, 64, 1000, gen, mask_prob=0.0)
    for row in range(6):
        ids = batch["input_ids"][row]
        seps = (ids == T.SEP_ID).nonzero().flatten()
        a, b = ids[1 : seps[0]], ids[seps[0] + 1 : seps[1]]
        doc_a = {(t - T.NUM_SPECIAL) // 100 for t in a.tolist()}
        doc_b = {(t - T.NUM_SPECIAL) // 100 for t in b.tolist()}
        assert doc_a == {row}
        if batch["next_sentence_label"][row] == 0:
            assert doc_b == {row} and b[0] == a[-1] + 1, "B must continue A"
        else:
            assert doc_b and row not in doc_b


def test_clm_blocks_are_the_eos_separated_token_stream(bbc):
    """Single reader, no shuffling: the blocks equal an independent packing of the shards' documents."""
    tok = T.load_tokenizer(bbc / "tokenizer.json")
    expected: list[int] = []
    for tar in sorted(bbc.glob("*.tar")):
        for fields in tar_samples(tar).values():
            expected += tok.encode(fields["txt"].decode()).ids + [T.EOS_ID]
    stream = build_stream(
        StreamSpec(shards=str(bbc), pipeline="clm", batch_size=4, num_workers=0, seq_len=64, shuffle=False)
    )
    got = []
    for batch in stream:
        assert torch.equal(batch["labels"], batch["input_ids"])
        got += batch["input_ids"].flatten().tolist()
    assert len(stream) == len(expected) // (4 * 64)
    assert got == expected[: len(got)]
    assert len(expected) - len(got) < 4 * 64, "only the tail shorter than one batch may be left out"


def test_clm_equal_batches_and_exact_resume(bbc):
    spec = dict(shards=str(bbc), pipeline="clm", batch_size=4, num_workers=2, seq_len=32, seed=3)
    lengths = {len(build_stream(StreamSpec(**spec), rank=r, world_size=2)) for r in range(2)}
    assert len(lengths) == 1
    reference = list(build_stream(StreamSpec(**spec), rank=1, world_size=2))
    stream = build_stream(StreamSpec(**spec), rank=1, world_size=2)
    it = iter(stream)
    for _ in range(5):
        next(it)
    state = stream.state_dict()
    assert any(s["carry"] for s in state["worker_states"].values()), "the test should cover a token carry"
    resumed = build_stream(StreamSpec(**spec), rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - 5
    for a, b in zip(reference[5:], rest):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_text_labeled_passes_labels(bbc):
    batch = next(
        iter(
            build_stream(StreamSpec(shards=str(bbc), pipeline="text_labeled", batch_size=8, num_workers=0, seq_len=32))
        )
    )
    assert batch["label"].dtype == torch.int64 and batch["label"].max() < 5
    assert (batch["input_ids"][:, 0] == T.CLS_ID).all() and batch["input_ids"].shape == (8, 32)
