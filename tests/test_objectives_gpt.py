"""The `gpt` objective: next-token CE against a plain re-implementation (full logits + F.cross_entropy), values
and gradients; the `cpp` attention against SDPA on the same weights; the global token mean over 2 ranks with
unequal valid targets against one process on the whole batch; ZeRO-3 (tied head weight partitioned) against
ZeRO-0 through the real engine on 2 gloo ranks, with the export reloading to the trained model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sslscale.models import build_encoder
from sslscale.objectives import build_objective
from sslscale.objectives.gpt import IGNORE_INDEX, next_token_targets
from tests import train_doubles as td
from tests.dist_utils import run_distributed

VOCAB = 37
GPT_KW = {"vocab_size": VOCAB, "max_seq_len": 16, "dim": 64, "depth": 2, "heads": 2, "loss_chunk_size": 5}


def _gpt(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_objective("gpt", build_encoder("gpt", **{**GPT_KW, **kw}))


def _batch(b: int = 3, t: int = 11, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=gen)
    labels = ids.clone()
    labels[0, 4] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _plain_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full (B, T, V) logits, shifted by hand, cross-entropy over the positions whose next token counts."""
    logits = model.encoder(batch["input_ids"])[:, :-1]
    labels = batch["labels"][:, 1:].clone()
    labels[batch["attention_mask"][:, 1:] == 0] = -100
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1), ignore_index=-100)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_next_token_targets_shift_and_mask():
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert next_token_targets(labels, mask).tolist() == [[6, 7, 8, -100], [10, -100, -100, -100]]
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\)"):
        next_token_targets(labels, mask[:, :3])
    with pytest.raises(ValueError, match=r"labels must be \(batch, T\)"):
        next_token_targets(labels[0])


def test_loss_and_grads_equal_a_plain_reimplementation():
    model, batch = _gpt(), _batch()
    loss, metrics = model(batch)
    loss.backward()
    mine = _grads(model)
    model.zero_grad()
    plain = _plain_loss(model, batch)
    plain.backward()
    ref = _grads(model)
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    assert mine.keys() == ref.keys() and "wte.weight" in {k.removeprefix("encoder.") for k in mine}
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    valid = 3 * 10 - 1 - 3  # 10 targets per row, one ignored label, 3 padded targets
    assert float(metrics["tokens"]) == valid
    torch.testing.assert_close(metrics["perplexity"], plain.detach().exp())
    torch.testing.assert_close(metrics["loss"], plain.detach())


