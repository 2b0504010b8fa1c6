"""BERT pretraining (Devlin et al. 2019): masked-language modelling plus next-sentence prediction, trained jointly.

loss = mlm_loss + nsp_weight * nsp_loss, where
- mlm_loss: cross-entropy of the MLM head at the selected positions only (`labels` != -100; the `mlm` / `nsp`
  pipelines select 15% of the ordinary tokens, 80/10/10 [MASK]/random/kept, or SpanBERT spans with
  `data.masking: span`). Only the selected rows of the hidden states go through the head, through the chunked
  vocabulary loss (`sslscale.models.lm_loss`), so the (tokens x vocabulary) logits never exist at once;
- nsp_loss: cross-entropy of the NSP head on the pooled [CLS] feature against `next_sentence_label` (the `nsp`
  pipeline: 0 = B continues A, 1 = B from another document; its batches carry the MLM masks too).
  `nsp_weight: 0` trains MLM alone (RoBERTa-style) and accepts batches without NSP labels (the `mlm` pipeline).

Each rank's losses are means over its own masked tokens / pairs; DeepSpeed averages gradients over ranks, so the
global loss is the mean of the per-rank means (equal to the token mean when ranks mask about as many tokens, as
with BERT's own data-parallel training).

Metrics: `mlm_loss`, `mlm_acc` (top-1 at the selected positions), `nsp_loss`, `nsp_acc`, `masked` (selected
tokens in this micro-batch). The encoder is the whole BERT (embeddings, blocks, pooler, MLM and NSP heads): what
`sslscale export` writes and `sslscale.models.hf.save_hf` turns into a Hugging Face BertForPreTraining.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslscale.objectives.base import Objective

IGNORE = -100


class BertPretraining(Objective):
    batch_keys: tuple[str, ...] = ("input_ids", "attention_mask", "labels", "token_type_ids", "next_sentence_label")

    def __init__(self, encoder: nn.Module, nsp_weight: float = 1.0) -> None:
        super().__init__(encoder)
        missing = [name for name in ("mlm_head", "nsp_head", "pool") if not hasattr(encoder, name)]
        if missing:
            raise TypeError(
                f"the bert objective needs a BERT encoder (model.encoder: bert) with mlm_head, nsp_head "
                f"and pool; {type(encoder).__name__} lacks {missing}"
            )
        if not nsp_weight >= 0:
            raise ValueError(f"nsp_weight must be >= 0, got {nsp_weight}")
        self.nsp_weight = float(nsp_weight)
        if self.nsp_weight == 0:
            self.batch_keys = ("input_ids", "attention_mask", "labels")

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        labels = batch["labels"]
        bert: Any = self.encoder  # a BERT: mlm_head, nsp_head, pool (checked in __init__)
        hidden = bert(batch["input_ids"], batch.get("token_type_ids"), batch["attention_mask"])
        selected = labels != IGNORE
        # Rows of the selected positions only: the vocabulary projection runs on ~15% of the tokens.
        mlm_loss, correct = bert.mlm_head(hidden[selected], labels[selected], return_correct=True)
        masked = selected.sum()
        loss = mlm_loss
        metrics = {
            "mlm_loss": mlm_loss.detach(),
            "mlm_acc": correct.float() / masked.clamp(min=1).float(),
            "masked": masked.float(),
        }
        if self.nsp_weight > 0:
            nsp_logits = bert.nsp_head(bert.pool(hidden)).float()
            target = batch["next_sentence_label"]
            nsp_loss = F.cross_entropy(nsp_logits, target)
            loss = loss + self.nsp_weight * nsp_loss
            metrics["nsp_loss"] = nsp_loss.detach()
            metrics["nsp_acc"] = (nsp_logits.detach().argmax(1) == target).float().mean()
        metrics["loss"] = loss.detach()
        return loss, metrics
