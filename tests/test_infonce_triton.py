"""The Triton InfoNCE kernels against the plain-PyTorch oracle, forward and both gradients.

Runs in Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1) and compiled on a CUDA machine. The oracle
gets the same (already rounded) inputs upcast to fp64, so the tolerances measure the kernel's own error: fp32
accumulation everywhere, plus the rounding of bf16/fp16 gradients to their output dtype.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import sslscale.ops
from sslscale.ops import reference

kernels = pytest.importorskip("sslscale.kernels.infonce")
# On a GPU machine every test here runs compiled on the device: part of `make gpu-check`'s GPU tests.
pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative to the largest reference magnitude of each output
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _problem(m: int, n: int, d: int, dtype: torch.dtype, scale: float, with_self: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(m, d, generator=gen) * (scale / d**0.5)
    cols = torch.randn(n, d, generator=gen)
    pos = torch.randint(0, n, (m,), generator=gen)
    self_idx = torch.full((m,), -1, dtype=torch.int64)
    if with_self:
        # every third row excludes nothing; the others exclude a column that is not their positive
        self_idx = (pos + 1 + torch.randint(0, n - 1, (m,), generator=gen)) % n
        self_idx[::3] = -1
    grad = torch.rand(m, generator=gen) + 0.5
    to = dict(device=DEVICE)
    return rows.to(dtype=dtype, **to), cols.to(dtype=dtype, **to), pos.to(**to), self_idx.to(**to), grad.to(**to)


def _oracle(rows, cols, pos, self_idx, grad):
    r = rows.double().requires_grad_()
    c = cols.double().requires_grad_()
    loss, lse = reference.infonce_rows(r, c, pos, self_idx)
    (loss * grad.double()).sum().backward()
    return loss.detach(), lse.detach(), r.grad, c.grad


def _close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= rel * max(scale, 1.0), f"{what}: max error {err:.3g} vs largest value {scale:.3g} (rel tol {rel})"


CASES = [
    # m, n, d, dtype, scale (1/tau-like), self_idx
    (7, 14, 33, torch.float32, 20.0, True),
    (7, 14, 33, torch.bfloat16, 20.0, True),
    (130, 260, 96, torch.float32, 1.0, True),
    (130, 260, 96, torch.bfloat16, 20.0, False),
    (65, 66, 5, torch.float16, 10.0, True),
    (9, 70, 1000, torch.float32, 30.0, True),  # wide features: several K steps and output feature blocks
]


@pytest.mark.parametrize("m,n,d,dtype,scale,with_self", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernels_match_reference(m, n, d, dtype, scale, with_self):
    rows, cols, pos, self_idx, grad = _problem(m, n, d, dtype, scale, with_self)
    loss, lse = kernels.infonce_fwd(rows, cols, pos, self_idx)
    d_rows, d_cols = kernels.infonce_bwd(grad, rows, cols, pos, self_idx, lse)
    want_loss, want_lse, want_rows, want_cols = _oracle(rows, cols, pos, self_idx, grad)

    assert loss.dtype == lse.dtype == torch.float32 and loss.shape == lse.shape == (m,)
    assert d_rows.dtype == rows.dtype and d_cols.dtype == cols.dtype
    # forward: fp32 accumulation of exactly representable products, whatever the input dtype
    _close(lse, want_lse, 1e-5, "lse")
    _close(loss, want_loss, 1e-5, "loss")
    _close(d_rows, want_rows, TOL[dtype], "d_rows")
    _close(d_cols, want_cols, TOL[dtype], "d_cols")


def test_large_logits_need_the_online_max():
    """Logits near 1e3 overflow a plain exp in fp32; the running max keeps the LSE finite and exact."""
    rows, cols, pos, self_idx, grad = _problem(20, 40, 16, torch.float32, 3000.0, True)
    loss, lse = kernels.infonce_fwd(rows, cols, pos, self_idx)
    want_loss, want_lse, want_rows, _ = _oracle(rows, cols, pos, self_idx, grad)
    assert want_lse.abs().max() > 300  # the premise: exp(lse) is not representable in fp32
    assert torch.isfinite(lse).all()
    _close(lse, want_lse, 1e-6, "lse")
    d_rows, _ = kernels.infonce_bwd(grad, rows, cols, pos, self_idx, lse)
    _close(d_rows, want_rows, 1e-4, "d_rows")


def test_excluded_column_gets_no_probability():
    """A row whose only other column is excluded has lse = its one remaining logit and zero gradient wrt it."""
    rows = torch.tensor([[1.0, 2.0], [0.5, -1.0]], device=DEVICE)
    cols = torch.tensor([[3.0, 0.0], [0.0, 1.0]], device=DEVICE)
    pos = torch.tensor([1, 0], device=DEVICE)
    self_idx = torch.tensor([0, 1], device=DEVICE)
    loss, lse = kernels.infonce_fwd(rows, cols, pos, self_idx)
    torch.testing.assert_close(lse, torch.tensor([2.0, 1.5], device=DEVICE))
    torch.testing.assert_close(loss, torch.zeros(2, device=DEVICE))
    d_rows, d_cols = kernels.infonce_bwd(torch.ones(2, device=DEVICE), rows, cols, pos, self_idx, lse)
    assert d_rows.abs().max() == 0 and d_cols.abs().max() == 0


def test_bad_inputs_are_named():
    rows = torch.randn(4, 8, device=DEVICE)
    cols = torch.randn(5, 8, device=DEVICE)
    pos = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="share d"):
        kernels.infonce_fwd(rows, torch.randn(5, 7, device=DEVICE), pos, pos)
    with pytest.raises(ValueError, match="pos must be int64"):
        kernels.infonce_fwd(rows, cols, pos.int(), pos)
    with pytest.raises(TypeError, match="share a dtype"):
        kernels.infonce_fwd(rows, cols.double(), pos, pos)
    with pytest.raises(ValueError, match="lse must have shape"):
        kernels.infonce_bwd(torch.ones(4, device=DEVICE), rows, cols, pos, pos, torch.zeros(3, device=DEVICE))


@pytest.mark.parametrize("mode", ["simclr", "clip"])
def test_op_matches_textbook_loss_and_temperature_gradient(mode):
    """`sslscale.ops.infonce(backend="triton")` against the full-logits NT-Xent / CLIP losses, tau included."""
    gen = torch.Generator().manual_seed(1)
    a0 = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    b0 = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    want_fn = reference.nt_xent if mode == "simclr" else reference.clip_loss

    a, b = a0.float().to(DEVICE).requires_grad_(), b0.float().to(DEVICE).requires_grad_()
    tau = torch.tensor(0.07, device=DEVICE, requires_grad=True)
    loss = sslscale.ops.infonce(a, b, mode=mode, temperature=tau, backend="triton")
    loss.backward()

    ra, rb = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    rtau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    want = want_fn(ra, rb, rtau)
    want.backward()

    assert abs(loss.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    _close(a.grad.cpu(), ra.grad, 1e-4, "grad a")
    _close(b.grad.cpu(), rb.grad, 1e-4, "grad b")
    assert abs(tau.grad.item() - rtau.grad.item()) < 1e-4 * max(1.0, abs(rtau.grad.item())), "grad tau"


def test_bf16_gradient_tiles_stay_within_tolerance(monkeypatch):
    """On a GPU the backward rounds g (p - t) to bf16 before its second dot; emulate that rounding here (on a GPU
    this is the configuration it runs anyway)."""
    make = kernels.config
    monkeypatch.setattr(
        kernels, "config", lambda d, dtype, interp=True: replace(make(d, dtype, interp), bf16_grad=True)
    )
    rows, cols, pos, self_idx, grad = _problem(130, 260, 96, torch.bfloat16, 20.0, True)
    _, lse = kernels.infonce_fwd(rows, cols, pos, self_idx)
    d_rows, d_cols = kernels.infonce_bwd(grad, rows, cols, pos, self_idx, lse)
    _, _, want_rows, want_cols = _oracle(rows, cols, pos, self_idx, grad)
    _close(d_rows, want_rows, TOL[torch.bfloat16], "d_rows")
    _close(d_cols, want_cols, TOL[torch.bfloat16], "d_cols")


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(kernels, "_INTERPRETED", False)
    x = torch.randn(3, 4)
    idx = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.infonce_fwd(x, x, idx, idx)


@pytest.mark.parametrize("d", [256, 512, 1024])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_split_plan_fills_an_h100_at_1024_pairs(d, dtype):
    """1024 SimCLR pairs per rank are 2048 rows = 32 row tiles: the column split must still give every one of 132
    SMs at least two rounds of programs, in all three kernels (at the configuration's stated occupancy)."""
    plan = kernels.launch_plan(2048, 2048, d, dtype, sms=132, interpreted=False)
    per_sm = plan["config"].blocks_per_sm
    for kernel in ("forward", "d_rows", "d_cols"):
        own, splits = plan[kernel]["grid"]
        assert own * splits >= kernels.WAVES * 132 * per_sm, (kernel, plan[kernel])
        assert splits > 1 and plan[kernel]["per_split"] % 64 == 0
    # a big problem needs no split: the row tiles alone fill the chip
    assert kernels.launch_plan(65536, 65536, d, dtype, sms=132, interpreted=False)["d_rows"]["grid"][1] == 1


def test_split_count_covers_every_tile_once():
    for own, other, sms, per_sm in [(32, 32, 132, 1), (3, 5, 2, 1), (1, 1, 132, 2), (200, 7, 132, 1), (5, 1000, 8, 2)]:
        splits, per_split = kernels.split_count(own, other, sms, per_sm)
        assert 1 <= splits <= other and (splits - 1) * per_split < other <= splits * per_split


@pytest.mark.parametrize("sms", [1, 64], ids=["one-split", "many-splits"])
@pytest.mark.parametrize("register_acc", [True, False], ids=["register-acc", "workspace-acc"])
def test_splits_and_accumulators_match_reference(monkeypatch, sms, register_acc):
    """Column/row splits (partial LSEs and fp32 partial gradients combined afterwards) and both backward
    accumulators (registers; an fp32 workspace updated feature block by feature block) give the oracle's values,
    and the same bits on a second run."""
    monkeypatch.setattr(kernels, "sm_count", lambda device: sms)
    if not register_acc:
        make = kernels.config
        monkeypatch.setattr(
            kernels,
            "config",
            lambda d, dtype, interp=True: replace(make(d, dtype, interp), register_acc=False, block_d=32),
        )
    rows, cols, pos, self_idx, grad = _problem(200, 330, 80, torch.float32, 20.0, True, seed=3)
    loss, lse = kernels.infonce_fwd(rows, cols, pos, self_idx)
    d_rows, d_cols = kernels.infonce_bwd(grad, rows, cols, pos, self_idx, lse)
    plan = kernels.launch_plan(200, 330, 80, torch.float32, sms)
    assert (plan["forward"]["grid"][1] > 1) == (sms > 1) and (plan["d_cols"]["grid"][1] > 1) == (sms > 1)
    want_loss, want_lse, want_rows, want_cols = _oracle(rows, cols, pos, self_idx, grad)
    _close(lse, want_lse, 1e-5, "lse")
    _close(loss, want_loss, 1e-5, "loss")
    _close(d_rows, want_rows, TOL[torch.float32], "d_rows")
    _close(d_cols, want_cols, TOL[torch.float32], "d_cols")
    again = kernels.infonce_bwd(grad, rows, cols, pos, self_idx, lse)
    assert torch.equal(again[0], d_rows) and torch.equal(again[1], d_cols)


def test_split_with_no_kept_column_is_neutral(monkeypatch):
    """A split whose only column is a row's excluded one has a partial LSE of -inf: it must add nothing."""
    monkeypatch.setattr(kernels, "sm_count", lambda device: 64)
    rows, cols, pos, self_idx, grad = _problem(3, 130, 16, torch.float32, 5.0, False, seed=4)
    self_idx = torch.full_like(self_idx, 128)  # column 128 is alone in the last 64-column split
    loss, lse = kernels.infonce_fwd(rows, cols, pos, self_idx)
    want_loss, want_lse, _, _ = _oracle(rows, cols, pos, self_idx, grad)
    assert kernels.launch_plan(3, 130, 16, torch.float32, 128)["forward"]["grid"][1] == 3
    _close(lse, want_lse, 1e-5, "lse")
    _close(loss, want_loss, 1e-5, "loss")
