"""SimSiam, MoCo v3 and triplet: each loss and its gradients against a plain re-implementation on a tiny batch,
SimSiam's stop-gradient and fixed predictor lr, triplet mining against brute force, and the triplet's gathered
negatives on 2 gloo ranks against one process on the whole batch. (MoCo v3 through the engine on 1 vs 2 ranks:
tests/test_train_momentum.py.)"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sslscale.models import build_encoder
from sslscale.objectives import StepContext, build_objective
from sslscale.objectives.base import SetupContext
from sslscale.objectives.momentum import cosine_momentum
from sslscale.objectives.triplet import mine_negatives
from tests.dist_utils import run_distributed
from tests.train_doubles import TinyEncoder

CTX = SetupContext(zero_stage=0, world_size=1, rank=0, dtype=torch.float32, device=torch.device("cpu"))


def _tiny_encoder():
    return build_encoder("convnet_small", widths=[8, 16], strides=[2, 2])


def _views(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"view1": torch.rand(n, 1, 28, 28, generator=g), "view2": torch.rand(n, 1, 28, 28, generator=g)}


def _cos(a, b):
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_grads_close(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


# ---- SimSiam ----


def _simsiam(**kw):
    return build_objective(
        "simsiam", _tiny_encoder(), **{"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 8, **kw}
    )


def _simsiam_reference(obj, batch, stop_gradient=True):
    """The paper's pseudocode: D(p1, z2)/2 + D(p2, z1)/2, D(p, z) = -cos(p, z.detach())."""
    n = batch["view1"].shape[0]
    z = obj.projector(obj.encoder(torch.cat([batch["view1"], batch["view2"]])))
    p = obj.predictor(z)
    target = z.detach() if stop_gradient else z
    return -(_cos(p[:n], target[n:]).mean() + _cos(p[n:], target[:n]).mean()) / 2


