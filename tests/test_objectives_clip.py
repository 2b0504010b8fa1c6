"""The `clip` objective: loss and gradients (towers, projections, logit scale) against a plain CLIP loss written
here; the logit-scale clamp; the batch metrics; 1 rank x 2b and 2 ranks x b through the engine (ZeRO-2 and 3,
plain SGD so that a mis-scaled gradient shows) reach the same losses and weights; the whole CLIP is exported and
its image tower is what `sslscale evaluate` probes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslscale.models import CLIP, image_encoder
from sslscale.objectives import build_objective

VOCAB, SEQ, IMAGE = 40, 10, (1, 28, 28)
CLIP_KWARGS = {
    "embed_dim": 16,
    "image_encoder": {
        "name": "vit",
        "size": "cpu_tiny",
        "image_size": 28,
        "patch_size": 7,
        "in_channels": 1,
        "dim": 32,
        "depth": 1,
        "heads": 2,
    },
    "text_encoder": {
        "name": "text_transformer",
        "vocab_size": VOCAB,
        "max_seq_len": SEQ,
        "dim": 32,
        "depth": 1,
        "heads": 1,
    },  # head_dim 32: the fused causal kernels' smallest
}


def tiny_clip(seed: int = 0, **kw) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(**{**CLIP_KWARGS, **kw})


def caption_batch(indices: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic image-text pairs per sample index: a class blob image and a right-padded caption whose
    tokens name the class (ids >= 6), lengths 3..SEQ."""
    n = len(indices)
    images = torch.zeros(n, *IMAGE)
    ids = torch.zeros(n, SEQ, dtype=torch.int64)
    for i, idx in enumerate(indices.tolist()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + idx)
        c = idx % 4
        images[i, :, 7 * c : 7 * c + 7] = 1.0
        images[i] += 0.3 * torch.randn(IMAGE, generator=g)
        length = 3 + idx % (SEQ - 2)
        row = torch.randint(6, VOCAB, (length,), generator=g)
        row[0], row[-1] = 1, 4  # [CLS] ... [EOS]
        row[1] = 6 + c
        ids[i, :length] = row
    return {"image": images, "input_ids": ids, "attention_mask": (ids != 0).long(), "label": indices % 4}


def plain_clip_loss(model: CLIP, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """CLIP's loss as the paper's pseudo-code writes it: scaled cosine logits, symmetric cross-entropy."""
    img = F.normalize(model.encode_image(batch["image"]), dim=1)
    txt = F.normalize(model.encode_text(batch["input_ids"], batch["attention_mask"]), dim=1)
    scale = model.logit_scale.log_scale.clamp(max=math.log(model.config["max_logit_scale"])).exp()
    logits = scale * img @ txt.T
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), math.log(3.0)])
def test_loss_and_every_gradient_equal_a_plain_clip_loss(log_scale):
    objective = build_objective("clip", tiny_clip())
    with torch.no_grad():
        objective.encoder.logit_scale.log_scale.fill_(log_scale)
    batch = caption_batch(torch.arange(12))
    loss, metrics = objective(batch)
    loss.backward()
    got = _grads(objective.encoder)
    objective.zero_grad()
    expected = plain_clip_loss(objective.encoder, batch)
    expected.backward()
    want = _grads(objective.encoder)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert set(got) == set(want) and "logit_scale.log_scale" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert float(want["logit_scale.log_scale"].abs()) > 1e-4  # the temperature gradient is really tested
    assert float(metrics["logit_scale"]) == pytest.approx(math.exp(log_scale), rel=1e-6)


def test_logit_scale_is_clamped_at_max_with_zero_gradient_above_it():
    objective = build_objective("clip", tiny_clip(max_logit_scale=20.0))
    batch = caption_batch(torch.arange(8))
    with torch.no_grad():
        objective.encoder.logit_scale.log_scale.fill_(math.log(50.0))  # above the clamp
    loss, metrics = objective(batch)
    loss.backward()
    assert float(metrics["logit_scale"]) == pytest.approx(20.0, rel=1e-6)
    assert float(objective.encoder.logit_scale.log_scale.grad) == 0.0
    # the loss is the one at scale 20 exactly: the same as with log_scale set at the clamp
    with torch.no_grad():
        objective.encoder.logit_scale.log_scale.fill_(math.log(20.0))
        at_clamp, _ = objective(batch)
    torch.testing.assert_close(loss.detach(), at_clamp, rtol=1e-6, atol=0)
    # below the clamp the gradient is back
    objective.zero_grad()
    with torch.no_grad():
        objective.encoder.logit_scale.log_scale.fill_(math.log(19.0))
    objective(batch)[0].backward()
    assert float(objective.encoder.logit_scale.log_scale.grad.abs()) > 1e-4


def test_init_scale_is_one_over_0_07_and_bad_inits_are_errors():
    model = CLIP(**CLIP_KWARGS)
    assert float(model.logit_scale().detach()) == pytest.approx(1 / 0.07, rel=1e-6)
    with pytest.raises(ValueError, match=r"init_logit_scale=200\.0 is above max_logit_scale=100\.0"):
        CLIP(**CLIP_KWARGS, init_logit_scale=200.0)


def test_metrics_are_the_within_batch_top1_both_ways():
    objective = build_objective("clip", tiny_clip(seed=1))
    batch = caption_batch(torch.arange(16))
    _, metrics = objective(batch)
    with torch.no_grad():
        img = F.normalize(objective.encoder.encode_image(batch["image"]), dim=1)
        txt = F.normalize(objective.encoder.encode_text(batch["input_ids"], batch["attention_mask"]), dim=1)
    sim = img @ txt.T
    i2t = sum(int(sim[i].argmax()) == i for i in range(16)) / 16
    t2i = sum(int(sim[:, j].argmax()) == j for j in range(16)) / 16
    assert float(metrics["i2t_acc"]) == pytest.approx(i2t)
    assert float(metrics["t2i_acc"]) == pytest.approx(t2i)


