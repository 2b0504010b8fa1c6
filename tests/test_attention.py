"""`causal_attention` on every backend usable here, checked against the fp64 materialised reference and SDPA.

Backends: cpp on CPU; Triton on CPU under the interpreter (when `sslscale.kernels.attention` exists; small shapes,
the interpreter is slow); cuda and Triton on CUDA (`gpu`, skipped without a device). Shapes include sequence
lengths that are not multiples of any tile (1, 7, 129, 513), all head dims and grouped-query heads.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslscale.ops import availability, backends, causal_attention, reference

BACKENDS = [
    pytest.param(("cpp", "cpu"), id="cpp-cpu"),
    pytest.param(("triton", "cpu"), id="triton-interp"),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
]

# (B, H, H_kv, T, D): odd lengths around the tile sizes, every head dim, MHA, GQA and MQA.
CASES = [
    (2, 4, 4, 1, 64),
    (2, 4, 2, 7, 32),
    (1, 4, 1, 64, 128),
    (2, 4, 2, 129, 64),
    (1, 2, 1, 513, 64),
    (1, 2, 2, 513, 128),
    (1, 4, 2, 300, 32),
]
# The Triton interpreter pays per tile step: the same kinds of shape, shorter and on fewer heads.
INTERPRETER_CASES = [(1, 2, 2, 1, 64), (1, 4, 2, 7, 32), (1, 2, 1, 129, 128), (1, 1, 1, 200, 64)]

# Bound on max |actual - expected| relative to max(1, max |expected|), per input dtype.
TOLERANCE = {torch.float32: 5e-5, torch.bfloat16: 3e-2}


@pytest.fixture(params=BACKENDS)
def backend(request) -> tuple[str, torch.device]:
    name, device_type = request.param
    device = torch.device(device_type)
    avail = availability("attention", name, device)
    if not avail.usable:
        pytest.skip(f"{name} on {device_type}: {avail.reason}")
    return name, device


def _cases(backend: tuple[str, torch.device]) -> list[tuple[int, int, int, int, int]]:
    name, device = backend
    return INTERPRETER_CASES if (name == "triton" and device.type == "cpu") else CASES


def _qkv(b, h, hkv, t, d, dtype, device="cpu"):
    q = torch.randn(b, h, t, d, dtype=dtype, device=device)
    k = torch.randn(b, hkv, t, d, dtype=dtype, device=device)
    v = torch.randn(b, hkv, t, d, dtype=dtype, device=device)
    return q, k, v


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.detach().cpu().double() - expected.detach().cpu().double()).abs().max().item()
    bound = tol * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def _fp64_reference(q, k, v, grad_out, scale=None):
    """Output and input gradients of the materialised reference in fp64, from the very same input values."""
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    out = reference.attention(q64, k64, v64, scale)
    out.backward(grad_out.detach().cpu().double())
    return out.detach(), q64.grad, k64.grad, v64.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_gradients_match_fp64_reference(backend, dtype):
    name, device = backend
    for b, h, hkv, t, d in _cases(backend):
        shape = f"{name} B{b} H{h} Hkv{hkv} T{t} D{d} {dtype}"
        q, k, v = (x.requires_grad_() for x in _qkv(b, h, hkv, t, d, dtype, device))
        out = causal_attention(q, k, v, backend=name)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        ref_out, ref_dq, ref_dk, ref_dv = _fp64_reference(q, k, v, grad_out)
        assert out.dtype == dtype and q.grad.dtype == dtype and k.grad.dtype == dtype, shape
        tol = TOLERANCE[dtype]
        _assert_close(out, ref_out, tol, f"out {shape}")
        _assert_close(q.grad, ref_dq, tol, f"dq {shape}")
        _assert_close(k.grad, ref_dk, tol, f"dk {shape}")
        _assert_close(v.grad, ref_dv, tol, f"dv {shape}")


@pytest.mark.parametrize("scale", [None, 0.3])
def test_lse_matches_reference(backend, scale):
    name, device = backend
    impl = backends.kernels("attention", name)
    for b, h, hkv, t, d in _cases(backend)[:4]:
        q, k, v = _qkv(b, h, hkv, t, d, torch.float32, device)
        s = d**-0.5 if scale is None else scale
        out, lse = impl.attention_fwd(q, k, v, s)
        assert lse.shape == (b, h, t) and lse.dtype == torch.float32
        expected = reference.attention_lse(q.cpu().double(), k.cpu().double(), s)
        _assert_close(lse, expected, 1e-5, f"lse T{t} D{d} scale {s}")
        _assert_close(
            out,
            reference.attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), s),
            5e-5,
            f"out T{t} D{d} scale {s}",
        )


def test_matches_sdpa(backend):
    """A second, independent oracle: PyTorch's own causal SDPA (grouped-query heads via enable_gqa)."""
    name, device = backend
    for b, h, hkv, t, d in _cases(backend)[1:4]:
        q, k, v = (x.requires_grad_() for x in _qkv(b, h, hkv, t, d, torch.float32, device))
        out = causal_attention(q, k, v, backend=name)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        sdpa_grads = torch.autograd.grad(sdpa, (q, k, v), grad_out)
        _assert_close(out, sdpa, 1e-4, f"out vs SDPA T{t}")
        for what, ours, theirs in zip(("dq", "dk", "dv"), grads, sdpa_grads):
            _assert_close(ours, theirs, 1e-4, f"{what} vs SDPA T{t}")


