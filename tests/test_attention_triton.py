"""The Triton attention kernels against the fp64 reference: out, lse and dq/dk/dv, odd lengths and grouped-query
heads included. On CPU they run in the Triton interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from sslscale.ops import backends, causal_attention, reference

pytestmark = [
    pytest.mark.skipif(
        not backends.availability("attention", "triton", torch.device("cpu")).usable and not torch.cuda.is_available(),
        reason="triton attention not usable here",
    )
] + ([pytest.mark.gpu] if torch.cuda.is_available() else [])  # compiled on the device: a `make gpu-check` test

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Max error relative to the reference's largest magnitude: fp32 differs from fp64 by summation order only; bf16
# rounds the inputs' products (P in bf16 for the P @ V and dS @ K dots) and the outputs.
REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _kernels():
    from sslscale.kernels import attention

    return attention


def _inputs(b, h, hkv, t, d, dtype):
    shape_q, shape_kv = (b, h, t, d), (b, hkv, t, d)
    q, k, v = (torch.randn(s, dtype=dtype, device=DEVICE) for s in (shape_q, shape_kv, shape_kv))
    return q, k, v, torch.randn(shape_q, dtype=dtype, device=DEVICE)


def _reference(q, k, v, grad_out, scale):
    """fp64 out, lse and gradients of the same (already rounded) inputs."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = reference.attention(q64, k64, v64, scale)
    out.backward(grad_out.double())
    lse = reference.attention_lse(q64.detach(), k64.detach(), scale)
    return out.detach(), lse, q64.grad, k64.grad, v64.grad


def _assert_close(name, got, want, rel_tol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want).abs().max().item()
    bound = rel_tol * max(want.abs().max().item(), 1.0)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


CASES = [
    # (B, H, Hkv, T, D): every T with every head_dim, grouped-query layouts spread across them.
    (1, 2, 2, 1, 32),
    (2, 4, 2, 7, 32),
    (1, 4, 1, 64, 32),
    (1, 2, 1, 129, 32),
    (1, 4, 4, 1, 64),
    (1, 4, 2, 7, 64),
    (1, 2, 2, 64, 64),
    (1, 4, 2, 129, 64),
    (1, 4, 1, 1, 128),
    (1, 2, 2, 7, 128),
    (1, 4, 2, 64, 128),
    (1, 4, 1, 129, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("b,h,hkv,t,d", CASES, ids=[f"B{c[0]}H{c[1]}kv{c[2]}T{c[3]}D{c[4]}" for c in CASES])
def test_kernels_match_reference(b, h, hkv, t, d, dtype):
    attn = _kernels()
    q, k, v, grad_out = _inputs(b, h, hkv, t, d, dtype)
    scale = d**-0.5
    out, lse = attn.attention_fwd(q, k, v, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, h, t)
    dq, dk, dv = attn.attention_bwd(grad_out, q, k, v, out, lse, scale)
    want = _reference(q, k, v, grad_out, scale)
    tol = REL_TOL[dtype]
    for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), want):
        _assert_close(name, got, ref, tol if name != "lse" else 1e-5)
    assert dk.dtype == dv.dtype == dq.dtype == dtype


def test_custom_scale_and_large_scores():
    """A large scale makes rows nearly one-hot: the online max must keep exp from overflowing."""
    attn = _kernels()
    q, k, v, grad_out = _inputs(1, 2, 1, 70, 64, torch.float32)
    scale = 3.0
    out, lse = attn.attention_fwd(q, k, v, scale)
    dq, dk, dv = attn.attention_bwd(grad_out, q, k, v, out, lse, scale)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    for name, got, ref in zip(
        ("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), _reference(q, k, v, grad_out, scale)
    ):
        _assert_close(name, got, ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_level_autograd(dtype):
    """`causal_attention(..., backend="triton")` gives the reference's output and input gradients."""
    q, k, v, grad_out = _inputs(2, 4, 2, 37, 64, dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = causal_attention(*leaves, backend="triton")
    out.backward(grad_out)
    want_out, _, want_dq, want_dk, want_dv = _reference(q, k, v, grad_out, 64**-0.5)
    tol = REL_TOL[dtype]
    _assert_close("out", out, want_out, tol)
    for name, leaf, ref in zip(("dq", "dk", "dv"), leaves, (want_dq, want_dk, want_dv)):
        _assert_close(name, leaf.grad, ref, tol)


def test_backward_is_deterministic():
    """dK/dV are written once per key tile (no atomics): two runs agree bit for bit."""
    attn = _kernels()
    q, k, v, grad_out = _inputs(1, 2, 1, 65, 32, torch.float32)
    out, lse = attn.attention_fwd(q, k, v, 0.2)
    first = attn.attention_bwd(grad_out, q, k, v, out, lse, 0.2)
    second = attn.attention_bwd(grad_out, q, k, v, out, lse, 0.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "shapes,dtype,error",
    [
        (((1, 2, 8, 48), (1, 2, 8, 48)), torch.float32, "head_dim=48"),
        (((1, 3, 8, 32), (1, 2, 8, 32)), torch.float32, "multiple of kv_heads=2"),
        (((1, 2, 8, 32), (1, 2, 8, 32)), torch.float16, "fp32 or bf16"),
        (((1, 2, 8, 32), (1, 2, 9, 32)), torch.float32, "does not match"),
    ],
)
def test_bad_input_names_the_problem(shapes, dtype, error):
    attn = _kernels()
    q = torch.randn(shapes[0]).to(dtype)
    k = torch.randn(shapes[1]).to(dtype)
    with pytest.raises((ValueError, TypeError), match=error):
        attn.attention_fwd(q, k, k.clone(), 0.1)
