"""GPT (Radford et al. 2018/2019): causal language modelling, next-token cross-entropy over the global batch.

The encoder is a `sslscale.models.GPT` (or any module with the same `hidden_states(ids)` / `lm_head(h, targets,
reduction=...)` API). The loss goes through the model's chunked LM head (`sslscale.models.lm_loss`), so the
tokens x vocabulary logits never exist at once; the head is called as a module, which is what makes DeepSpeed
ZeRO-3 gather its tied, partitioned weight (see `sslscale/models/lm_loss.py`).

Targets follow the Hugging Face convention of the `clm` pipeline: `labels` equal `input_ids` and position t
predicts labels[t + 1] (the last position of a row predicts nothing); -100 marks a label without a loss, and an
`attention_mask` (right padding) turns its zeros into -100 as well.

Normalisation (why a collective is here): DeepSpeed averages gradients over ranks, so a loss that is each rank's
own token mean weighs a token of a rank with few valid targets more than one of a rank with many. This objective
returns `world_size x (sum of this rank's token losses) / (valid targets of all ranks)`, one all-reduce of two
numbers per micro-batch, so that the averaged gradient is exactly that of the mean over every valid target of the
global micro-batch (equal to the per-rank mean when every rank has as many targets, as packed `clm` blocks do).

Metrics (global over ranks): `loss` (the mean token NLL in nats), `perplexity` (exp of it), `tokens` (valid
targets in the global micro-batch). The engine's monitor reports tokens/s from the batch's `input_ids`.
`sslscale export` writes the whole GPT (embeddings, blocks, tied head): the encoder here is the full model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sslscale.objectives.base import Objective

IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets with targets[:, t] = labels[:, t + 1] and IGNORE_INDEX in the last column
    and wherever `attention_mask` is 0 at the predicted position."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, T) token ids, got shape {tuple(labels.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != labels.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, labels {tuple(labels.shape)}: they must match"
            )
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


class GPTObjective(Objective):
    """Next-token prediction; `forward(batch)` reads `input_ids` (and `labels`, `attention_mask` when present)."""

    batch_keys = ("input_ids",)

    def __init__(self, encoder: nn.Module, global_token_mean: bool = True) -> None:
        super().__init__(encoder)
        for attr in ("hidden_states", "lm_head"):
            if not hasattr(encoder, attr):
                raise TypeError(
                    f"the gpt objective needs a causal LM encoder with `{attr}` (e.g. model.encoder: "
                    f"gpt), got {type(encoder).__name__}"
                )
        self.global_token_mean = bool(global_token_mean)  # False: each rank's own token mean (no collective)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        ids = batch["input_ids"]
        if ids.dtype != torch.int64:
            raise TypeError(f"input_ids must be int64 token ids, got {ids.dtype}")
        targets = next_token_targets(batch.get("labels", ids), batch.get("attention_mask"))
        hidden = self.encoder.hidden_states(ids)
        total = self.encoder.lm_head(hidden, targets, reduction="sum")  # fp32, 0-d
        stats = torch.stack([total.detach(), (targets != IGNORE_INDEX).sum().to(total.dtype)])
        world = 1
        if self.global_token_mean and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            if world > 1:
                dist.all_reduce(stats)
        global_sum, global_count = stats[0], stats[1].clamp(min=1)
        loss = total * (world / global_count)
        mean_nll = global_sum / global_count
        metrics = {"loss": mean_nll, "perplexity": mean_nll.exp(), "tokens": stats[1]}
        return loss, metrics
