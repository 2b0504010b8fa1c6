"""Squared-loss probe for regression targets against the normal equations written out in the test."""

import torch

from sslscale.adapt import probe


def test_fit_ridge_matches_normal_equations_and_gradient_is_zero():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen) + 2.0
    y = x @ torch.randn(6, 2, generator=gen) + 0.1 * torch.randn(50, 2, generator=gen) + 3.0
    wd = 0.3
    w, b = probe.fit_ridge(x, y, wd)
    # reference: augmented least squares with an unpenalised bias column
    xa = torch.cat([x, torch.ones(50, 1)], 1).double()
    reg = torch.diag(torch.tensor([wd] * 6 + [0.0], dtype=torch.float64)) * 50
    ref = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y.double())
    torch.testing.assert_close(w.T.double(), ref[:6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.double(), ref[6], atol=1e-4, rtol=1e-4)
    wp, bp = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss = ((x @ wp.T + bp - y) ** 2).mean(0).sum() + wd * (wp**2).sum()
    loss.backward()
    assert wp.grad.abs().max() < 1e-3 and bp.grad.abs().max() < 1e-3


def test_ridge_probe_fits_a_linear_target_and_not_noise():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 10, generator=gen)
    y = x @ torch.randn(10, generator=gen) + 0.05 * torch.randn(400, generator=gen)
    good = probe.ridge_probe(x[:200], y[:200], x[200:], y[200:])
    assert good["r2"] > 0.99
    noise = probe.ridge_probe(x[:200], torch.randn(200, generator=gen), x[200:], torch.randn(200, generator=gen))
    assert noise["r2"] < 0.1
