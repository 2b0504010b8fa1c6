"""CLIP (Radford et al. 2021): symmetric image-text InfoNCE over the global batch with a learnable temperature.

The encoder is a `sslscale.models.CLIP` (model.encoder: clip): image tower + text tower + projections + logit scale.
The loss is `sslscale.ops.infonce(mode="clip")` on the projected embeddings with `temperature = 1 / logit_scale`:
each rank's images against every rank's texts and back (the columns are gathered, their gradients summed back to
their owners), so the contrastive batch is `data.batch_size x world_size`. The temperature is a tensor there, so
its gradient is exact: d loss / d log_scale flows through the op's rows (scaled by 1 / temperature) into
`LogitScale` (exp of the log, clamped at `max_logit_scale`; zero gradient above the clamp).

The whole CLIP is exported (both towers, projections, logit scale: the default `export_modules = ("encoder",)`
is the CLIP itself), so zero-shot classification (`sslscale.adapt.zeroshot`) runs from the export; linear probes
read the image tower (`CLIP.image_encoder()`).
"""

from __future__ import annotations

import torch
from torch import nn

from sslscale.objectives.base import Objective
from sslscale.ops import infonce


class CLIPObjective(Objective):
    batch_keys = ("image", "input_ids", "attention_mask")

    def __init__(self, encoder: nn.Module, backend: str | None = None) -> None:
        super().__init__(encoder)
        for method in ("encode_image", "encode_text", "logit_scale"):
            if not callable(getattr(encoder, method, None)):
                raise TypeError(
                    f"the clip objective needs a CLIP encoder (model.encoder: clip) with {method}(); "
                    f"got {type(encoder).__name__}"
                )
        self.backend = backend

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        images, texts, scale = self.encoder(batch["image"], batch["input_ids"], batch["attention_mask"])
        loss = infonce(images, texts, mode="clip", temperature=1.0 / scale, backend=self.backend)
        with torch.no_grad():
            sim = nn.functional.normalize(images.float(), dim=1) @ nn.functional.normalize(texts.float(), dim=1).T
            target = torch.arange(sim.shape[0], device=sim.device)
            metrics = {
                "loss": loss.detach(),
                # local top-1 among this rank's micro-batch: is the paired text (image) the best match?
                "i2t_acc": (sim.argmax(dim=1) == target).float().mean(),
                "t2i_acc": (sim.argmax(dim=0) == target).float().mean(),
                "logit_scale": scale.detach().float(),
            }
        return loss, metrics
