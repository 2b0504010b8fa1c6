"""InfoNCE: every fused backend against the plain-PyTorch oracles, forward and gradients, plus input checking.

Backends are discovered with `sslscale.ops.availability`: cpp on CPU, Triton on CPU through the interpreter
(picked up automatically once `sslscale.kernels.infonce` exists, skipped with the reason until then), cuda and
triton on CUDA (marked `gpu`). Distributed parity is tested elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from sslscale.ops import availability, infonce, reference
from sslscale.ops import backends as backend_choice

CPU = torch.device("cpu")
CUDA = torch.device("cuda")

FUSED = [
    pytest.param("cpp", CPU, id="cpp-cpu"),
    pytest.param("triton", CPU, id="triton-cpu"),
    pytest.param("cuda", CUDA, id="cuda-cuda", marks=pytest.mark.gpu),
    pytest.param("triton", CUDA, id="triton-cuda", marks=pytest.mark.gpu),
]


def _require(name: str, device: torch.device) -> None:
    avail = availability("infonce", name, device)
    if not avail.usable:
        pytest.skip(f"{name} on {device.type}: {avail.reason}")


def _kernels(name: str, device: torch.device):
    _require(name, device)
    return backend_choice.kernels("infonce", name)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Max abs error within `tol` times the larger of 1 and the expected values' magnitude."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} x {scale:.3g}"


def _indices(m: int, n: int, *, with_self: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positives; self exclusions on most rows (never the positive), -1 (none) on the rest."""
    pos = torch.randint(0, n, (m,), generator=generator)
    if not with_self:
        return pos, torch.full((m,), -1, dtype=torch.int64)
    self_idx = torch.randint(0, n, (m,), generator=generator)
    self_idx = torch.where(self_idx == pos, (pos + 1) % n, self_idx)
    self_idx[::3] = -1
    if n == 1:
        self_idx.fill_(-1)
    return pos, self_idx


def _kernel_oracle(rows, cols, pos, self_idx, grad):
    r = rows.detach().double().requires_grad_()
    c = cols.detach().double().requires_grad_()
    loss, lse = reference.infonce_rows(r, c, pos, self_idx)
    loss.backward(grad.double())
    return loss.detach(), lse.detach(), r.grad, c.grad


KERNEL_SHAPES = [  # (m, n, d, row scale): odd sizes, several tiles, unnormalised rows with large logits
    (5, 7, 3, 1.0),
    (37, 70, 33, 3.0),
    (150, 300, 96, 0.5),
]


@pytest.mark.parametrize("name, device", FUSED)
@pytest.mark.parametrize("m, n, d, scale", KERNEL_SHAPES)
@pytest.mark.parametrize("with_self", [True, False], ids=["self", "noself"])
def test_kernel_matches_oracle_fp32(name, device, m, n, d, scale, with_self):
    impl = _kernels(name, device)
    gen = torch.Generator().manual_seed(m * n + d)
    rows = torch.randn(m, d, generator=gen) * scale
    cols = torch.randn(n, d, generator=gen)
    pos, self_idx = _indices(m, n, with_self=with_self, generator=gen)
    grad = torch.randn(m, generator=gen)
    want_loss, want_lse, want_dr, want_dc = _kernel_oracle(rows, cols, pos, self_idx, grad)

    args = [t.to(device) for t in (rows, cols, pos, self_idx)]
    loss, lse = impl.infonce_fwd(*args)
    assert loss.dtype == lse.dtype == torch.float32
    d_rows, d_cols = impl.infonce_bwd(grad.to(device), *args, lse)
    assert d_rows.dtype == d_cols.dtype == torch.float32
    tol = 1e-5  # relative to the largest value; seen: ~1e-6 on logits up to ~60
    _assert_close(lse, want_lse, tol, "lse")
    _assert_close(loss, want_loss, tol, "loss")
    _assert_close(d_rows, want_dr, tol, "d_rows")
    _assert_close(d_cols, want_dc, tol, "d_cols")


