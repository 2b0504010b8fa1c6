import pytest
import torch

from sslscale.models import build_encoder
from sslscale.objectives import Objective, StepContext, build_objective
from sslscale.ops.reference import nt_xent


def _tiny_encoder():
    return build_encoder("convnet_small", widths=[8, 16], strides=[2, 2])


def _views(n=6):
    return {"view1": torch.rand(n, 1, 28, 28), "view2": torch.rand(n, 1, 28, 28), "label": torch.zeros(n).long()}


def test_simclr_loss_equals_reference_nt_xent_on_projections():
    obj = build_objective("simclr", _tiny_encoder(), proj_hidden_dim=32, proj_dim=16, temperature=0.3,
                          backend="reference")
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
