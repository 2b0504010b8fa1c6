import copy
import math

import pytest
import torch

from sslscale.models import build_encoder
from sslscale.objectives import Objective, StepContext, build_objective
from sslscale.objectives.base import SetupContext
from sslscale.objectives.momentum import MomentumTarget, cosine_momentum
from sslscale.ops.reference import nt_xent


def _tiny_encoder():
    return build_encoder("convnet_small", widths=[8, 16], strides=[2, 2])


def _views(n=6):
    return {"view1": torch.rand(n, 1, 28, 28), "view2": torch.rand(n, 1, 28, 28), "label": torch.zeros(n).long()}


def test_simclr_loss_equals_reference_nt_xent_on_projections():
    obj = build_objective(
        "simclr", _tiny_encoder(), proj_hidden_dim=32, proj_dim=16, temperature=0.3, backend="reference"
    )
    assert isinstance(obj, Objective) and obj.batch_keys == ("view1", "view2")
    batch = _views()
    loss, metrics = obj(batch)
    # the projections as the objective computes them (one pass over both views, same BN batch statistics)
    z = obj.projector(obj.encoder(torch.cat([batch["view1"], batch["view2"]])))
    expected = nt_xent(z[:6].double(), z[6:].double(), 0.3)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert set(metrics) >= {"loss", "pos_acc", "pos_cos"}
    assert all(not v.requires_grad for v in metrics.values())


def test_simclr_gradients_reach_encoder_and_head():
    obj = build_objective("simclr", _tiny_encoder(), proj_hidden_dim=32, proj_dim=16)
    loss, _ = obj(_views())
    loss.backward()
    for name, p in obj.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert obj.encoder.features[0][0].weight.grad.abs().sum() > 0
    assert obj.projector.net[-1].weight.grad.abs().sum() > 0


