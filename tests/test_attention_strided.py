"""`causal_attention` on the layouts models produce: (B, T, H, D) projections viewed as (B, H, T, D).

Every fused backend must read such views in place (no copy: checked with the profiler for the C++ op, whose copies
would be `aten::copy_` dispatcher calls, and by the data pointers the Triton kernels receive), compute the same
values and gradients as the fp64 reference, and return the output and gradients in the layout of their input
(`empty_like`), so the model's `out.transpose(1, 2).reshape(B, T, H * D)` and the gradients of its (B, T, H, D)
projections need no copy either.
"""

from __future__ import annotations

import math

import pytest
import torch

from sslscale.ops import availability, backends, causal_attention, reference

BACKENDS = [
    pytest.param(("cpp", "cpu"), id="cpp-cpu"),
    pytest.param(("triton", "cpu"), id="triton-interp"),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
]
TOLERANCE = {torch.float32: 5e-5, torch.bfloat16: 3e-2}
_COPIES = ("aten::copy_", "aten::clone", "aten::contiguous")


@pytest.fixture(params=BACKENDS)
def backend(request) -> tuple[str, torch.device]:
    name, device_type = request.param
    device = torch.device(device_type)
    avail = availability("attention", name, device)
    if not avail.usable:
        pytest.skip(f"{name} on {device_type}: {avail.reason}")
    return name, device


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.detach().cpu().double() - expected.detach().cpu().double()).abs().max().item()
    bound = tol * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def _projections(b, t, h, hkv, d, dtype, device, fused: bool):
    """Leaves in the model's layout and their (B, H, T, D) views: separate (B, T, H, D) projections, or one fused
    (B, T, H + 2 Hkv, D) projection split along heads (views with gaps between rows)."""
    if fused:
        qkv = torch.randn(b, t, h + 2 * hkv, d, dtype=dtype, device=device, requires_grad=True)
        q, k, v = qkv.split([h, hkv, hkv], dim=2)
        return [qkv], (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    leaves = [torch.randn(b, t, n, d, dtype=dtype, device=device, requires_grad=True) for n in (h, hkv, hkv)]
    return leaves, tuple(x.transpose(1, 2) for x in leaves)


def _model_step(views, w, name):
    """out -> (B, T, H * D) as a model would reshape it, then a weighted sum (grad_out arrives strided)."""
    out = causal_attention(*views, backend=name)
    b, h, t, d = out.shape
    merged = out.transpose(1, 2).reshape(b, t, h * d)
    (merged * w).sum().backward()
    return out


def _reference_grads(views, w):
    v64 = [x.detach().cpu().double().requires_grad_() for x in views]
    out = reference.attention(*v64)
    b, h, t, d = out.shape
    (out.transpose(1, 2).reshape(b, t, h * d) * w.cpu().double()).sum().backward()
    return out.detach(), [x.grad for x in v64]


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-qkv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_views_give_reference_values_and_gradients(backend, dtype, fused):
    name, device = backend
    b, t, h, hkv, d = 2, 37, 4, 2, 32
    leaves, views = _projections(b, t, h, hkv, d, dtype, device, fused)
    assert not views[0].is_contiguous()
    w = torch.randn(b, t, h * d, dtype=dtype, device=device)
    out = _model_step(views, w, name)
    want_out, want_grads = _reference_grads(views, w)
    tol = TOLERANCE[dtype]
    _close(out, want_out, tol, "out")
    if not fused:
        assert out.stride() == views[0].stride(), "out must come back in q's (B, T, H, D) layout"
        for leaf in leaves:
            assert leaf.grad.is_contiguous(), "the (B, T, H, D) projection's gradient must need no copy"
    grads = [leaf.grad for leaf in leaves]
    if fused:
        grads = list(grads[0].split([h, hkv, hkv], dim=2))
    for what, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
        _close(got.transpose(1, 2), want, tol, what)


def test_cpp_reads_views_without_copies():
    """The profiler sees every dispatcher op the C++ kernel calls: no copy of any operand, forward or backward."""
    if not availability("attention", "cpp", torch.device("cpu")).usable:
        pytest.skip("cpp attention not built")
    for fused in (False, True):
        leaves, views = _projections(2, 70, 4, 2, 64, torch.float32, torch.device("cpu"), fused)
        grad_out = torch.randn(2, 70, 4, 64).transpose(1, 2)  # what out.transpose(1, 2).reshape(...) sends back
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = causal_attention(*views, backend="cpp")
            out.backward(grad_out)
        names = {e.name for e in prof.events()}
        assert "sslscale::attention_fwd" in names and "sslscale::attention_bwd" in names
        copies = sorted(names & set(_COPIES))
        assert not copies, f"fused={fused}: the C++ attention copied its operands ({copies})"


def test_cuda_reads_views_without_copies():
    if not (torch.cuda.is_available() and availability("attention", "cuda", torch.device("cuda")).usable):
        pytest.skip("needs the CUDA kernels on a GPU")
    leaves, views = _projections(2, 300, 8, 2, 64, torch.bfloat16, torch.device("cuda"), False)
    w = torch.randn(2, 300, 8 * 64, dtype=torch.bfloat16, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _model_step(views, w, "cuda")
    names = {e.name for e in prof.events()}
    assert "sslscale::attention_fwd" in names
    copies = sorted(names & set(_COPIES))
    assert not copies, f"the CUDA attention copied its operands ({copies})"


test_cuda_reads_views_without_copies = pytest.mark.gpu(test_cuda_reads_views_without_copies)


class _Recorder:
    """Stands in for a Triton kernel object: records the tensors each launch receives, then launches."""

    def __init__(self, kernel, seen: list):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append([a for a in args if isinstance(a, torch.Tensor)])
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_triton_launches_on_the_views_themselves(monkeypatch):
    """The Triton kernels get the caller's storage (same data pointers and strides), not copies."""
    name, device = "triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not availability("attention", name, device).usable:
        pytest.skip("triton attention not usable here")
    attn = backends.kernels("attention", name)
    seen: dict[str, list] = {}
    for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_delta_kernel"):
        seen[kernel] = []
        monkeypatch.setattr(attn, kernel, _Recorder(getattr(attn, kernel), seen[kernel]))
    leaves, views = _projections(1, 40, 2, 1, 32, torch.float32, device, False)
    w = torch.randn(1, 40, 2 * 32, device=device)
    out = _model_step(views, w, name)
    q, k, v = views
    fwd_args = seen["_fwd_kernel"][0]
    assert [a.data_ptr() for a in fwd_args[:3]] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]
    assert fwd_args[3].data_ptr() == out.data_ptr() and out.stride() == q.stride()
    for kernel in ("_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        args = seen[kernel][0]
        assert [a.data_ptr() for a in args[:3]] == [q.data_ptr(), k.data_ptr(), v.data_ptr()], kernel
        assert args[3].stride() == q.stride(), f"{kernel}: grad_out should arrive as the model's strided view"
    _close(out, reference.attention(*(x.detach().double() for x in views)), 5e-5, "out")


def test_feature_strided_inputs_are_copied_and_still_right(backend):
    """A feature stride other than 1 cannot be read by rows: the op copies it once and gives the same result."""
    name, device = backend
    base = torch.randn(1, 2, 21, 64, 2, device=device)
    q = base[..., 0]  # feature stride 2
    k, v = torch.randn(1, 2, 21, 64, device=device), torch.randn(1, 2, 21, 64, device=device)
    assert q.stride(-1) == 2
    out = causal_attention(q, k, v, backend=name)
    _close(out, reference.attention(q.double(), k.double(), v.double()), 5e-5, "out")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -0.5])