# The C++ backward sweeps a (row group x column group) grid when it has enough cells for every thread (here
# m > 128 * 2 * threads and n > 256 * 2 * threads) and falls back to two passes otherwise: both are covered.
CPP_SHAPES = [(300, 517, 40), (777, 1100, 24)]
CPP_TOL = {torch.float64: 1e-11, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("m, n, d", CPP_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_kernel_dtypes_and_schedules(m, n, d, dtype, threads):
    impl = _kernels("cpp", CPU)
    gen = torch.Generator().manual_seed(1)
    rows = (torch.randn(m, d, generator=gen, dtype=torch.float64) * 4).to(dtype)
    cols = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    pos, self_idx = _indices(m, n, with_self=True, generator=gen)
    grad = torch.randn(m, generator=gen, dtype=torch.float64)
    want_loss, want_lse, want_dr, want_dc = _kernel_oracle(rows, cols, pos, self_idx, grad)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loss, lse = impl.infonce_fwd(rows, cols, pos, self_idx)
        d_rows, d_cols = impl.infonce_bwd(grad.to(acc), rows, cols, pos, self_idx, lse)
    finally:
        torch.set_num_threads(before)
    assert loss.dtype == lse.dtype == acc
    assert d_rows.dtype == d_cols.dtype == dtype
    for got, want, what in (
        (loss, want_loss, "loss"),
        (lse, want_lse, "lse"),
        (d_rows, want_dr, "d_rows"),
        (d_cols, want_dc, "d_cols"),
    ):
        _assert_close(got, want, CPP_TOL[dtype], what)


def test_cpp_kernel_takes_non_contiguous_inputs():
    impl = _kernels("cpp", CPU)
    rows = torch.randn(24, 20)[:, ::2]
    cols = torch.randn(10, 31)[:, 1:21:2]
    pos, self_idx = _indices(24, 10, with_self=True, generator=torch.Generator().manual_seed(2))
    loss, lse = impl.infonce_fwd(rows, cols, pos, self_idx)
    want_loss, want_lse = reference.infonce_rows(rows.double(), cols.double(), pos, self_idx)
    _assert_close(loss, want_loss, 1e-5, "loss")
    _assert_close(lse, want_lse, 1e-5, "lse")


# ---- op level: sslscale.ops.infonce vs the textbook NT-Xent / CLIP losses ----

OP_SHAPES = [(1, 33), (7, 96), (130, 33)]  # (B, d)
# max abs error per unit of the expected values' magnitude (seen on CPU: fp32 <= 3e-7, bf16 <= 8e-3 at
# tau = 0.05, where bf16 also rounds rows / tau)
OP_TOL = {torch.float32: 5e-6, torch.bfloat16: 3e-2}


def _textbook(mode: str, a, b, t, normalize: bool):
    """The papers' losses in fp64; normalize=False skips the cosine (raw dot products / t)."""
    if normalize:
        return (reference.nt_xent if mode == "simclr" else reference.clip_loss)(a, b, t)
    n = a.shape[0]
    if mode == "simclr":
        z = torch.cat([a, b])
        logits = (z @ z.T / t).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        return torch.nn.functional.cross_entropy(logits, target)
    logits, target = a @ b.T / t, torch.arange(n)
    return 0.5 * (
        torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
    )


def _op_case(name, device, mode, tau, dtype, b, d, normalize):
    _require(name, device)
    gen = torch.Generator().manual_seed(b * 1000 + d)
    # un-normalised features of norm ~1.5 (normalize=False then sees logits beyond 1 / tau)
    a64 = (torch.randn(b, d, generator=gen, dtype=torch.float64) * 1.5 / math.sqrt(d)).to(dtype).double()
    b64 = (torch.randn(b, d, generator=gen, dtype=torch.float64) * 1.5 / math.sqrt(d)).to(dtype).double()
    a = a64.to(device, dtype).requires_grad_()
    bb = b64.to(device, dtype).requires_grad_()
    t = torch.tensor(tau, device=device, requires_grad=True)
    got = infonce(a, bb, mode=mode, temperature=t, normalize=normalize, backend=name)
    got.backward()

    ra, rb = a64.clone().requires_grad_(), b64.clone().requires_grad_()
    rt = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    want = _textbook(mode, ra, rb, rt, normalize)
    want.backward()

    tol = OP_TOL[dtype]
    _assert_close(got, want, tol, "loss")
    _assert_close(a.grad, ra.grad, tol, "d a")
    _assert_close(bb.grad, rb.grad, tol, "d b")
    _assert_close(t.grad, rt.grad, tol, "d temperature")


@pytest.mark.parametrize("name, device", FUSED)
@pytest.mark.parametrize("b, d", OP_SHAPES)
@pytest.mark.parametrize("mode", ["simclr", "clip"])
@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_op_fp32_matches_textbook(name, device, b, d, mode, tau):
    _op_case(name, device, mode, tau, torch.float32, b, d, normalize=True)


@pytest.mark.parametrize("name, device", FUSED)
@pytest.mark.parametrize("mode", ["simclr", "clip"])
@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_op_bf16_matches_textbook(name, device, mode, tau):
    _op_case(name, device, mode, tau, torch.bfloat16, 130, 96, normalize=True)


@pytest.mark.parametrize("name, device", FUSED)
@pytest.mark.parametrize("mode", ["simclr", "clip"])
@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_op_without_normalize(name, device, mode, tau):
    _op_case(name, device, mode, tau, torch.float32, 7, 96, normalize=False)


# ---- autograd, opcheck, torch.compile on the C++ op ----


def test_cpp_gradcheck_fp64():
    _require("cpp", CPU)
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    cols = torch.randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    pos, self_idx = _indices(6, 9, with_self=True, generator=gen)
    assert torch.autograd.gradcheck(lambda r, c: torch.ops.sslscale.infonce_fwd(r, c, pos, self_idx)[0], (rows, cols))
    a = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for mode in ("simclr", "clip"):
        assert torch.autograd.gradcheck(
            lambda x, y, t: infonce(x, y, mode=mode, temperature=t, backend="cpp"), (a, b, tau)
        )


def _op_args(requires_grad: bool):
    gen = torch.Generator().manual_seed(4)
    rows = torch.randn(20, 12, generator=gen, requires_grad=requires_grad)
    cols = torch.randn(30, 12, generator=gen, requires_grad=requires_grad)
    pos, self_idx = _indices(20, 30, with_self=True, generator=gen)
    return rows, cols, pos, self_idx


def test_cpp_opcheck():
    _require("cpp", CPU)
    rows, cols, pos, self_idx = _op_args(requires_grad=True)
    torch.library.opcheck(torch.ops.sslscale.infonce_fwd, (rows, cols, pos, self_idx))
    with torch.no_grad():
        _, lse = torch.ops.sslscale.infonce_fwd(rows, cols, pos, self_idx)
    grad = torch.randn(20)
    torch.library.opcheck(torch.ops.sslscale.infonce_bwd, (grad, rows.detach(), cols.detach(), pos, self_idx, lse))


def test_cpp_under_torch_compile_fullgraph():
    _require("cpp", CPU)
    rows, cols, pos, self_idx = _op_args(requires_grad=True)

    def mean_loss(r, c):
        return torch.ops.sslscale.infonce_fwd(r * 2.0, c, pos, self_idx)[0].mean()

    # aot_eager traces through fake tensors and AOT autograd like inductor, without compiling C++ for the glue
    compiled = torch.compile(mean_loss, fullgraph=True, backend="aot_eager")
    got = compiled(rows, cols)
    got_grads = torch.autograd.grad(got, (rows, cols))
    want = mean_loss(rows, cols)
    want_grads = torch.autograd.grad(want, (rows, cols))
    _assert_close(got, want, 1e-6, "loss")
    for g, w in zip(got_grads, want_grads):
        _assert_close(g, w, 1e-6, "gradient")


# ---- bad input ----


@pytest.mark.parametrize(
    "a, b, kwargs, error, match",
    [
        (torch.randn(4, 8), torch.randn(5, 8), {}, ValueError, "same shape"),
        (torch.randn(8), torch.randn(8), {}, ValueError, "2-D"),
        (torch.randn(2, 4, 8), torch.randn(2, 4, 8), {}, ValueError, "2-D"),
        (torch.randn(4, 0), torch.randn(4, 0), {}, ValueError, "at least 1"),
        (torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64), {}, TypeError, "same dtype"),
        (torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.int64), {}, TypeError, "int64"),
        (torch.randn(4, 8), torch.randn(4, 8), {"temperature": 0.0}, ValueError, "temperature"),
        (torch.randn(4, 8), torch.randn(4, 8), {"temperature": -0.1}, ValueError, "temperature"),
        (torch.randn(4, 8), torch.randn(4, 8), {"temperature": float("nan")}, ValueError, "temperature"),
        (torch.randn(4, 8), torch.randn(4, 8), {"temperature": float("inf")}, ValueError, "temperature"),
        (torch.randn(4, 8), torch.randn(4, 8), {"temperature": torch.tensor(0.0)}, ValueError, "temperature"),
        (torch.randn(4, 8), torch.randn(4, 8), {"temperature": torch.tensor(float("nan"))}, ValueError, "temperature"),
        (torch.randn(4, 8), torch.randn(4, 8), {"temperature": torch.tensor([0.1, 0.2])}, ValueError, "temperature"),
        (torch.randn(4, 8), torch.randn(4, 8), {"mode": "moco"}, ValueError, "moco"),
        (torch.randn(4, 8), torch.randn(4, 8), {"backend": "fastest"}, ValueError, "fastest"),
    ],
)
def test_op_rejects_bad_input(a, b, kwargs, error, match):
    with pytest.raises(error, match=match):
        infonce(a, b, **kwargs)