def test_simclr_learns_to_match_views():
    """A few steps on fixed pairs must lower the loss: the objective is trainable end to end."""
    torch.manual_seed(0)
    obj = build_objective("simclr", _tiny_encoder(), proj_hidden_dim=32, proj_dim=16, temperature=0.5)
    opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
    base = torch.rand(16, 1, 28, 28)
    batch = {"view1": base + 0.05 * torch.randn_like(base), "view2": base + 0.05 * torch.randn_like(base)}
    first = None
    for _ in range(15):
        loss, _ = obj(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.3


def test_objective_errors():
    with pytest.raises(ValueError, match="simclr"):
        build_objective("simclrr", _tiny_encoder())
    obj = build_objective("simclr", _tiny_encoder())
    with pytest.raises(KeyError, match="view2"):
        obj({"view1": torch.rand(2, 1, 28, 28)})
    with pytest.raises(ValueError, match="temperature"):
        build_objective("simclr", _tiny_encoder(), temperature=0.0)
    obj.after_step(StepContext(step=1, total_steps=10, zero_stage=0, world_size=1, rank=0))  # default: nothing


# ---- the contract's defaults, BYOL, MoCo v2 and the momentum machinery ----

CTX = SetupContext(zero_stage=0, world_size=1, rank=0, dtype=torch.float32, device=torch.device("cpu"))


def _step(step, total=10, skipped=False, forwards=(True,)):
    return StepContext(
        step=step, total_steps=total, zero_stage=0, world_size=1, rank=0, skipped=skipped, forwards=forwards
    )


def _byol(**kw):
    kw = {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 24, **kw}
    obj = build_objective("byol", _tiny_encoder(), **kw)
    obj.setup(CTX)
    return obj


def _moco(**kw):
    kw = {"proj_hidden_dim": 32, "proj_dim": 16, "queue_size": 20, "temperature": 0.3, **kw}
    obj = build_objective("moco_v2", _tiny_encoder(), **kw)
    obj.setup(CTX)
    return obj


def test_byol_loss_and_gradients_equal_a_plain_reimplementation():
    torch.manual_seed(1)
    obj = _byol()
    with torch.no_grad():  # a target that differs from the online network
        for p in list(obj.target_encoder.parameters()) + list(obj.target_projector.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    batch = _views(6)
    loss, metrics = obj(batch)
    grads = torch.autograd.grad(loss, list(obj.encoder.parameters()) + list(obj.predictor.parameters()))

    ref = copy.deepcopy(obj)  # the same weights and BN state, computed the long way
    ref.load_state_dict(obj.state_dict())
    for m_ref, m in zip(ref.modules(), obj.modules()):  # undo the BN running-stat update of the first pass
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m_ref.running_mean.copy_(m.running_mean)
    both = torch.cat([batch["view1"], batch["view2"]])
    p = ref.predictor(ref.projector(ref.encoder(both)))
    with torch.no_grad():
        t = ref.target_projector(ref.target_encoder(both))

    def nmse(a, b):
        return ((a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)) ** 2).sum(dim=1).mean()

    expected = nmse(p[:6], t[6:]) + nmse(p[6:], t[:6])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad(expected, list(ref.encoder.parameters()) + list(ref.predictor.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in obj.target_encoder.parameters())  # no gradient reaches the target
    assert set(metrics) >= {"loss", "pos_cos", "z_std", "momentum"}
    assert 0 < float(metrics["z_std"]) < 1


def test_moco_loss_and_gradients_equal_a_plain_reimplementation():
    torch.manual_seed(2)
    obj = _moco()
    batch = _views(5)
    loss, metrics = obj(batch)
    grads = torch.autograd.grad(loss, list(obj.encoder.parameters()) + list(obj.projector.parameters()))

    q = obj.projector(obj.encoder(batch["view1"]))
    q = q / q.norm(dim=1, keepdim=True)
    with torch.no_grad():
        k = obj.target_projector(obj.target_encoder(batch["view2"]))
        k = k / k.norm(dim=1, keepdim=True)
    terms = []
    for i in range(5):  # -log( e^{q.k/T} / (e^{q.k/T} + sum_j e^{q.queue_j/T}) ), one query at a time
        pos = torch.exp(q[i] @ k[i] / 0.3)
        neg = sum(torch.exp(q[i] @ obj.queue[j] / 0.3) for j in range(20))
        terms.append(-torch.log(pos / (pos + neg)))
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad(expected, list(obj.encoder.parameters()) + list(obj.projector.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert set(metrics) >= {"loss", "pos_acc", "pos_cos", "neg_cos"}


def test_moco_queue_is_a_ring_of_counted_keys_and_skips_dropped_ones():
    obj = _moco(queue_size=8)
    start = obj.queue.clone()
    batches = [_views(3) for _ in range(3)]
    keys = []
    for batch in batches[:2]:
        obj(batch)
        keys.append(obj._pending[-1].clone())
    obj.after_step(_step(1, forwards=(True, False)))  # the second forward's loss did not count
    assert torch.equal(obj.queue[:3], keys[0]) and torch.equal(obj.queue[3:], start[3:])
    assert int(obj.queue_ptr) == 3
    for _ in range(2):
        obj(batches[2])
        obj.after_step(_step(2))
    assert int(obj.queue_ptr) == (3 + 6) % 8  # wrapped around
    obj(batches[0])
    obj.after_step(_step(3, skipped=True, forwards=(False,)))  # a skipped step enqueues nothing
    assert int(obj.queue_ptr) == 1 and obj._pending == []
    obj(batches[0])
    with pytest.raises(RuntimeError, match="saw 1 training forwards since the last step but the engine reports 2"):
        obj.after_step(_step(4, forwards=(True, True)))
    obj.eval()
    obj(batches[0])  # an eval forward is not a training forward
    assert obj._pending == []
    with pytest.raises(ValueError, match="queue_size 8 is smaller than the 9 keys"):
        obj.enqueue(torch.zeros(9, 16))


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    values = [cosine_momentum(s, 100, 0.99) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_byol_after_step_applies_the_scheduled_ema_and_skips_skipped_steps():
    obj = _byol(base_momentum=0.9)
    with torch.no_grad():
        for p in obj.encoder.parameters():
            p.add_(1.0)  # the online network moved
    online = [p.detach().clone() for p in obj.encoder.parameters()]
    target = [p.detach().clone() for p in obj.target_encoder.parameters()]
    obj.after_step(_step(3, total=10, skipped=True, forwards=(False,)))
    assert all(torch.equal(a, b) for a, b in zip(target, obj.target_encoder.parameters()))
    obj.after_step(_step(3, total=10))
    tau = cosine_momentum(2, 10, 0.9)
    for t0, o, t in zip(target, online, obj.target_encoder.parameters()):
        torch.testing.assert_close(t.detach(), tau * t0 + (1 - tau) * o)
    assert float(obj.tau) == pytest.approx(tau)


def test_byol_groups_train_online_and_predictor_only_with_the_predictor_lr():
    obj = _byol(predictor_lr_scale=10.0)
    groups = obj.param_groups()
    trained = {id(p) for g in groups for p in g.params}
    assert not trained & {id(p) for p in obj.target_encoder.parameters()}
    assert not trained & {id(p) for p in obj.target_projector.parameters()}
    assert trained == {id(p) for p in obj.parameters() if p.requires_grad}
    pred = {id(p) for p in obj.predictor.parameters()}
    assert all(g.lr_scale == (10.0 if {id(p) for p in g.params} <= pred else 1.0) for g in groups)
    assert set(obj.untrained_modules()) == {"target_encoder", "target_projector"}
    assert obj.export_modules == ("encoder",)


def test_ema_in_bf16_keeps_an_fp32_shadow_that_tracks_the_fp32_ema():
    """A bf16 EMA at m = 0.996 rounds its updates away; the shadow keeps the fp32 trajectory."""
    torch.manual_seed(0)
    owner = torch.nn.Module()
    owner.online = torch.nn.Linear(32, 32).bfloat16()
    owner.target = freeze_copy(owner.online)
    ema = MomentumTarget(["online"], ["target"])
    ema.setup(owner, SetupContext(0, 1, 0, torch.bfloat16, torch.device("cpu")))
    assert {n for n, _ in ema.named_buffers()} == {"shadow_0_0", "shadow_1_0"}
    exact = owner.target.weight.detach().float().clone()
    naive = owner.target.weight.detach().clone()
    drift = 0.02 * torch.randn(32, 32)
    m = 0.996
    for _ in range(300):
        with torch.no_grad():
            owner.online.weight.copy_((owner.online.weight.float() + drift / 100).bfloat16())
        ema.update(m)
        exact = m * exact + (1 - m) * owner.online.weight.detach().float()
        naive.mul_(m).add_(owner.online.weight.detach(), alpha=1 - m)
    err = (owner.target.weight.detach().float() - exact).abs().max()
    naive_err = (naive.float() - exact).abs().max()
    ulp = exact.abs().max() * 2**-7
    assert err <= ulp  # within one bf16 rounding of the fp32 EMA
    assert naive_err > 10 * err  # what a plain bf16 EMA loses


def freeze_copy(module):
    out = copy.deepcopy(module)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def test_momentum_target_rejects_mismatched_modules_and_unready_use():
    owner = torch.nn.Module()
    owner.a, owner.b = torch.nn.Linear(2, 3), torch.nn.Linear(3, 2)
    ema = MomentumTarget(["a"], ["b"])
    with pytest.raises(RuntimeError, match="before setup"):
        ema.update(0.9)
    with pytest.raises(ValueError, match=r"target shape \(2, 3\) != online shape \(3, 2\)"):
        ema.setup(owner, CTX)
    with pytest.raises(ValueError, match="as many target modules"):
        MomentumTarget(["a"], [])


def test_byol_learns_to_match_views():
    """A few steps on fixed pairs raise the agreement between views: trainable end to end, EMA included (MoCo's
    learning is checked on real data by the recipe test: fixed pairs would fill its queue with the positives)."""
    base = torch.rand(16, 1, 28, 28)
    batch = {"view1": base + 0.05 * torch.randn_like(base), "view2": base + 0.05 * torch.randn_like(base)}
    torch.manual_seed(0)
    obj = _byol()
    opt = torch.optim.Adam([p for p in obj.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for step in range(1, 16):
        loss, metrics = obj(batch)
        first = first if first is not None else (loss.item(), float(metrics["pos_cos"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_step(_step(step, total=15))
    assert loss.item() < first[0] - 0.1 and float(metrics["pos_cos"]) > first[1], (first, loss, metrics)
    assert math.isfinite(loss.item())