def test_bad_scale_is_an_error_everywhere(scale):
    """`scale=nan` used to run silently on cpp; every entry point refuses a scale that is not finite and > 0."""
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        causal_attention(q, q, q, scale=scale)
    if availability("attention", "cpp", torch.device("cpu")).usable:
        with pytest.raises(RuntimeError, match="scale must be finite and > 0"):
            torch.ops.sslscale.attention_fwd(q, q, q, scale)
        out, lse = torch.ops.sslscale.attention_fwd(q, q, q, 0.5)
        with pytest.raises(RuntimeError, match="scale must be finite and > 0"):
            torch.ops.sslscale.attention_bwd(out, q, q, q, out, lse, scale)
    if availability("attention", "triton", torch.device("cpu")).usable:
        attn = backends.kernels("attention", "triton")
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            attn.attention_fwd(q, q, q, scale)


def test_scale_must_be_a_number():
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(TypeError, match="scale must be a float"):
        causal_attention(q, q, q, scale="0.1")
    assert math.isclose(
        float(causal_attention(q, q, q, scale=torch.tensor(0.5), backend="reference").sum()),
        float(causal_attention(q, q, q, scale=0.5, backend="reference").sum()),
        rel_tol=1e-6,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_more_than_65535_heads(name):
    """batch x heads beyond the 65535 limit of a grid's y axis: the grids are one-dimensional."""
    if not (torch.cuda.is_available() and availability("attention", name, torch.device("cuda")).usable):
        pytest.skip(f"{name} attention not usable on CUDA here")
    q, k, v = (torch.randn(70000, 1, 3, 32, device="cuda", requires_grad=True) for _ in range(3))
    out = causal_attention(q, k, v, backend=name)
    out.backward(torch.ones_like(out))
    want = reference.attention(q.detach(), k.detach(), v.detach())
    _close(out, want, 5e-5, "out with B*H = 70000")
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_gpu_backend_order_prefers_triton(monkeypatch):
    """Automatic choice on CUDA tensors: triton (wgmma on Hopper) before cuda (mma.sync), see ops/backends.py."""
    monkeypatch.delenv("SSLSCALE_BACKEND", raising=False)
    usable = {"triton", "cuda", "reference"}
    monkeypatch.setattr(
        backends, "availability", lambda op, name, device: backends.Availability(name in usable, "stand-in")
    )
    assert backends.resolve("attention", None, torch.device("cuda")) == "triton"
    assert backends.resolve("infonce", None, torch.device("cuda")) == "triton"
    usable.discard("triton")
    assert backends.resolve("infonce", None, torch.device("cuda")) == "cuda"
