"""What a run reports while it trains: one JSON line per logged step (stdout and RUN_DIR/metrics.jsonl; strict
JSON, non-finite numbers as null), optional tensorboard scalars (`pip install -e .[tensorboard]`), a tqdm bar on
interactive terminals only, with the JSON lines printed above it (tqdm.write) and the loss / probe accuracy beside
it, memory, MFU for Transformers, and an online kNN probe of the encoder's features."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F


def memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated on CUDA; the process's resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def batch_tokens(batch: dict) -> int | None:
    """Tokens in a text batch (non-padding when an attention mask is present), None for other batches."""
    if "attention_mask" in batch and isinstance(batch["attention_mask"], torch.Tensor):
        return int(batch["attention_mask"].sum())
    for key in ("input_ids", "tokens"):
        if key in batch and isinstance(batch[key], torch.Tensor):
            return int(batch[key].numel())
    return None


def transformer_flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token of a Transformer: 6N for the weights plus 12 L H Q T for attention (the
    nanoGPT / PaLM appendix B estimate; forward + backward)."""
    return 6.0 * n_params + 12.0 * n_layer * n_head * head_dim * seq_len


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak (e.g. 989e12 for H100 bf16)."""
    return flops_per_token * tokens_per_s / peak_flops


class Throughput:
    """Samples, tokens and step time accumulated since the last logged step."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.seconds, self.steps, self.samples, self.tokens = 0.0, 0, 0, 0

    def add(self, samples: int, tokens: int | None) -> None:
        self.samples += samples
        self.tokens += tokens or 0

    def tick(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def rates(self) -> dict:
        """samples/s, tokens/s (text batches only), mean step time; then starts a new window."""
        out = {
            "samples_per_s": self.samples / self.seconds if self.seconds else None,
            "step_time_s": self.seconds / self.steps if self.steps else None,
        }
        if self.tokens:
            out["tokens_per_s"] = self.tokens / self.seconds
        self._reset()
        return out


# record key -> (label beside the progress bar, decimals)
_POSTFIX = (("loss", "loss", 4), ("probe_acc", "probe", 3))


def _strict(record: dict) -> dict:
    """The record with non-finite floats as None (JSON has no NaN; `json.loads` elsewhere may reject it)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class Monitor:
    """Rank 0 writes; other ranks keep quiet."""

    def __init__(
        self,
        run_dir: str | Path,
        rank: int,
        total_steps: int,
        tensorboard: bool = False,
        progress: bool = True,
        start_step: int = 0,
        echo: bool = True,
        resumed: bool = False,
    ) -> None:
        self.rank = rank
        self.echo = echo
        self._file: TextIO | None = None
        self._tb: Any = None  # torch.utils.tensorboard.SummaryWriter
        self._bar: Any = None  # tqdm.tqdm
        if rank != 0:
            return
        if resumed:
            drop_after(Path(run_dir) / "metrics.jsonl", start_step)
        self._file = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115  (closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                print(
                    "[sslscale] logging.tensorboard is on but tensorboard is not installed; skipping it",
                    file=sys.stderr,
                )
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        line = json.dumps(_strict(record), allow_nan=False)
        if self._file is not None:
            self._file.write(line + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, record["step"])
        if self._bar is not None:
            postfix = {
                name: f"{record[key]:.{digits}f}"
                for key, name, digits in _POSTFIX
                if isinstance(record.get(key), float)
            }
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            if self.echo:  # above the bar, which is redrawn below the line
                self._bar.write(line, file=sys.stdout)
        elif self.echo:
            print(line, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        for obj in (self._bar, self._tb, self._file):
            if obj is not None:
                obj.close()


@torch.no_grad()
def features(
    encoder: torch.nn.Module,
    x: torch.Tensor,
    batch_size: int = 512,
    cast: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> torch.Tensor:
    """Encoder outputs of `x` in eval mode, fp32 on CPU. Called on every rank with the same `x` under ZeRO-3 so
    each module's gathered parameters are collected collectively."""
    was_training = encoder.training
    encoder.eval()
    try:
        out = [encoder(cast(x[i : i + batch_size])).float().flatten(1).cpu() for i in range(0, len(x), batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def knn_accuracy(
    bank: torch.Tensor,
    bank_y: torch.Tensor,
    query: torch.Tensor,
    query_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Weighted kNN (cosine similarity, votes exp(s / T), as in InstDisc/DINO) accuracy of query labels."""
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    k = min(k, len(bank))
    classes = int(max(bank_y.max(), query_y.max())) + 1
    correct = 0
    for i in range(0, len(query), 1024):
        sim, idx = (query[i : i + 1024] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), classes).scatter_add_(1, bank_y[idx].long(), (sim / temperature).exp())
        correct += int((votes.argmax(1) == query_y[i : i + 1024].long()).sum())
    return correct / len(query)


def drop_after(path: Path, step: int) -> int:
    """Remove the lines of `path` logged after `step` (a resumed run recomputes those steps and logs them again;
    kept, each would appear twice). Atomic; returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            later = json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError, TypeError):
            later = False  # not ours to judge: keep it
        if later:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        print(
            f"[sslscale] {path}: dropped {dropped} line(s) logged after step {step} (recomputed by this resume)",
            file=sys.stderr,
            flush=True,
        )
    return dropped


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
