"""The chunked LM-head cross-entropy against the plain one (values and gradients w.r.t. hidden states, weight and
bias), and its memory: saved tensors and the measured peak are below the plain loss's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslscale.bench.common import peak_extra_bytes
from sslscale.models.lm_loss import LMHead, chunked_cross_entropy


def _plain(hidden, weight, targets, bias=None, reduction="mean"):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=-100, reduction=reduction)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_plain(reduction, with_bias):
    b, t, d, v = 3, 37, 24, 101  # 111 rows: the chunk of 16 does not divide them
    hidden, weight, bias = torch.randn(b, t, d), 0.3 * torch.randn(v, d), torch.randn(v)
    targets = torch.randint(0, v, (b, t))
    targets[0, :5] = -100
    targets[2, -3:] = -100
    grad_scale = torch.tensor(1.7)
    results = []
    for fn in (_plain, lambda h, w, y, bb, r: chunked_cross_entropy(h, w, y, bb, chunk_size=16, reduction=r)):
        h, w, bb = _leaves(hidden, weight, bias)
        loss = fn(h, w, targets, bb if with_bias else None, reduction)
        (loss * grad_scale).backward()
        results.append((loss.detach(), h.grad, w.grad, bb.grad))
    (l0, h0, w0, b0), (l1, h1, w1, b1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-6)
    if with_bias:
        torch.testing.assert_close(b1, b0, rtol=1e-5, atol=1e-6)
    else:
        assert b1 is None
    assert h1[0, :5].abs().max() == 0  # ignored positions get no gradient


def test_bf16_inputs_follow_the_fp32_loss():
    hidden, weight = torch.randn(64, 32), 0.2 * torch.randn(300, 32)
    targets = torch.randint(0, 300, (64,))
    h, w = _leaves(hidden.bfloat16(), weight.bfloat16())
    loss = chunked_cross_entropy(h, w, targets, chunk_size=20)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    h32, w32 = _leaves(h.detach().float(), w.detach().float())
    ref = _plain(h32, w32, targets)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.grad.float(), h32.grad, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(w.grad.float(), w32.grad, rtol=2e-2, atol=2e-4)


def test_only_the_inputs_that_require_grad_get_one_and_no_grad_mode_computes_the_loss_only():
    hidden, weight = torch.randn(30, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (30,))
    h = hidden.clone().requires_grad_()
    loss = chunked_cross_entropy(h, weight, targets, chunk_size=8)
    assert loss.grad_fn.grads[1] is None and loss.grad_fn.grads[2] is None  # frozen weight: no dW computed
    loss.backward()
    h0 = hidden.clone().requires_grad_()
    _plain(h0, weight, targets).backward()
    torch.testing.assert_close(h.grad, h0.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(h, weight, targets), _plain(hidden, weight, targets))


def test_all_targets_ignored_gives_zero_not_nan():
    h, w = _leaves(torch.randn(4, 8), torch.randn(10, 8))
    loss = chunked_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_bad_inputs_are_clear_errors():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="targets must have shape"):
        chunked_cross_entropy(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        chunked_cross_entropy(h, w, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="disagree"):
        chunked_cross_entropy(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), reduction="avg")
    h.requires_grad_()
    loss = chunked_cross_entropy(h, w, torch.zeros(4, dtype=torch.long))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def _held_bytes(fn) -> int:
    """Bytes the autograd graph of `loss = fn()` holds for backward: tensors saved by its nodes (storage counted
    once) plus, for the chunked loss, the gradients its forward already computed (kept on its node)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    stored = getattr(loss.grad_fn, "grads", None) or ()
    return sum(seen.values()) + sum(g.nbytes for g in stored if g is not None)


def test_memory_below_the_plain_loss():
    n, d, v, chunk = 2048, 64, 8192, 256
    hidden, weight = torch.randn(n, d), 0.1 * torch.randn(v, d)
    targets = torch.randint(0, v, (n,))
    logits_bytes = n * v * 4
    inputs_bytes = (n * d + v * d) * 4

    def run(fn):
        h, w = _leaves(hidden, weight)
        fn(h, w).backward()

    def plain(h, w):
        return _plain(h, w, targets)

    def chunked(h, w):
        return chunked_cross_entropy(h, w, targets, chunk_size=chunk)

    held_plain = _held_bytes(lambda: plain(*_leaves(hidden, weight)))
    held_chunked = _held_bytes(lambda: chunked(*_leaves(hidden, weight)))
    assert held_plain >= logits_bytes  # the plain loss keeps (N, V) log-probabilities
    assert held_chunked <= inputs_bytes  # chunked: dh and dW, the size of its inputs
    run(chunked)  # warm up allocator pools
    run(plain)
    peak_chunked = peak_extra_bytes(lambda: run(chunked), torch.device("cpu"))
    peak_plain = peak_extra_bytes(lambda: run(plain), torch.device("cpu"))
    assert peak_plain > 2 * logits_bytes
    assert peak_chunked < peak_plain / 3, (peak_chunked, peak_plain)


def test_lm_head_module_logits_loss_and_tying():
    emb = torch.nn.Embedding(50, 16)
    head = LMHead(16, 50, tied_to=emb, bias=True, chunk_size=7)
    assert head.weight is emb.weight
    with torch.no_grad():
        head.bias.normal_()
    h, y = torch.randn(2, 9, 16), torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(head(h), h @ emb.weight.T + head.bias)
    torch.testing.assert_close(head(h, y), _plain(h, emb.weight, y, head.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        head(h, y, reduction="sum"), _plain(h, emb.weight, y, head.bias, "sum"), rtol=1e-5, atol=1e-4
    )
    with pytest.raises(ValueError, match="tied embedding has shape"):
        LMHead(16, 51, tied_to=emb)
