"""Text side of the streams: a byte-level BPE tokenizer (HF `tokenizers`, trained offline on the corpus) and the
batch builders for MLM, NSP, causal-LM packing and labelled classification.

All randomness comes from the `torch.Generator` passed in (the stream seeds one per batch), so a resumed stream
reproduces the same masks and pairs.

Conventions:
- special tokens have fixed ids: [PAD]=0, [CLS]=1, [SEP]=2, [MASK]=3, [EOS]=4, [UNK]=5; ordinary tokens >= 6.
- MLM labels are the original id at selected positions and -100 elsewhere; specials and padding are never selected.
  Selection is BERT's (each ordinary token with probability mask_prob) or SpanBERT's contiguous spans
  (`SpanMasking`: geometric lengths, an exact per-row budget, one 80/10/10 treatment per span).
- NSP follows BERT/HF: next_sentence_label 0 = segment B continues A, 1 = B comes from another document.
- CLM blocks are cut from the concatenation `doc0 [EOS] doc1 [EOS] ...` of one worker's documents in stream
  order; `labels` equals `input_ids` (the model shifts by one, HF convention) and attention crosses documents
  (GPT-2 style packing: [EOS] tells the model a new document starts).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

PAD, CLS, SEP, MASK, EOS, UNK = "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[EOS]", "[UNK]"
# the roles Hugging Face tokenizers give them (tokenizer_config.json / special_tokens_map.json)
HF_SPECIAL_TOKENS = {
    "pad_token": PAD,
    "cls_token": CLS,
    "sep_token": SEP,
    "mask_token": MASK,
    "eos_token": EOS,
    "unk_token": UNK,
}
SPECIAL_TOKENS = [PAD, CLS, SEP, MASK, EOS, UNK]
PAD_ID, CLS_ID, SEP_ID, MASK_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL = len(SPECIAL_TOKENS)
IGNORE = -100


def train_tokenizer(texts: list[str], path: str | os.PathLike, vocab_size: int = 8000):
    """Train a byte-level BPE on `texts` and save it to `path`; returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    _check_specials(tok, path)
    tok.save(str(path))
    write_hf_config(Path(path).parent)
    return tok


def write_hf_config(directory: str | os.PathLike) -> None:
    """`tokenizer_config.json` + `special_tokens_map.json` beside `tokenizer.json`, so that
    `transformers.AutoTokenizer.from_pretrained(directory)` (a PreTrainedTokenizerFast) knows which tokens are
    pad / cls / sep / mask / eos / unk. Ids come without special tokens (no post-processor): the pipelines add
    [CLS] / [SEP] / [EOS] themselves."""
    directory = Path(directory)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        **HF_SPECIAL_TOKENS,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (directory / "special_tokens_map.json").write_text(json.dumps(HF_SPECIAL_TOKENS, indent=1))


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer {path} not found (written by `sslscale shards` for text sources)")
    tok = Tokenizer.from_file(str(path))
    _check_specials(tok, path)
    return tok


def _check_specials(tok, path) -> None:
    for expected, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != expected:
            raise ValueError(f"tokenizer {path}: {name} must have id {expected}, has {tok.token_to_id(name)}")


def _randint(high: int, gen: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=gen)) if high > 1 else 0


def _window(ids: list[int], length: int, gen: torch.Generator) -> list[int]:
    """A random `length`-token window of a longer document (so long documents are not always cut the same)."""
    if len(ids) <= length:
        return ids
    start = _randint(len(ids) - length + 1, gen)
    return ids[start : start + length]


CHARS_PER_TOKEN_BOUND = 6  # measured 3.1-4.1 chars per token on these corpora; a shorter window only pads


def tokenize_windows(tokenizer, texts: list[str], max_tokens: int, gen: torch.Generator | None) -> list[list[int]]:
    """Token ids of a window of each text: a random one (`gen`) or the start (`gen=None`). Only a character
    window of `max_tokens * CHARS_PER_TOKEN_BOUND` chars, starting at a word boundary, is tokenized: long
    articles would otherwise cost several times more tokenizer time than the tokens kept."""
    max_chars = max_tokens * CHARS_PER_TOKEN_BOUND
    pieces = []
    for t in texts:
        if len(t) > max_chars:
            start = _randint(len(t) - max_chars + 1, gen) if gen is not None else 0
            if start:
                space = t.find(" ", start, start + 64)
                start = space + 1 if space >= 0 else start
            t = t[start : start + max_chars]
        pieces.append(t)
    return [e.ids for e in tokenizer.encode_batch(pieces)]


