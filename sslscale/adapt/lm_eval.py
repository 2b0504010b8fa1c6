"""Held-out language-model quality in bits per character: total NLL over total characters, so that models with
different tokenizers (characters, small or large BPE) compare on one scale.

Scored text: the held-out passages in the layout training packs them, `[EOS] p0 [EOS] p1 ... pK [EOS]`; every
token after the first [EOS] is predicted, and each [EOS] counts as one character (the separator a text file of the
passages would hold), so characters = sum(len(p)) + K + 1. Long streams are scored in windows of `seq_len` tokens
moved by `stride` (default half a window): each window scores only the targets the previous one did not, so every
target after the first window sees at least `seq_len - stride` tokens of context (the sliding-window evaluation of
Hugging Face's perplexity guide).

Used three ways: `evaluate_texts(model, texts, tokenizer)` (a plain function for the adapt runner), the pretraining
callback `BitsPerChar` (a probe-like hook logging RUN_DIR/eval.jsonl against training wall-clock), and
`sslscale lm-eval MODEL --shards DIR` on an exported model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sslscale.data.text import EOS_ID
from sslscale.train.callbacks import Callback

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Window:
    """One scored window: input ids, next-token targets (IGNORE_INDEX where an earlier window scored it)."""

    ids: list[int]
    targets: list[int]


def passage_stream(tokenizer: Any, texts: list[str]) -> tuple[list[int], int]:
    """(`[EOS] p0 [EOS] ... pK [EOS]` token ids, characters they encode with each [EOS] counted as one)."""
    if not texts:
        raise ValueError("no texts to score")
    ids = [EOS_ID]
    for encoding in tokenizer.encode_batch(list(texts)):
        ids.extend(encoding.ids)
        ids.append(EOS_ID)
    return ids, sum(len(t) for t in texts) + len(texts)


def sliding_windows(stream: list[int], seq_len: int, stride: int | None = None) -> list[Window]:
    """Windows over `stream` scoring every target stream[1:] exactly once (see the module docstring)."""
    stride = seq_len // 2 if stride is None else stride
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 1 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    if len(stream) < 2:
        raise ValueError(f"a stream of {len(stream)} token(s) has no next-token target")
    last = len(stream) - 1  # targets are stream[1..last]
    windows, begin, scored = [], 0, 0
    while scored < last:
        end = min(begin + seq_len, last)
        targets = stream[begin + 1 : end + 1]
        skip = max(0, scored - begin)  # targets up to stream[scored] were scored by an earlier window
        windows.append(Window(stream[begin:end], [IGNORE_INDEX] * skip + targets[skip:]))
        scored = end
        begin += stride
    return windows


@torch.no_grad()
def score_windows(
    model: nn.Module, windows: list[Window], *, batch_size: int = 16, rank: int = 0, world_size: int = 1
) -> tuple[float, int]:
    """(total NLL in nats, targets scored) of `windows` under `model(ids, targets, reduction="sum")`.

    With `world_size > 1` rank r scores every world_size-th batch and the totals are all-reduced; every rank runs
    the same number of forwards (short ranks repeat a batch with its targets ignored), so a ZeRO-3 model's
    collective parameter gathers stay matched."""
    param = next(model.parameters())
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    rounds = math.ceil(len(batches) / world_size)
    total = torch.zeros(2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for r in range(rounds):
            index = r * world_size + rank
            batch, counts = (batches[index], True) if index < len(batches) else (batches[0], False)
            width = max(len(w.ids) for w in batch)
            ids = torch.full((len(batch), width), EOS_ID, dtype=torch.int64)
            targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.int64)
            for i, w in enumerate(batch):
                ids[i, : len(w.ids)] = torch.tensor(w.ids)
                if counts:
                    targets[i, : len(w.targets)] = torch.tensor(w.targets)
            nll = model(ids.to(param.device), targets.to(param.device), reduction="sum")
            total += torch.stack([nll.double().cpu(), (targets != IGNORE_INDEX).sum().double()])
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(total)
    return float(total[0]), int(total[1])


def evaluate_texts(
    model: nn.Module,
    texts: list[str],
    tokenizer: Any,
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """bits_per_char, nll_per_token (nats), tokens and chars of `texts` under the causal LM `model`."""
    seq_len = seq_len or int(getattr(model, "max_seq_len", 0)) or 256
    stream, chars = passage_stream(tokenizer, texts)
    nll, tokens = score_windows(
        model, sliding_windows(stream, seq_len, stride), batch_size=batch_size, rank=rank, world_size=world_size
    )
    return {"bits_per_char": nll / math.log(2) / chars, "nll_per_token": nll / tokens, "tokens": tokens, "chars": chars}


def load_texts(shards: str, max_passages: int | None = None) -> list[str]:
    """The `txt` of every sample of local shards (a directory with manifest.json, a manifest, tar paths), in shard
    and member order: the held-out passages, read whole (no shuffling, nothing skipped)."""
    from sslscale.data.shardlist import resolve_shards

    infos, _, _ = resolve_shards(shards)
    texts: list[str] = []
    for info in infos:
        if info.local is None:
            raise ValueError(f"held-out shards must be local files, got {info.url!r}")
        with tarfile.open(info.local) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    texts.append(tar.extractfile(member).read().decode("utf-8"))
                    if max_passages is not None and len(texts) >= max_passages:
                        return texts
    if not texts:
        raise ValueError(f"no .txt samples in {shards!r}")
    return texts


class BitsPerChar(Callback):
    """Pretraining hook: every `every` steps (and at the last), bits/char of the held-out passages in `shards`
    (at most `max_passages` of them), appended by rank 0 to RUN_DIR/eval.jsonl with the training wall-clock so far
    (evaluation time excluded). Every rank scores its share (see `score_windows`)."""

    def __init__(
        self,
        shards: str,
        every: int = 100,
        max_passages: int | None = None,
        stride: int | None = None,
        batch_size: int = 16,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.shards, self.every, self.stride, self.batch_size = shards, every, stride, batch_size
        self.texts = load_texts(shards, max_passages)
        self.started = time.perf_counter()
        self.eval_seconds = 0.0
        self.tokenizer: Any = None

    def on_step_end(self, session: Any, step: int, record: dict | None) -> None:
        if step % self.every and step != session.cfg.schedule.total_steps:
            return
        from sslscale.data.text import load_tokenizer
        from sslscale.train.build import data_tokenizer_path

        t0 = time.perf_counter()
        train_s = t0 - self.started - self.eval_seconds
        if self.tokenizer is None:
            path = data_tokenizer_path(session.cfg.data)
            if path is None:
                raise ValueError(
                    "BitsPerChar needs the training data's tokenizer (data.tokenizer, or text shards "
                    "with a tokenizer.json)"
                )
            self.tokenizer = load_tokenizer(path)
        result = evaluate_texts(
            session.engine.module.encoder,
            self.texts,
            self.tokenizer,
            stride=self.stride,
            batch_size=self.batch_size,
            rank=session.rank,
            world_size=session.world,
        )
        self.eval_seconds += time.perf_counter() - t0
        line = {
            "step": step,
            "train_s": round(train_s, 1),
            "val_bits_per_char": result["bits_per_char"],
            "val_nll_per_token": result["nll_per_token"],
            "val_chars": result["chars"],
            "eval_s": round(time.perf_counter() - t0, 1),
        }
        if session.rank == 0:
            with open(Path(session.run_dir) / "eval.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            print(json.dumps({"eval": line}), flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an exported causal LM (.safetensors from `sslscale export`)")
    parser.add_argument("--shards", required=True, help="held-out text shards (e.g. data-cache/shakespeare-test)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one beside the shards)")
    parser.add_argument("--max-passages", type=int, default=None, help="score only the first N passages")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's)")
    parser.add_argument("--stride", type=int, default=None, help="window stride (default: half a window)")


def run(args: argparse.Namespace) -> int:
    from sslscale.data.text import load_tokenizer
    from sslscale.models import load_encoder

    try:
        model = load_encoder(args.model)
        tok_path = args.tokenizer or str(Path(args.shards) / "tokenizer.json")
        result = evaluate_texts(
            model,
            load_texts(args.shards, args.max_passages),
            load_tokenizer(tok_path),
            seq_len=args.seq_len,
            stride=args.stride,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"sslscale lm-eval: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