def test_needs_a_clip_encoder_and_its_batch_keys():
    from sslscale.models import build_encoder

    with pytest.raises(TypeError, match=r"needs a CLIP encoder .* got ConvNetSmall"):
        build_objective("clip", build_encoder("convnet_small", in_channels=1))
    objective = build_objective("clip", tiny_clip())
    batch = caption_batch(torch.arange(4))
    del batch["attention_mask"]
    with pytest.raises(KeyError, match="missing \\['attention_mask'\\]"):
        objective(batch)


def test_probes_read_the_image_tower():
    model = tiny_clip()
    tower = image_encoder(model)
    assert tower is model.visual
    assert tower(torch.rand(3, *IMAGE)).shape == (3, 32)
    plain = model.visual
    assert image_encoder(plain) is plain  # a plain image encoder is its own image encoder


# ------------------------------------------------------------------------ through the engine, 1 vs 2 ranks
B, STEPS = 6, 4


class CaptionStream:
    """The stream protocol over `caption_batch`: the global batch of step t is the same whatever the world size,
    rank r taking rows [r*b, (r+1)*b) of it."""

    def __init__(self, batch_size: int, rank: int, world_size: int, seed: int, size: int = 96) -> None:
        self.b, self.rank, self.world, self.seed, self.size = batch_size, rank, world_size, seed, size
        self.global_batch = batch_size * world_size
        self.epoch, self.batch = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]

    def __iter__(self):
        while self.batch < self.size // self.global_batch:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            start = self.batch * self.global_batch + self.rank * self.b
            self.batch += 1
            yield caption_batch(order[start : start + self.b], self.seed)
        self.epoch, self.batch = self.epoch + 1, 0


def build_caption_stream(data_cfg, seed: int, rank: int, world_size: int) -> CaptionStream:
    return CaptionStream(data_cfg.batch_size, rank, world_size, seed)


def _config(run_dir: str, stage: int, batch: int) -> dict:
    from tests import train_doubles as td

    return td.config(
        run_dir,
        **{
            "model": {"encoder": "clip", "encoder_kwargs": CLIP_KWARGS},
            "objective": {"name": "clip"},
            "data.builder": "tests.test_objectives_clip:build_caption_stream",
            "data.batch_size": batch,
            # plain SGD: a gradient off by a factor (world size, 2 for the symmetric loss) changes the weights
            "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0},
            "schedule.total_steps": STEPS,
            "schedule.warmup_steps": 0,
            "checkpoint.every": STEPS,
            "grad_clip": 0.0,
            "zero.stage": stage,
        },
    )


def _engine_runs(rank, world, tmp):
    from sslscale.train.config import from_dict
    from sslscale.train.pretrain import pretrain

    for stage in (2, 3):
        pretrain(from_dict(_config(f"{tmp}/w{world}_z{stage}", stage, B * (2 // world))))
    return True


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    from tests.dist_utils import run_distributed

    tmp = tmp_path_factory.mktemp("clip_engine")
    run_distributed(_engine_runs, 2, str(tmp))
    run_distributed(_engine_runs, 1, str(tmp))
    return tmp


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_one_rank_2b_and_two_ranks_b_give_the_same_losses_and_weights(engine_runs, stage):
    from sslscale.train import checkpoint
    from sslscale.train.export import consolidated_state_dict
    from tests import train_doubles as td

    one, two = engine_runs / f"w1_z{stage}", engine_runs / f"w2_z{stage}"
    # losses: the mean over ranks of each rank's share = the single-process loss on the global batch
    l1, l2 = [r["loss"] for r in td.metrics(one)], [r["loss"] for r in td.metrics(two)]
    assert len(l1) == STEPS and l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    tag = checkpoint.tag_for(STEPS)
    w1 = consolidated_state_dict(checkpoint.root(one) / tag, stage)
    w2 = consolidated_state_dict(checkpoint.root(two) / tag, stage)
    assert w1.keys() == w2.keys() and "encoder.logit_scale.log_scale" in w1
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    # the logit scale was trained (its update is part of what agrees)
    init = math.log(1 / 0.07)
    assert abs(float(w1["encoder.logit_scale.log_scale"].detach()) - init) > 1e-4


@pytest.mark.dist
@pytest.mark.slow
def test_export_holds_the_whole_clip_and_its_image_tower_is_probed(engine_runs, tmp_path):
    from safetensors.torch import load_file

    from sslscale.models import load_encoder
    from sslscale.train.export import export

    out = tmp_path / "clip.safetensors"
    meta = export(engine_runs / "w2_z2", out)
    keys = load_file(str(out)).keys()
    assert meta["modules"] == ["encoder"] and meta["encoder"]["name"] == "clip"
    for prefix in ("visual.", "text.", "visual_proj.", "text_proj.", "logit_scale."):
        assert any(k.startswith(prefix) for k in keys), prefix
    model = load_encoder(str(out))
    assert isinstance(model, CLIP)
    batch = caption_batch(torch.arange(4))
    img, txt, _ = model(batch["image"], batch["input_ids"], batch["attention_mask"])
    assert img.shape == txt.shape == (4, 16)
    assert image_encoder(model)(batch["image"]).shape == (4, 32)