def _pad(rows: list[list[int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), seq_len), PAD_ID, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return ids, (ids != PAD_ID).long()


def caption_ids(tokenizer, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] text [EOS] [PAD]...` rows of seq_len (text cut to seq_len - 2 tokens) and their attention mask:
    the one layout of captions, for training (the `image_text` pipeline) and for zero-shot prompts alike."""
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 ([CLS], a token, [EOS]), got {seq_len}")
    rows = [[CLS_ID] + e.ids[: seq_len - 2] + [EOS_ID] for e in tokenizer.encode_batch(texts)]
    ids = torch.full((len(rows), seq_len), PAD_ID, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return ids, (ids != PAD_ID).long()


def mask_tokens(
    input_ids: torch.Tensor, vocab_size: int, gen: torch.Generator, mask_prob: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: select `mask_prob` of the non-special tokens; of those 80% -> [MASK], 10% -> a random
    ordinary token, 10% unchanged. Returns (masked ids, labels with -100 at unselected positions)."""
    maskable = input_ids >= NUM_SPECIAL
    selected = (torch.rand(input_ids.shape, generator=gen) < mask_prob) & maskable
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    action = torch.rand(input_ids.shape, generator=gen)
    random_ids = torch.randint(NUM_SPECIAL, vocab_size, input_ids.shape, generator=gen)
    out = torch.where(selected & (action < 0.8), torch.full_like(input_ids, MASK_ID), input_ids)
    out = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, out)
    return out, labels


@dataclass(frozen=True)
class SpanMasking:
    """SpanBERT's (Joshi et al. 2020) span selection: span lengths drawn from a geometric distribution of
    parameter `p` truncated at `max_len` (P(l) proportional to p (1 - p)^(l - 1), l = 1..max_len: mean 3.8 for
    p = 0.2, max_len = 10, as their implementation renormalises it)."""

    p: float = 0.2
    max_len: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.p <= 1:
            raise ValueError(f"span p must be in (0, 1], got {self.p}")
        if self.max_len < 1:
            raise ValueError(f"span max_len must be >= 1, got {self.max_len}")


def span_lengths(n: int, spans: SpanMasking, gen: torch.Generator) -> torch.Tensor:
    """`n` span lengths (int64) from the truncated geometric distribution of `spans`."""
    k = torch.arange(spans.max_len, dtype=torch.float64)
    weights = spans.p * (1 - spans.p) ** k
    return torch.multinomial(weights / weights.sum(), n, replacement=True, generator=gen) + 1


def mask_spans(
    input_ids: torch.Tensor, vocab_size: int, gen: torch.Generator, mask_prob: float, spans: SpanMasking
) -> tuple[torch.Tensor, torch.Tensor]:
    """Span masking: per row, round(`mask_prob` x its ordinary tokens) are selected as contiguous spans. Each
    span starts at a uniformly drawn unselected ordinary token and runs right for its drawn length, stopping at
    a special token, at an already selected token, or when the row's budget is met. As in SpanBERT, each span as
    a whole becomes [MASK] (80%), random ordinary tokens (10%) or stays (10%). Returns (ids, labels)."""
    maskable = input_ids >= NUM_SPECIAL
    rows, width = input_ids.shape
    selected = torch.zeros_like(maskable)
    action = torch.zeros(input_ids.shape, dtype=torch.float64)  # the span's draw, at each of its positions
    budgets = (mask_prob * maskable.sum(1).double()).round().long().tolist()
    for r in range(rows):
        budget = budgets[r]
        if budget == 0:
            continue
        lengths = span_lengths(budget, spans, gen).tolist()  # enough: every span selects >= 1 token
        anchors = torch.rand(budget, generator=gen, dtype=torch.float64).tolist()
        actions = torch.rand(budget, generator=gen, dtype=torch.float64).tolist()
        ok, taken = maskable[r].tolist(), [False] * width
        done = 0
        for length, u, a in zip(lengths, anchors, actions):
            free = [i for i in range(width) if ok[i] and not taken[i]]
            i = free[int(u * len(free))]
            end = min(i + length, width)
            while i < end and ok[i] and not taken[i] and done < budget:
                taken[i] = True
                action[r, i] = a
                done += 1
                i += 1
            if done == budget:
                break
        selected[r] = torch.tensor(taken)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    random_ids = torch.randint(NUM_SPECIAL, vocab_size, input_ids.shape, generator=gen)
    out = torch.where(selected & (action < 0.8), torch.full_like(input_ids, MASK_ID), input_ids)
    out = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, out)
    return out, labels


def apply_masking(
    ids: torch.Tensor, vocab_size: int, gen: torch.Generator, mask_prob: float, spans: SpanMasking | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's token masking (`spans=None`) or span masking."""
    if spans is None:
        return mask_tokens(ids, vocab_size, gen, mask_prob)
    return mask_spans(ids, vocab_size, gen, mask_prob, spans)


def mlm_batch(
    docs: list[list[int]],
    seq_len: int,
    vocab_size: int,
    gen: torch.Generator,
    mask_prob: float = 0.15,
    spans: SpanMasking | None = None,
) -> dict:
    """[CLS] window [SEP] [PAD]... per document, then masking (of tokens, or of spans when `spans` is set)."""
    rows = [[CLS_ID] + _window(d, seq_len - 2, gen) + [SEP_ID] for d in docs]
    ids, attention = _pad(rows, seq_len)
    masked, labels = apply_masking(ids, vocab_size, gen, mask_prob, spans)
    return {"input_ids": masked, "attention_mask": attention, "labels": labels}


def nsp_batch(
    docs: list[list[int]],
    seq_len: int,
    vocab_size: int,
    gen: torch.Generator,
    mask_prob: float = 0.15,
    spans: SpanMasking | None = None,
) -> dict:
    """Sentence pairs `[CLS] A [SEP] B [SEP]`: exactly half the rows (rounded down) take B from the next
    document in the batch (another document), the others from the continuation of A; then MLM masking."""
    n = len(docs)
    budget = seq_len - 3
    random_rows = set(torch.randperm(n, generator=gen)[: n // 2].tolist()) if n > 1 else set()
    halves = []
    for d in docs:
        d = _window(d, budget, gen)
        cut = 1 + _randint(max(len(d) - 1, 1), gen) if len(d) > 1 else len(d)
        halves.append((d[:cut], d[cut:]))
    rows, types, labels = [], [], []
    for i in range(n):
        a = halves[i][0]
        b = halves[(i + 1) % n][1] if i in random_rows else halves[i][1]
        b = b[: max(budget - len(a), 0)]
        rows.append([CLS_ID] + a + [SEP_ID] + b + [SEP_ID])
        types.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
        labels.append(1 if i in random_rows else 0)
    ids, attention = _pad(rows, seq_len)
    token_types = torch.zeros_like(ids)
    for i, t in enumerate(types):
        token_types[i, : len(t)] = torch.tensor(t)
    masked, mlm_labels = apply_masking(ids, vocab_size, gen, mask_prob, spans)
    return {
        "input_ids": masked,
        "attention_mask": attention,
        "labels": mlm_labels,
        "token_type_ids": token_types,
        "next_sentence_label": torch.tensor(labels, dtype=torch.int64),
    }


def classify_batch(docs: list[list[int]], labels: list[int], seq_len: int) -> dict:
    rows = [[CLS_ID] + d[: seq_len - 2] + [SEP_ID] for d in docs]
    ids, attention = _pad(rows, seq_len)
    return {"input_ids": ids, "attention_mask": attention, "label": torch.tensor(labels, dtype=torch.int64)}


def clm_batch(blocks: list[list[int]]) -> dict:
    ids = torch.tensor(blocks, dtype=torch.int64)
    return {"input_ids": ids, "labels": ids.clone()}
