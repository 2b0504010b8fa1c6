"""Linear probe: frozen features -> standardised -> multinomial logistic regression (full-batch L-BFGS).

Choices that make few-label comparisons fair and repeatable:
- features are standardised with statistics of the *unlabeled* set (all training images), not of the few labeled
  ones, which would be too noisy at 10 labels per class;
- the weight decay is picked by stratified k-fold cross-validation on the labeled examples alone, from a fixed
  grid; with many labels (> 5000) it matters little and costs most, so a fixed 1e-4 is used. The test set is
  never consulted;
- label subsets are drawn per seed from the labels only (`sample_per_class`), so every method sees the same ones.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
MANY_LABELS, MANY_LABELS_WEIGHT_DECAY = 5000, 1e-4


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Encoder outputs for `images` in eval mode (float32, (N, out_dim)); the encoder's mode is restored."""
    was_training = encoder.training
    encoder.eval()
    try:
        out = [encoder(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0, getattr(encoder, "out_dim", 0))


@torch.no_grad()
def reestimate_batchnorm(encoder: nn.Module, images: torch.Tensor, batch_size: int = 500) -> nn.Module:
    """A copy of `encoder` whose BatchNorm running statistics are recomputed on `images` (exact averages).

    Pretraining collects BN statistics on augmented views; a probe feeds clean images, whose statistics differ.
    Returns the copy in eval mode; the original is untouched.
    """
    enc = copy.deepcopy(encoder)
    bns = [m for m in enc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    enc.train()
    for i in range(0, len(images), batch_size):
        enc(images[i : i + batch_size])
    return enc.eval()


def standardizer(unlabeled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) per feature from the unlabeled set. The variance gets a small floor (1e-3 x the average
    variance) so near-constant inputs — border pixels, dead channels — are not blown up into noise."""
    x = unlabeled.double()
    mean, var = x.mean(0), x.var(0, unbiased=False)
    scale = torch.sqrt(var + 1e-3 * var.mean().clamp_min(1e-12))
    return mean.float(), scale.float()


def sample_per_class(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of exactly `k` examples of every class present in `labels`, drawn with `seed` (sorted)."""
    if k < 1:
        raise ValueError(f"labels per class must be >= 1, got {k}")
    gen = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).squeeze(1)
        if len(idx) < k:
            raise ValueError(f"class {c} has only {len(idx)} examples, fewer than the {k} labels per class asked")
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.cat(picked).sort().values


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decays: Sequence[float],
    masks: torch.Tensor | None = None,
    max_iter: int = 150,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """P independent multinomial logistic regressions solved at once; returns weights (P, C, D), biases (P, C).

    Problem p minimises mean_{i: masks[p, i]} CE(x_i) + weight_decays[p] / 2 * ||W_p||^2 (bias unpenalised).
    The problems share no parameters, so minimising their sum with one full-batch L-BFGS minimises each; batching
    them (all folds x all weight decays of a cross-validation) turns hundreds of tiny, overhead-bound solves into
    one. The problem is convex: the zero start gives the same answer as any other, up to the tolerance.
    """
    if x.dim() != 2 or y.dim() != 1 or len(x) != len(y):
        raise ValueError(f"expected x (N, D) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    wds = torch.tensor([float(w) for w in weight_decays])
    if (wds < 0).any():
        raise ValueError(f"weight decays must be >= 0, got {list(weight_decays)}")
    p = len(wds)
    masks = torch.ones(p, len(y)) if masks is None else masks.float()
    counts = masks.sum(1).clamp_min(1)
    w = torch.zeros(p, num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(p, num_classes, requires_grad=True)
    mask_np = masks.T.contiguous()  # (N, P)
    y_np = y.repeat_interleave(p)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        # one (N, D) x (D, P*C) matmul with rows laid out (N, P, C): several times faster on CPU than a
        # batched (P, N, C) layout, whose logsumexp and bmm backward dominate
        logits = (x @ w.reshape(p * num_classes, -1).T).view(len(y), p, num_classes) + b
        ce = F.cross_entropy(logits.reshape(-1, num_classes), y_np, reduction="none").view(len(y), p)
        loss = ((ce * mask_np).sum(0) / counts).sum() + 0.5 * (wds * (w * w).sum((1, 2))).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def predict(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Class predictions (N,) of one fitted regression (weight (C, D), bias (C,))."""
    return F.linear(x, weight, bias).argmax(1)


def accuracy(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(weight, bias, x) == y).float().mean()) if len(y) else float("nan")


def _stratified_folds(y: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """Fold id per example, each class spread round-robin over the folds after a seeded shuffle."""
    gen = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(y)
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        fold[idx] = torch.arange(len(idx)) % folds
    return [torch.nonzero(fold == f).squeeze(1) for f in range(folds)]


def select_weight_decay(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    grid: Sequence[float] = WEIGHT_DECAYS,
    folds: int = 5,
    max_iter: int = 150,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """Weight decay with the best stratified `folds`-fold CV accuracy on the labeled data (ties -> stronger)."""
    counts = torch.bincount(y, minlength=num_classes)
    folds = max(2, min(folds, int(counts[counts > 0].min())))
    parts = _stratified_folds(y, folds, seed)
    grid = sorted(grid, reverse=True)
    masks, decays = [], []
    for val in parts:
        m = torch.ones(len(y))
        m[val] = 0
        masks += [m] * len(grid)
        decays += grid
    w, b = fit_logistic(x, y, num_classes, decays, torch.stack(masks), max_iter)
    scores = dict.fromkeys(grid, 0.0)
    for i, (wd, m) in enumerate(zip(decays, masks)):
        val = m == 0
        scores[wd] += accuracy(w[i], b[i], x[val], y[val]) / len(parts)
    best = max(grid, key=lambda wd: scores[wd])  # max keeps the first of ties: the strongest decay
    return best, scores


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    grid: Sequence[float] = WEIGHT_DECAYS,
    max_iter: int = 150,
    seed: int = 0,
) -> dict[str, float]:
    """Fit on (train_x, train_y) with the rule's weight decay; test accuracy (x already standardised)."""
    if len(train_y) > MANY_LABELS:
        wd = MANY_LABELS_WEIGHT_DECAY
    else:
        wd, _ = select_weight_decay(train_x, train_y, num_classes, grid, max_iter=max_iter, seed=seed)
    w, b = fit_logistic(train_x, train_y, num_classes, [wd], max_iter=max_iter)
    return {
        "accuracy": accuracy(w[0], b[0], test_x, test_y),
        "weight_decay": wd,
        "train_accuracy": accuracy(w[0], b[0], train_x, train_y),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, sd


def fit_ridge(x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared-loss probe for regression targets: argmin_W,b mean ||x W^T + b - y||^2 + wd * ||W||^2 (bias
    unpenalised), closed form in float64 on centred data. y: (N,) or (N, T); returns W (T, D), b (T,)."""
    if x.dim() != 2 or len(x) != len(y) or y.dim() not in (1, 2):
        raise ValueError(f"expected x (N, D) and y (N,) or (N, T), got {tuple(x.shape)} and {tuple(y.shape)}")
    if weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
    xd, yd = x.double(), (y if y.dim() == 2 else y[:, None]).double()
    xm, ym = xd.mean(0), yd.mean(0)
    xc, yc = xd - xm, yd - ym
    n = len(x)
    gram = xc.T @ xc / n + weight_decay * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, xc.T @ yc / n).T  # (T, D)
    b = ym - w @ xm
    return w.float(), b.float()


def ridge_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    grid: Sequence[float] = WEIGHT_DECAYS,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Squared-loss probe with the weight decay of the best k-fold CV mean squared error on the training
    examples; test MSE and R^2 (1 - MSE / variance of the test targets)."""
    gen = torch.Generator().manual_seed(seed)
    folds = max(2, min(folds, len(train_y)))
    fold = torch.randperm(len(train_y), generator=gen) % folds
    y2 = train_y if train_y.dim() == 2 else train_y[:, None]

    def mse(w, b, x, y):
        return float(((x @ w.T + b - y) ** 2).mean())

    scores = {}
    for wd in sorted(grid, reverse=True):
        scores[wd] = (
            sum(
                mse(*fit_ridge(train_x[fold != f], y2[fold != f], wd), train_x[fold == f], y2[fold == f])
                for f in range(folds)
            )
            / folds
        )
    best = min(scores, key=lambda wd: scores[wd])  # first of ties: the strongest decay
    w, b = fit_ridge(train_x, y2, best)
    ty = test_y if test_y.dim() == 2 else test_y[:, None]
    test_mse = mse(w, b, test_x, ty)
    return {
        "mse": test_mse,
        "r2": 1 - test_mse / float(ty.double().var(0, unbiased=False).mean()),
        "weight_decay": best,
    }