def test_env_backend_override(monkeypatch):
    _require("cpp", CPU)
    from sslscale.ops import _torch_ops_infonce

    calls = []
    real = _torch_ops_infonce.infonce_fwd
    monkeypatch.setattr(_torch_ops_infonce, "infonce_fwd", lambda *args: calls.append(1) or real(*args))
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    monkeypatch.setenv("SSLSCALE_BACKEND", "reference")
    reference_loss = infonce(a, b)
    assert calls == [], "SSLSCALE_BACKEND=reference still ran the C++ kernel"
    monkeypatch.setenv("SSLSCALE_BACKEND", "cpp")
    cpp_loss = infonce(a, b)
    assert calls == [1], "SSLSCALE_BACKEND=cpp did not run the C++ kernel"
    _assert_close(cpp_loss, reference_loss, 1e-5, "loss")
    assert calls == [1]
    infonce(a, b, backend="reference")  # the argument wins over the environment
    assert calls == [1]
    monkeypatch.setenv("SSLSCALE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SSLSCALE_BACKEND='fastest'"):
        infonce(a, b)


def _bad_kernel_inputs():
    rows, cols = torch.randn(4, 8), torch.randn(6, 8)
    pos, none = torch.tensor([0, 1, 2, 3]), torch.full((4,), -1)
    return [
        ((rows[0], cols, pos, none), "rows must be 2-D"),
        ((rows, cols.unsqueeze(0), pos, none), "cols must be 2-D"),
        ((rows, torch.randn(6, 7), pos, none), "same feature dim"),
        ((rows, cols.double(), pos, none), "same dtype"),
        ((rows.int(), cols.int(), pos, none), "not supported"),
        ((torch.randn(4, 0), torch.randn(6, 0), pos, none), "at least 1"),
        ((rows, cols, pos.int(), none), "pos must be int64"),
        ((rows, cols, pos[:3], none), r"pos must have shape \(4,\)"),
        ((rows, cols, torch.tensor([0, 1, 6, 3]), none), r"pos\[2\] = 6 is out of range"),
        ((rows, cols, pos, torch.tensor([-1, -2, 0, 0])), r"self_idx\[1\] = -2 is out of range"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_kernel_inputs())))
def test_cpp_kernel_rejects_bad_input(case):
    _require("cpp", CPU)
    args, match = _bad_kernel_inputs()[case]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sslscale.infonce_fwd(*args)


def test_cpp_backward_rejects_bad_saved_state():
    _require("cpp", CPU)
    rows, cols, pos, self_idx = _op_args(requires_grad=False)
    _, lse = torch.ops.sslscale.infonce_fwd(rows, cols, pos, self_idx)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        torch.ops.sslscale.infonce_bwd(torch.ones(20), rows, cols, pos, self_idx, lse[:5])
    with pytest.raises(RuntimeError, match="grad_loss must be float32"):
        torch.ops.sslscale.infonce_bwd(torch.ones(20, dtype=torch.int64), rows, cols, pos, self_idx, lse)