def test_simsiam_loss_and_gradients_equal_a_plain_reimplementation():
    torch.manual_seed(0)
    obj = _simsiam()
    batch = _views()
    params = list(obj.parameters())
    loss, metrics = obj(batch)
    got = _grads(loss, params)
    expected = _simsiam_reference(obj, batch)  # train-mode BN: the same batch statistics, the same function
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    _assert_grads_close(got, _grads(expected, params))
    assert set(metrics) == {"loss", "pos_cos", "z_std"} and not any(v.requires_grad for v in metrics.values())
    torch.testing.assert_close(metrics["pos_cos"], -loss.detach(), rtol=1e-5, atol=1e-6)  # the symmetric mean
    assert 0 < float(metrics["z_std"]) < 1
    # the paper's heads: a 3-layer projector ending in an affine-free BN, a 2-layer bottleneck predictor
    linears = [m for m in obj.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and isinstance(obj.projector.net[-1], torch.nn.BatchNorm1d)
    assert not obj.projector.net[-1].affine
    assert [m.out_features for m in obj.predictor.modules() if isinstance(m, torch.nn.Linear)] == [8, 16]


def test_simsiam_stop_gradient_sends_no_gradient_through_the_target_branch():
    torch.manual_seed(1)
    obj = _simsiam()
    batch = _views(8, seed=1)
    projector = list(obj.projector.parameters())
    loss, _ = obj(batch)
    got = _grads(loss, projector)
    with_sg = _grads(_simsiam_reference(obj, batch, stop_gradient=True), projector)
    without_sg = _grads(_simsiam_reference(obj, batch, stop_gradient=False), projector)
    _assert_grads_close(got, with_sg)
    # the target branch's share is not small: a missing detach would be seen
    diff = max(float((a - b).abs().max()) for a, b in zip(got, without_sg))
    assert diff > 1e-3 * max(float(g.abs().max()) for g in got)


def test_simsiam_predictor_group_has_its_own_lr_and_a_fixed_schedule():
    from sslscale.train.engine import lr_lambdas
    from sslscale.train.optim import build_optimizer

    obj = _simsiam(predictor_lr_scale=2.0)
    groups = obj.param_groups()
    pred = {id(p) for p in obj.predictor.parameters()}
    assert {id(p) for g in groups for p in g.params} == {id(p) for p in obj.parameters()}
    for g in groups:
        in_pred = {id(p) for p in g.params} <= pred
        assert (g.lr_scale, g.scheduled) == ((2.0, False) if in_pred else (1.0, True)), g.name
    cfg = SimpleNamespace(
        schedule=SimpleNamespace(warmup_steps=2, total_steps=10, min_lr_ratio=0.0, decay="cosine"),
        optimizer=SimpleNamespace(name="sgd", lr=0.1, weight_decay=1e-4, momentum=0.9, nesterov=False),
    )
    opt = build_optimizer(cfg.optimizer, groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(cfg, opt))
    seen = []
    for _ in range(10):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert all(s["predictor_decay"] == pytest.approx(0.2) for s in seen)  # 0.1 x 2, warmup and cosine ignored
    assert [s["decay"] for s in seen[:3]] == pytest.approx([0.05, 0.1, 0.1])  # warmup, then the cosine
    assert seen[-1]["decay"] < 0.01
    fixed = _simsiam(predictor_fixed_lr=False).param_groups()
    assert all(g.scheduled for g in fixed)
    with pytest.raises(ValueError, match="predictor_lr_scale must be > 0, got 0"):
        _simsiam(predictor_lr_scale=0)


# ---- MoCo v3 ----


def _moco_v3(**kw):
    obj = build_objective(
        "moco_v3",
        _tiny_encoder(),
        **{"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 24, "temperature": 0.3, **kw},
    )
    obj.setup(CTX)
    with torch.no_grad():  # a target that differs from the online network
        for p in list(obj.target_encoder.parameters()) + list(obj.target_projector.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return obj


@pytest.mark.parametrize("batch_norm", [True, False])
def test_moco_v3_loss_and_gradients_equal_a_plain_reimplementation(batch_norm):
    torch.manual_seed(2)
    obj = _moco_v3(batch_norm=batch_norm)
    batch = _views(5, seed=2)
    trained = [p for p in obj.parameters() if p.requires_grad]
    loss, metrics = obj(batch)
    got = _grads(loss, trained)

    both = torch.cat([batch["view1"], batch["view2"]])
    q = obj.predictor(obj.projector(obj.encoder(both)))
    with torch.no_grad():
        k = obj.target_projector(obj.target_encoder(both))

    def ctr(q, k, tau=0.3):  # the paper's pseudocode: CE(q k^T / tau, arange) * 2 tau
        logits = (q / q.norm(dim=1, keepdim=True)) @ (k / k.norm(dim=1, keepdim=True)).T / tau
        terms = [torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(len(q))]
        return torch.stack(terms).mean() * 2 * tau

    expected = ctr(q[:5], k[5:]) + ctr(q[5:], k[:5])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    _assert_grads_close(got, _grads(expected, trained))
    assert all(not p.requires_grad for p in obj.target_encoder.parameters())
    assert set(metrics) == {"loss", "pos_acc", "pos_cos", "z_std", "momentum"}
    assert 0 <= float(metrics["pos_acc"]) <= 1
    kn = F.normalize(k.roll(5, dims=0), dim=1)
    qn = F.normalize(q.detach(), dim=1)
    torch.testing.assert_close(metrics["pos_cos"], (qn * kn).sum(1).mean(), rtol=1e-5, atol=1e-6)
    hits = [int((qn[i] @ kn[(i // 5) * 5 : (i // 5) * 5 + 5].T).argmax()) == i % 5 for i in range(10)]
    assert float(metrics["pos_acc"]) == pytest.approx(sum(hits) / 10)


def test_moco_v3_after_step_applies_the_cosine_momentum():
    obj = _moco_v3(base_momentum=0.9)
    with torch.no_grad():
        for p in obj.projector.parameters():
            p.add_(1.0)
    online = [p.detach().clone() for p in obj.projector.parameters()]
    target = [p.detach().clone() for p in obj.target_projector.parameters()]
    obj.after_step(StepContext(step=4, total_steps=10, zero_stage=0, world_size=1, rank=0, skipped=True))
    assert all(torch.equal(a, b) for a, b in zip(target, obj.target_projector.parameters()))
    obj.after_step(StepContext(step=4, total_steps=10, zero_stage=0, world_size=1, rank=0))
    m = cosine_momentum(3, 10, 0.9)
    for t0, o, t in zip(target, online, obj.target_projector.parameters()):
        torch.testing.assert_close(t.detach(), m * t0 + (1 - m) * o)
    assert float(obj.tau) == pytest.approx(m)
    assert set(obj.untrained_modules()) == {"target_encoder", "target_projector"}
    trained = {id(p) for g in obj.param_groups() for p in g.params}
    assert not trained & {id(p) for p in obj.target_encoder.parameters()}
    assert trained >= {id(p) for p in obj.predictor.parameters()}


def test_moco_v3_errors():
    with pytest.raises(ValueError, match="temperature must be > 0, got -1"):
        build_objective("moco_v3", _tiny_encoder(), temperature=-1)
    with pytest.raises(ValueError, match="base_momentum <= final_momentum"):
        build_objective("moco_v3", _tiny_encoder(), base_momentum=0.999, final_momentum=0.99)
    with pytest.raises(ValueError, match="proj_layers must be >= 2"):
        build_objective("moco_v3", _tiny_encoder(), proj_layers=1)


# ---- triplet ----


def _brute_force_negative(d_ap, d_an, valid, margin):
    """FaceNet semi-hard, one anchor at a time: the closest negative with d_ap < d_an < d_ap + margin, else the
    closest negative."""
    out = []
    for i in range(len(d_ap)):
        negatives = [j for j in range(d_an.shape[1]) if valid[i, j]]
        semi = [j for j in negatives if d_ap[i] < d_an[i, j] < d_ap[i] + margin]
        pool = semi or negatives
        out.append(min(pool, key=lambda j: float(d_an[i, j])))
    return out


def test_semihard_mining_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    n, m, margin = 40, 30, 0.3
    d_ap = torch.rand(n, generator=g) * 2
    d_an = torch.rand(n, m, generator=g) * 3
    d_an[:5] = d_ap[:5, None] + 0.5 + torch.rand(5, m, generator=g)  # no semi-hard one: the hardest is taken
    d_an[5:10] = d_ap[5:10, None] - 0.1 - torch.rand(5, m, generator=g)  # every negative closer than the positive
    valid = torch.rand(n, m, generator=g) > 0.2
    valid[:, 0] = True
    index, found = mine_negatives(d_ap, d_an, valid, margin, "semihard")
    assert index.tolist() == _brute_force_negative(d_ap, d_an, valid, margin)
    assert not found[:10].any() and found[10:].float().mean() > 0.3
    # the choice is a negative, and among the semi-hard ones when there are any
    assert valid[torch.arange(n), index].all()


def test_random_mining_draws_every_valid_negative_and_only_those():
    torch.manual_seed(4)
    valid = torch.tensor([[True, False, True, True], [False, True, False, False]])
    picks = torch.stack([mine_negatives(torch.zeros(2), torch.rand(2, 4), valid, 0.2, "random")[0] for _ in range(200)])
    assert set(picks[:, 0].tolist()) == {0, 2, 3} and set(picks[:, 1].tolist()) == {1}
    with pytest.raises(ValueError, match="mining='hard' is not supported; expected one of"):
        mine_negatives(torch.zeros(2), torch.rand(2, 4), valid, 0.2, "hard")


def _triplet_reference(obj, batch, margin):
    """The loss spelled out: normalised projections, all 2N - 2 other-image candidates, brute-force semi-hard."""
    n = batch["view1"].shape[0]
    z = obj.projector(obj.encoder(torch.cat([batch["view1"], batch["view2"]])))
    e = z / z.norm(dim=1, keepdim=True)
    a, p = e[:n], e[n:]
    d_ap = ((a - p) ** 2).sum(dim=1)
    d_an = ((a[:, None, :] - e[None, :, :]) ** 2).sum(dim=2)
    valid = torch.ones(n, 2 * n, dtype=torch.bool)
    for i in range(n):
        valid[i, i] = valid[i, n + i] = False
    chosen = _brute_force_negative(d_ap.detach(), d_an.detach(), valid, margin)
    terms = [torch.clamp(d_ap[i] - d_an[i, j] + margin, min=0) for i, j in enumerate(chosen)]
    return torch.stack(terms).mean()


def test_triplet_loss_and_gradients_equal_a_plain_reimplementation():
    torch.manual_seed(5)
    obj = build_objective("triplet", _tiny_encoder(), proj_hidden_dim=32, proj_dim=16, margin=0.5)
    batch = _views(12, seed=5)
    params = list(obj.parameters())
    loss, metrics = obj(batch)
    got = _grads(loss, params)
    expected = _triplet_reference(obj, batch, 0.5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    _assert_grads_close(got, _grads(expected, params))
    assert float(loss.detach()) > 0 and set(metrics) == {
        "loss",
        "active",
        "pos_dist",
        "neg_dist",
        "semihard_found",
        "z_std",
    }
    assert 0 < float(metrics["active"]) <= 1 and 0 <= float(metrics["pos_dist"]) <= 4


def test_triplet_errors():
    with pytest.raises(ValueError, match="margin must be > 0, got 0"):
        build_objective("triplet", _tiny_encoder(), margin=0)
    with pytest.raises(ValueError, match="mining='hardest' is not supported"):
        build_objective("triplet", _tiny_encoder(), mining="hardest")


# ---- triplet across ranks: negatives from the global batch ----

N_GLOBAL = 10


def _triplet_setup():
    torch.manual_seed(6)
    encoder = TinyEncoder(hidden=24, out_dim=12)
    obj = build_objective("triplet", encoder, proj_hidden_dim=20, proj_dim=8, margin=0.4, batch_norm=False)
    return obj, _views(N_GLOBAL, seed=6)


def _triplet_rank(rank, world, sizes):
    obj, batch = _triplet_setup()
    start = sum(sizes[:rank])
    mine = {k: v[start : start + sizes[rank]] for k, v in batch.items()}
    loss, metrics = obj(mine)
    loss.backward()
    grads = [p.grad.clone() for p in obj.parameters()]
    for g in grads:
        dist.all_reduce(g)
    return {"loss": loss.detach(), "grads": [g / world for g in grads], "active": metrics["active"]}


@pytest.mark.dist
def test_triplet_on_two_ranks_equals_one_process_on_the_global_batch():
    sizes = [4, 6]  # unequal: the scaling is by the global count
    results = run_distributed(_triplet_rank, 2, sizes)
    obj, batch = _triplet_setup()
    loss, _ = obj(batch)
    loss.backward()
    mean_loss = sum(r["loss"] for r in results) / 2
    torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    for got, p in zip(results[0]["grads"], obj.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    # a rank mining only its own rows would see fewer negatives: the reference differs from the local-only loss
    local_only = (
        sum(float(obj({k: v[a:b] for k, v in batch.items()})[0]) * (b - a) for a, b in ((0, 4), (4, 10))) / N_GLOBAL
    )
    assert not math.isclose(local_only, float(loss), rel_tol=1e-4)
