"""Weighted kNN classification on frozen features: cosine similarity, top-k neighbours, votes exp(sim / T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Predicted classes (N_test,): each test feature's k most cosine-similar training features vote for their
    class with weight exp(similarity / temperature); k is clipped to the number of training examples."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if len(train_x) == 0:
        raise ValueError("kNN needs at least one labelled example")
    bank = F.normalize(train_x.float(), dim=1)
    k = min(k, len(bank))
    preds = []
    for i in range(0, len(test_x), batch_size):
        q = F.normalize(test_x[i : i + batch_size].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
