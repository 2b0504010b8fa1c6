"""The C++/CUDA InfoNCE kernels (torch.ops.sslscale.* on CUDA tensors) against the fp64 oracle.

Needs a GPU and an extension built with a CUDA torch; on CPU machines `tests/test_cuda_compile.py` is what checks
these sources. Same cases and tolerances as the Triton kernels (fp32 accumulation in both)."""

from __future__ import annotations

import pytest
import torch

from sslscale import _ext
from sslscale.ops import backends
from tests.test_infonce_triton import CASES, TOL, _close, _oracle, _problem

pytestmark = pytest.mark.gpu


def _cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not backends.availability("infonce", "cuda", torch.device("cuda")).usable:
        pytest.skip(f"no CUDA kernel registered: {_ext.error() or 'extension built without CUDA'}")
    return backends.kernels("infonce", "cuda")


@pytest.mark.parametrize("m,n,d,dtype,scale,with_self", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_cuda_kernels_match_reference(m, n, d, dtype, scale, with_self):
    impl = _cuda_kernels()
    rows, cols, pos, self_idx, grad = _problem(m, n, d, dtype, scale, with_self)
    loss, lse = impl.infonce_fwd(rows, cols, pos, self_idx)
    d_rows, d_cols = impl.infonce_bwd(grad, rows, cols, pos, self_idx, lse)
    want_loss, want_lse, want_rows, want_cols = _oracle(rows, cols, pos, self_idx, grad)
    assert d_rows.dtype == rows.dtype and d_cols.dtype == cols.dtype
    _close(lse, want_lse, 1e-5, "lse")
    _close(loss, want_loss, 1e-5, "loss")
    _close(d_rows, want_rows, TOL[dtype], "d_rows")
    _close(d_cols, want_cols, TOL[dtype], "d_cols")


def test_cuda_backward_is_deterministic():
    impl = _cuda_kernels()
    rows, cols, pos, self_idx, grad = _problem(300, 500, 200, torch.float32, 10.0, True)
    _, lse = impl.infonce_fwd(rows, cols, pos, self_idx)
    first = impl.infonce_bwd(grad, rows, cols, pos, self_idx, lse)
    second = impl.infonce_bwd(grad, rows, cols, pos, self_idx, lse)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_cuda_rejects_bad_inputs_by_name():
    impl = _cuda_kernels()
    rows = torch.randn(4, 8, device="cuda")
    pos = torch.zeros(4, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="same feature dimension"):
        impl.infonce_fwd(rows, torch.randn(5, 7, device="cuda"), pos, pos)
    with pytest.raises(RuntimeError, match="pos must be Long"):
        impl.infonce_fwd(rows, torch.randn(5, 8, device="cuda"), pos.int(), pos)


@pytest.mark.parametrize(
    "m,n,d,dtype",
    [
        (300, 2000, 200, torch.bfloat16),  # column split, fp32 workspace accumulator (d > 128)
        (2048, 2048, 96, torch.float16),  # splits with the register accumulator, fp16 with its g scaling
        (130, 900, 1000, torch.float32),  # CUDA-core path, several feature chunks, workspace
        (4100, 70, 64, torch.bfloat16),  # many row tiles, one column split
    ],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_cuda_splits_and_accumulators(m, n, d, dtype):
    """The split plans of a real device (partials combined afterwards) and both accumulators."""
    impl = _cuda_kernels()
    rows, cols, pos, self_idx, grad = _problem(m, n, d, dtype, 20.0, True, seed=5)
    loss, lse = impl.infonce_fwd(rows, cols, pos, self_idx)
    d_rows, d_cols = impl.infonce_bwd(grad, rows, cols, pos, self_idx, lse)
    want_loss, want_lse, want_rows, want_cols = _oracle(rows, cols, pos, self_idx, grad)
    _close(lse, want_lse, 1e-5, "lse")
    _close(loss, want_loss, 1e-5, "loss")
    _close(d_rows, want_rows, TOL[dtype], "d_rows")
    _close(d_cols, want_cols, TOL[dtype], "d_cols")
    again = impl.infonce_bwd(grad, rows, cols, pos, self_idx, lse)
    assert torch.equal(again[0], d_rows) and torch.equal(again[1], d_cols), "splits must combine deterministically"


def test_cuda_runs_on_the_tensors_device():
    """Launches follow the tensors' device, not the current one (checked where two GPUs exist)."""
    impl = _cuda_kernels()
    if torch.cuda.device_count() < 2:
        rows, cols, pos, self_idx, grad = _problem(70, 90, 40, torch.bfloat16, 5.0, True)
        loss, _ = impl.infonce_fwd(rows, cols, pos, self_idx)
        assert loss.device == rows.device
        return
    with torch.cuda.device(0):
        rows, cols, pos, self_idx, grad = (t.to("cuda:1") for t in _problem(70, 90, 40, torch.bfloat16, 5.0, True))
        loss, lse = impl.infonce_fwd(rows, cols, pos, self_idx)
    _close(lse, _oracle(rows, cols, pos, self_idx, grad)[1], 1e-5, "lse on cuda:1")