def test_strided_inputs(backend):
    """Models produce q/k/v as (B, T, H, D) transposed to (B, H, T, D): not contiguous."""
    name, device = backend
    b, t, h, d = 2, 37, 4, 32
    q, k, v = (torch.randn(b, t, h, d, device=device).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    expected = reference.attention(q.cpu().double(), k.cpu().double(), v.cpu().double())
    _assert_close(causal_attention(q, k, v, backend=name), expected, 5e-5, "strided")


def _cpp_available() -> None:
    avail = availability("attention", "cpp", torch.device("cpu"))
    if not avail.usable:
        pytest.skip(avail.reason)


def test_cpp_gradcheck_fp64():
    """Finite differences in fp64: the full Jacobian at the smallest shape, random projections on a GQA one."""
    _cpp_available()
    fn = lambda q, k, v: causal_attention(q, k, v, backend="cpp")  # noqa: E731
    q, k, v = (x.requires_grad_() for x in _qkv(1, 1, 1, 3, 32, torch.float64))
    assert torch.autograd.gradcheck(fn, (q, k, v))
    q, k, v = (x.requires_grad_() for x in _qkv(2, 4, 2, 6, 32, torch.float64))
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_cpp_backward_is_deterministic():
    """No two tasks write the same memory: repeated backward passes agree bit for bit."""
    _cpp_available()
    q, k, v = _qkv(2, 4, 2, 300, 64, torch.float32)
    out, lse = torch.ops.sslscale.attention_fwd(q, k, v, 0.125)
    grad_out = torch.randn_like(out)
    first = torch.ops.sslscale.attention_bwd(grad_out, q, k, v, out, lse, 0.125)
    second = torch.ops.sslscale.attention_bwd(grad_out, q, k, v, out, lse, 0.125)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpp_opcheck(dtype):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of the raw ops."""
    _cpp_available()
    q, k, v = _qkv(1, 4, 2, 19, 32, dtype)
    scale = 32**-0.5
    torch.library.opcheck(
        torch.ops.sslscale.attention_fwd.default, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), scale)
    )
    out, lse = torch.ops.sslscale.attention_fwd(q.detach(), k.detach(), v.detach(), scale)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.sslscale.attention_bwd.default, (grad_out, q.detach(), k.detach(), v.detach(), out, lse, scale)
    )


# Public API: (q, k, v) builders and the words the error must contain.
_BAD_INPUTS = [
    ("rank", lambda: (torch.randn(2, 8, 32), torch.randn(2, 8, 32), torch.randn(2, 8, 32)), "4-D"),
    ("kv shape", lambda: (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 9, 32)), "same shape"),
    ("batch", lambda: (torch.randn(2, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)), "batch"),
    (
        "length",
        lambda: (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)),
        "sequence length",
    ),
    (
        "head_dim mismatch",
        lambda: (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)),
        "head_dim",
    ),
    (
        "heads",
        lambda: (torch.randn(1, 3, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)),
        "multiple of kv_heads",
    ),
    ("head_dim", lambda: (torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48)), "head_dim=48"),
    (
        "mixed dtypes",
        lambda: (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32).bfloat16(), torch.randn(1, 2, 8, 32)),
        "dtype",
    ),
    ("dtype", lambda: tuple(torch.randn(1, 2, 8, 32).half() for _ in range(3)), "float16"),
]


@pytest.mark.parametrize("make, words", [pytest.param(m, w, id=i) for i, m, w in _BAD_INPUTS])
def test_bad_input_is_named(make, words):
    with pytest.raises((ValueError, TypeError), match=words):
        causal_attention(*make())


def test_mixed_devices_are_named():
    q = torch.randn(1, 2, 8, 32)
    k = torch.randn(1, 2, 8, 32, device="meta")
    with pytest.raises(ValueError, match="one device"):
        causal_attention(q, k, k)


# The C++ kernel checks its contract itself too (torch.ops.sslscale.* is callable without the Python wrapper).
_BAD_KERNEL_INPUTS = [
    ("rank", (torch.randn(2, 8, 32),) * 3, "4-D"),
    ("kv shape", (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 1, 8, 32)), "same shape"),
    ("heads", (torch.randn(1, 3, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)), "multiple of kv_heads=2"),
    ("length", (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)), "T=8"),
    ("head_dim", (torch.randn(1, 2, 8, 40),) * 3, "head_dim=40"),
    (
        "mixed dtypes",
        (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32).double(), torch.randn(1, 2, 8, 32)),
        "one dtype",
    ),
    ("dtype", (torch.randn(1, 2, 8, 32).half(),) * 3, "Half is not supported"),
]


@pytest.mark.parametrize("args, words", [pytest.param(a, w, id=i) for i, a, w in _BAD_KERNEL_INPUTS])
def test_cpp_kernel_rejects_bad_input(args, words):
    _cpp_available()
    with pytest.raises(RuntimeError, match=words):
        torch.ops.sslscale.attention_fwd(*args, 0.125)


def test_cpp_backward_rejects_bad_lse():
    _cpp_available()
    q, k, v = _qkv(1, 2, 1, 8, 32, torch.float32)
    out, lse = torch.ops.sslscale.attention_fwd(q, k, v, 0.125)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        torch.ops.sslscale.attention_bwd(out, q, k, v, out, lse[:, :1], 0.125)
    with pytest.raises(RuntimeError, match="lse must be float32"):
        torch.ops.sslscale.attention_bwd(out, q, k, v, out, lse.double(), 0.125)
    with pytest.raises(RuntimeError, match="grad_out and out must have q's shape"):
        torch.ops.sslscale.attention_bwd(out[:, :, :4], q, k, v, out, lse, 0.125)


def test_single_row_attends_to_itself_only(backend):
    """Row 0 sees key 0 alone: its output is v_0 exactly and its lse is q_0 . k_0 * scale (an exact anchor)."""
    name, device = backend
    q, k, v = _qkv(1, 2, 1, 9, 64, torch.float32, device)
    out, lse = backends.kernels("attention", name).attention_fwd(q, k, v, 0.125)
    _assert_close(out[:, :, 0], v[:, :, 0].expand(1, 2, 64), 1e-6, "first row")
    expected = (q[:, :, 0] * k[:, :, 0]).sum(-1) * 0.125
    _assert_close(lse[:, :, 0], expected, 1e-5, "first lse")
    assert math.isfinite(lse.abs().max().item())


def test_bench_counts_and_scales_the_reference(tmp_path, monkeypatch):
    """`sslscale bench attention` on a tiny case: FLOP count, SDPA as the unit, a reference over budget scaled up."""
    import argparse
    import json

    from sslscale.bench import attention as bench

    monkeypatch.setattr(bench.common, "matmul_gflops", lambda *a, **k: 100.0)  # the yardstick is not under test
    assert bench.causal_flops(1, 1, 8, 32) == (2 * 8 * 8 * 32, 7 * 8 * 8 * 32)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "attention.json"
    args = parser.parse_args(
        ["--seq", "64", "--batch", "2", "--heads", "2", "--repeat", "1", "--reference-budget-gib", "1e-9"]
    )
    args.out = str(out)
    assert bench.run(args) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["sdpa"]["fb_vs_sdpa"] == 1.0
    assert rows["sdpa"]["fb_rate_of_matmul"] == pytest.approx(rows["sdpa"]["fb_rate"] / 100.0)
    assert rows["reference"]["ref_batch"] == 1 and rows["sdpa"]["ref_batch"] is None
    if availability("attention", "cpp", torch.device("cpu")).usable:
        assert rows["cpp"]["fb_ms"] > 0 and rows["cpp"]["fb_rate"] > 0
        layout = {r["impl"]: r for r in json.loads(out.read_text())["layout"]}
        assert set(layout) == {"cpp:view", "cpp:copy"} and "fb_copy_cost" in layout["cpp:copy"]