def test_without_labels_the_inputs_are_the_targets():
    model = _gpt()
    ids = _batch()["input_ids"]
    loss, _ = model({"input_ids": ids})
    plain = F.cross_entropy(model.encoder(ids)[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)


def test_cpp_attention_equals_sdpa_on_the_same_weights():
    from sslscale.ops.backends import availability

    avail = availability("attention", "cpp", torch.device("cpu"))
    if not avail.usable:
        pytest.skip(f"cpp attention: {avail.reason}")
    model, batch = _gpt(attn_backend="cpp"), _batch(t=16)
    out = {}
    for backend in ("cpp", "sdpa"):
        model.encoder.set_attn_backend(backend)
        model.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        out[backend] = (loss.detach(), _grads(model))
    torch.testing.assert_close(out["cpp"][0], out["sdpa"][0], rtol=1e-5, atol=1e-6)
    for name, g in out["sdpa"][1].items():
        torch.testing.assert_close(out["cpp"][1][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_input_is_named():
    model = _gpt()
    with pytest.raises(KeyError, match="input_ids"):
        model({"tokens": torch.zeros(2, 3, dtype=torch.int64)})
    with pytest.raises(TypeError, match="int64"):
        model({"input_ids": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="causal LM encoder"):
        build_objective("gpt", build_encoder("convnet_small"))


# ------------------------------------------------------------------------------------ data parallel (gloo)
def _rank_grads(rank: int, world: int) -> tuple[float, dict[str, torch.Tensor]]:
    import torch.distributed as dist

    model, batch = _gpt(), _batch(b=4)
    rows = slice(rank * 2, rank * 2 + 2)  # rank 0 holds the ignored label and the padded row: fewer targets
    loss, _ = model({k: v[rows] for k, v in batch.items()})
    loss.backward()
    grads = _grads(model)
    for g in grads.values():  # what DeepSpeed / DDP do: average the gradients over ranks
        dist.all_reduce(g)
        g /= world
    mean = torch.tensor(float(loss))
    dist.all_reduce(mean)
    return float(mean) / world, grads


@pytest.mark.dist
def test_two_ranks_with_unequal_targets_equal_one_process_on_the_whole_batch():
    results = run_distributed(_rank_grads, 2)
    model, batch = _gpt(), _batch(b=4)
    loss, _ = model(batch)
    loss.backward()
    ref = _grads(model)
    for mean_loss, grads in results:
        assert mean_loss == pytest.approx(float(loss.detach()), rel=1e-5)
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------ the real engine
class TokenStream:
    """Deterministic token blocks (random starts, then counting up) with the stream protocol; rank r takes rows
    [r*b, (r+1)*b) of step t's global batch, so any world size sees the same global batches."""

    def __init__(self, batch_size: int, rank: int, world: int, seed: int, seq_len: int = 12) -> None:
        self.b, self.rank, self.world, self.seed, self.t = batch_size, rank, world, seed, seq_len
        self.served = 0

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = state["served"]

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(self.seed * 1000 + self.served)
            start = torch.randint(0, VOCAB, (self.b * self.world, 1), generator=gen)
            ids = (start + torch.arange(self.t)) % VOCAB  # next = current + 1: learnt within a few steps
            self.served += 1
            yield {"input_ids": ids[self.rank * self.b : (self.rank + 1) * self.b]}


def token_stream(data_cfg, seed: int, rank: int, world_size: int) -> TokenStream:
    return TokenStream(data_cfg.batch_size, rank, world_size, seed)


STEPS = 4


def _engine_cfg(tmp: str, stage: int) -> dict:
    gpt = {k: v for k, v in GPT_KW.items() if k != "vocab_size"}
    cfg = td.config(
        f"{tmp}/zero{stage}",
        **{
            "model.encoder": "gpt",
            "model.encoder_kwargs": {**gpt, "vocab_size": VOCAB},
            "objective": {"name": "gpt", "kwargs": {}},
            "data.builder": "tests.test_objectives_gpt:token_stream",
            "data.batch_size": 2,
            "zero.stage": stage,
            "schedule.total_steps": STEPS,
            "schedule.warmup_steps": 1,
            "checkpoint.every": STEPS,
            "optimizer.lr": 1e-2,
            "probe.every": 0,
        },
    )
    if stage == 3:
        path = f"{tmp}/zero3.json"
        with open(path, "w") as f:  # weights partitioned between steps, the tied (V, d) matrix included
            json.dump({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100}}, f)
        cfg["zero"]["config"] = path
    return cfg


def _engine_runs(rank: int, world: int, tmp: str) -> dict:
    from sslscale.train.config import from_dict
    from sslscale.train.pretrain import pretrain

    for stage in (0, 3):
        pretrain(from_dict(_engine_cfg(tmp, stage)))
    return True


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt_engine")
    run_distributed(_engine_runs, 2, str(tmp))
    return tmp


@pytest.mark.dist
@pytest.mark.slow
def test_zero3_with_a_partitioned_tied_head_trains_like_zero0(engine_runs):
    lines = {stage: td.metrics(engine_runs / f"zero{stage}") for stage in (0, 3)}
    for stage in (0, 3):
        assert [r["step"] for r in lines[stage]] == list(range(1, STEPS + 1))
        assert all(r["tokens_per_s"] > 0 for r in lines[stage])
    loss0 = torch.tensor([r["loss"] for r in lines[0]])
    loss3 = torch.tensor([r["loss"] for r in lines[3]])
    assert loss0[-1] < loss0[0]
    torch.testing.assert_close(loss3, loss0, rtol=1e-5, atol=1e-5)
    ppl = torch.tensor([r["objective/perplexity"] for r in lines[3]])
    assert ppl[0] == pytest.approx(float(loss3[0].exp()), rel=1e-2)  # rank 0's micro-batch, the global mean


@pytest.mark.dist
@pytest.mark.slow
def test_export_of_each_stage_reloads_to_the_same_gpt(engine_runs, tmp_path):
    from sslscale.models import load_encoder
    from sslscale.train.export import export

    ids = _batch()["input_ids"]
    logits = {}
    for stage in (0, 3):
        out = tmp_path / f"gpt{stage}.safetensors"
        meta = export(engine_runs / f"zero{stage}", out)
        assert meta["encoder"]["name"] == "gpt" and meta["step"] == STEPS
        model = load_encoder(str(out))
        assert model.lm_head.weight is model.wte.weight  # still tied after loading
        logits[stage] = model(ids).detach()
    torch.testing.assert_close(logits[3], logits[0], rtol=1e-4, atol=1e-5)
    transformers = pytest.importorskip("transformers")
    from sslscale.train.export import export_hf

    hf_dir = export_hf(tmp_path / "gpt3.safetensors", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, logits[3], rtol=1e-4, atol=2e-5)
    fresh = _gpt().encoder.eval()
    assert not torch.allclose(fresh(ids), logits[0], atol=1e-3)  # the trained weights, not a fresh model


# ------------------------------------------------------------------------------------ vocabulary from the data
def test_vocab_size_comes_from_the_tokenizer_saved_with_the_shards(tmp_path):
    from sslscale.data.text import train_tokenizer
    from sslscale.schema import ConfigError
    from sslscale.train.config import from_dict

    tok = train_tokenizer(
        ["to be or not to be", "that is the question"] * 20, tmp_path / "tokenizer.json", vocab_size=300
    )
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": "tokenizer.json", "shards": []}))
    base = {
        "model": {"encoder": "gpt", "encoder_kwargs": {"dim": 64, "depth": 1, "heads": 2}},
        "objective": {"name": "gpt"},
        "data": {"shards": str(tmp_path), "pipeline": "clm"},
    }
    from sslscale.train.build import resolve_data_kwargs

    def resolved(cfg_dict):  # what the run does when it starts (and saves in RUN_DIR/config.yaml)
        return resolve_data_kwargs(from_dict(cfg_dict)).model.encoder_kwargs["vocab_size"]

    assert resolved(base) == tok.get_vocab_size() > 256
    base["model"]["encoder_kwargs"]["vocab_size"] = tok.get_vocab_size() + 10  # padded rows are allowed
    assert resolved(base) == tok.get_vocab_size() + 10
    base["model"]["encoder_kwargs"]["vocab_size"] = 100
    with pytest.raises(ConfigError, match=rf"vocab_size=100 is smaller than the {tok.get_vocab_size()} tokens"):
        resolved(base)


# ------------------------------------------------------------------------------------ the Shakespeare recipe
RECIPE_STEPS = 24


def _recipe(rank: int, world: int, train: str, test: str, run_dir: str) -> bool:
    import yaml

    from sslscale.train.config import apply_override, from_dict
    from sslscale.train.pretrain import pretrain

    raw = yaml.safe_load((td.REPO / "configs/pretrain/gpt_shakespeare.yaml").read_text())
    raw["callbacks"][0]["kwargs"].update(shards=test, every=12, max_passages=8, stride=None)
    for override in [
        f"data.shards={train}",
        "data.batch_size=4",
        "data.seq_len=64",
        "zero.config=null",
        "model.encoder_kwargs.max_seq_len=64",
        "model.encoder_kwargs.dim=64",
        "model.encoder_kwargs.depth=2",
        "model.encoder_kwargs.heads=2",
        f"schedule.total_steps={RECIPE_STEPS}",
        "schedule.warmup_steps=3",
        f"checkpoint.every={RECIPE_STEPS}",
        "logging.every=1",
        "logging.progress=false",
        "watchdog_s=0",
        f"run_dir={run_dir}",
    ]:
        apply_override(raw, override)
    pretrain(from_dict(raw))
    return True


@pytest.mark.dist
@pytest.mark.slow
def test_shakespeare_recipe_trains_and_reports_held_out_bits_per_char(tmp_path_factory):
    from tests import data_helpers

    train = data_helpers.shards(tmp_path_factory, "shakespeare", "train", per_shard=100, limit=200, vocab_size=300)
    test = data_helpers.shards(
        tmp_path_factory, "shakespeare", "test", per_shard=50, limit=50, tokenizer=str(train / "tokenizer.json")
    )
    run_dir = tmp_path_factory.mktemp("recipe") / "gpt"
    run_distributed(_recipe, 1, str(train), str(test), str(run_dir))
    lines = td.metrics(run_dir)
    assert [r["step"] for r in lines] == list(range(1, RECIPE_STEPS + 1))
    losses = [r["loss"] for r in lines]
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [12, 24]
    assert evals[1]["val_bits_per_char"] < evals[0]["val_bits_per_char"] < 8.5  # well under a uniform 300 tokens
    config = (run_dir / "config.yaml").read_text()
    from sslscale.data.text import load_tokenizer

    assert f"vocab_size: {load_tokenizer(train / 'tokenizer.json').get_vocab_size()}" in config
