"""The training loop on real gloo ranks (spawned in-process): loss-curve parity across layouts, non-finite
losses (skip with nothing changed / stop with a message), accumulation, export from ZeRO-0; and the single-process
pieces: checkpoint discovery and pruning, the stop flag, the watchdog, the kNN probe, MFU."""

import json
import os
import signal
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sslscale.train import checkpoint
from sslscale.train.config import from_dict
from sslscale.train.monitor import knn_accuracy, mfu, transformer_flops_per_token
from sslscale.train.signals import StopRequest, Watchdog
from tests import train_doubles as td
from tests.dist_utils import run_distributed

B = 8


def _train(cfg: dict) -> dict:
    from sslscale.train.pretrain import TrainingStopped, pretrain

    try:
        return pretrain(from_dict(cfg))
    except TrainingStopped as err:
        return {"stopped": str(err)}


def _two_rank_scenarios(rank, world, tmp):
    """Several runs in one process group (process start-up dominates these tests)."""
    parity = _train(td.config(f"{tmp}/parity2", **{"data.batch_size": B, "objective.kwargs": {"noise": 0.0}}))
    skip = _train(
        td.config(
            f"{tmp}/skip",
            **{
                "schedule.total_steps": 4,
                "checkpoint.every": 1,
                "checkpoint.keep_last": 10,
                "data.builder_kwargs": {"poison_at": [2, 1]},
            },
        )
    )
    stop = _train(
        td.config(
            f"{tmp}/stop",
            **{"schedule.total_steps": 4, "nonfinite": "stop", "data.builder_kwargs": {"poison_at": [2, 1]}},
        )
    )
    accum = _train(
        td.config(
            f"{tmp}/accum",
            **{
                "schedule.total_steps": 3,
                "grad_accum": 2,
                "zero.stage": 3,
                "data.builder_kwargs": {"poison_at": [3, 0]},
            },
        )
    )
    skip3 = _train(
        td.config(
            f"{tmp}/skip3", **{"schedule.total_steps": 3, "zero.stage": 3, "data.builder_kwargs": {"poison_at": [1, 0]}}
        )
    )
    bf16 = _train(td.config(f"{tmp}/bf16", **{"schedule.total_steps": 3, "precision": "bf16"}))
    return {"parity": parity, "skip": skip, "stop": stop, "accum": accum, "skip3": skip3, "bf16": bf16}


def _one_rank_scenarios(rank, world, tmp):
    parity = _train(td.config(f"{tmp}/parity1", **{"data.batch_size": 2 * B, "objective.kwargs": {"noise": 0.0}}))
    stage0 = _train(td.config(f"{tmp}/stage0", **{"zero.stage": 0}))
    return {"parity": parity, "stage0": stage0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    two = run_distributed(_two_rank_scenarios, 2, str(tmp))
    one = run_distributed(_one_rank_scenarios, 1, str(tmp))
    return tmp, two, one


@pytest.mark.dist
def test_loss_curve_parity_one_rank_2b_vs_two_ranks_b(runs):
    tmp, two, one = runs
    a, b = td.metrics(tmp / "parity1"), td.metrics(tmp / "parity2")
    assert len(a) == len(b) == 6
    assert [r["samples"] for r in a] == [r["samples"] for r in b]
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]), rtol=2e-6, atol=2e-6
    )
    assert a[-1]["loss"] < a[0]["loss"] - 0.1  # it trains
    assert all(r["objective/z_norm"] > 0 for r in a)  # the objective's own metrics are logged
    assert all(r["samples_per_s"] > 0 and r["step_time_s"] > 0 and r["memory_bytes"] > 0 for r in a)
    from sslscale.train.export import export

    export(tmp / "parity1", tmp / "p1.safetensors")
    export(tmp / "parity2", tmp / "p2.safetensors")
    w1, w2 = load_file(str(tmp / "p1.safetensors")), load_file(str(tmp / "p2.safetensors"))
    for key in w1:
        # 6 AdamW steps of lr 1e-3 move weights by ~6e-3; the two layouts sum gradients in different orders, which
        # Adam's normalisation turns into up to ~5e-6 on near-zero-gradient weights (seen on AVX-512 Intel CPUs).
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-5)


def _tensors(obj, prefix=""):
    """Every tensor and number in a nested checkpoint structure, by path."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    elif isinstance(obj, (torch.Tensor, int, float)):
        out[prefix] = obj
    return out


@pytest.mark.dist
def test_nonfinite_loss_on_one_rank_is_skipped_on_all_with_nothing_changed(runs):
    tmp, two, _ = runs
    assert [r["skip"]["nonfinite_skipped"] for r in two] == [1, 1]
    assert all(r["skip"]["step"] == 4 for r in two)
    lines = td.metrics(tmp / "skip")
    assert [r["nonfinite_skipped"] for r in lines] == [0, 0, 1, 1]
    ckpts = tmp / "skip" / "checkpoints"
    for rank in range(2):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        before, after, later = (
            _tensors(torch.load(ckpts / f"step{s:08d}" / name, weights_only=False)) for s in (2, 3, 4)
        )
        assert before.keys() == after.keys()
        for key in before:  # fp32 master weights, Adam moments and step, lr: all untouched by step 3
            same = (
                torch.equal(before[key], after[key])
                if isinstance(before[key], torch.Tensor)
                else before[key] == after[key]
            )
            assert same, key
        moved = [
            k
            for k in before
            if isinstance(before[k], torch.Tensor)
            and before[k].is_floating_point()
            and not torch.equal(after[k], later[k])
        ]
        assert moved, "step 4 trains again"
    m2 = torch.load(ckpts / "step00000002" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    m3 = torch.load(ckpts / "step00000003" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(m2[k], m3[k]) for k in m2)


@pytest.mark.dist
def test_nonfinite_skip_under_zero3_keeps_training(runs):
    tmp, two, _ = runs
    assert [r["skip3"]["nonfinite_skipped"] for r in two] == [1, 1]
    lines = td.metrics(tmp / "skip3")
    assert [r["nonfinite_skipped"] for r in lines] == [0, 1, 1]
    assert lines[1]["loss"] is None and lines[1]["skipped"] == 1  # no stale loss passed off as fresh
    assert lines[2]["lr"] == lines[1]["lr"]  # the skipped step did not advance the schedule


@pytest.mark.dist
def test_bf16_trains_and_exports_fp32_master_weights(runs, tmp_path):
    tmp, two, _ = runs
    from sslscale.train.export import export

    lines = td.metrics(tmp / "bf16")
    assert len(lines) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    export(tmp / "bf16", tmp_path / "w.safetensors")
    weights = load_file(str(tmp_path / "w.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())


@pytest.mark.dist
def test_nonfinite_loss_stops_every_rank_with_a_clear_message(runs):
    _, two, _ = runs
    for r in two:
        assert r["stop"]["stopped"].startswith("non-finite loss at step 3 (micro-batch 0) on rank(s) [1]")


@pytest.mark.dist
def test_accumulation_with_a_nonfinite_micro_batch_under_zero3(runs):
    tmp, two, _ = runs
    assert [r["accum"]["nonfinite_skipped"] for r in two] == [1, 1]
    lines = td.metrics(tmp / "accum")
    assert len(lines) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    assert lines[-1]["samples"] == 3 * 2 * B * 2  # steps x accumulation x micro-batch x ranks


@pytest.mark.dist
def test_export_from_zero0_gives_plain_encoder_keys_and_metadata(runs, tmp_path):
    tmp, _, one = runs
    from sslscale.train.export import export

    out = tmp_path / "enc.safetensors"
    export(tmp / "stage0", out)
    weights = load_file(str(out))
    module = torch.load(
        tmp / "stage0" / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt", weights_only=False
    )["module"]
    assert set(weights) == {k[len("encoder.") :] for k in module}
    for key, value in weights.items():
        assert torch.equal(value, module["encoder." + key])
    meta = json.loads(safe_open(str(out), "pt").metadata()["sslscale"])
    assert meta["encoder"] == {"name": "tiny_mlp", "hidden": 32, "out_dim": 16} and meta["step"] == 6
    assert json.loads(out.with_suffix(".json").read_text()) == meta
    encoder = td.TinyEncoder(**{k: v for k, v in meta["encoder"].items() if k != "name"})
    encoder.load_state_dict(weights, strict=True)
    assert one[0]["stage0"]["state"] == "finished"


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    root = checkpoint.root(tmp_path)
    for step, done in ((2, True), (4, True), (6, False)):
        (root / checkpoint.tag_for(step)).mkdir(parents=True)
        if done:
            (root / checkpoint.tag_for(step) / checkpoint.MARKER).write_text("{}")
    assert checkpoint.resolve_resume("auto", tmp_path) == root / "step00000004"
    assert checkpoint.resolve_resume(None, tmp_path) is None
    assert checkpoint.resolve_resume("auto", tmp_path / "fresh") is None
    with pytest.raises(checkpoint.CheckpointError, match="no COMPLETE marker"):
        checkpoint.resolve_resume(str(root / "step00000006"), tmp_path)


def test_prune_keeps_the_last_k_and_the_one_being_written(tmp_path):
    root = checkpoint.root(tmp_path)
    for step in (1, 2, 3, 4, 5):
        (root / checkpoint.tag_for(step)).mkdir(parents=True)
        if step != 3:
            (root / checkpoint.tag_for(step) / checkpoint.MARKER).write_text("{}")
    (root / checkpoint.tag_for(7)).mkdir()  # being written by someone: newer than every complete one
    checkpoint.prune(root, keep_last=2, keep=root / "step00000005")
    assert sorted(p.name for p in root.iterdir()) == ["step00000004", "step00000005", "step00000007"]


def test_stop_request_flags_sigterm_and_sigusr1():
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        stop = StopRequest()
        try:
            assert not stop.requested
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
            assert stop.requested and stop.signum == sig
        finally:
            stop.restore()


def test_watchdog_reports_a_stalled_rank_with_stacks(tmp_path):
    path = tmp_path / "stderr.txt"
    with open(path, "w") as stream:
        dog = Watchdog(0.2, rank=1, stream=stream)
        dog.beat(7)
        time.sleep(0.6)  # stalled
        dog.beat(8)
        time.sleep(0.1)
        dog.close()
    text = path.read_text()
    assert "rank 1 stalled" in text and "after step 7" in text
    assert "test_watchdog_reports_a_stalled_rank_with_stacks" in text  # the stalled thread's stack
    assert text.count("stalled:") == 1  # reported once per stall, not every period


def test_knn_probe_separates_classes_and_mfu_formula():
    torch.manual_seed(0)
    centers = torch.randn(4, 16) * 3
    y = torch.arange(200) % 4
    x = centers[y] + torch.randn(200, 16)
    assert knn_accuracy(x[:150], y[:150], x[150:], y[150:], k=5) > 0.9
    assert knn_accuracy(torch.randn(150, 16), y[:150], torch.randn(50, 16), y[150:], k=5) < 0.6
    per_token = transformer_flops_per_token(n_params=124_000_000, n_layer=12, n_head=12, head_dim=64, seq_len=1024)
    assert per_token == pytest.approx(6 * 124e6 + 12 * 12 * 12 * 64 * 1024)
    assert mfu(per_token, tokens_per_s=1e5, peak_flops=per_token * 2e5) == pytest.approx(0.5)


def test_activation_checkpointing_flag_reaches_the_encoder_or_fails_clearly():
    from sslscale.train.engine import set_activation_checkpointing

    class Supports(torch.nn.Module):
        activation_checkpointing = False

    enc = Supports()
    set_activation_checkpointing(enc, True)
    assert enc.activation_checkpointing is True
    set_activation_checkpointing(td.TinyEncoder(), False)  # off: nothing asked of the encoder
    with pytest.raises(ValueError, match="encoder TinyEncoder does not support activation checkpointing"):
        set_activation_checkpointing(td.TinyEncoder(), True)


def test_pretrain_cli_reports_config_errors_without_starting(tmp_path, capsys):
    from sslscale.cli import main

    path = td.write_config(tmp_path / "c.yaml", td.config(tmp_path / "run", **{"optimizer.lrr": 1.0}))
    assert main(["pretrain", str(path)]) == 2
    assert "unknown key 'optimizer.lrr'; did you mean 'lr'?" in capsys.readouterr().err
    path = td.write_config(tmp_path / "c.yaml", td.config(tmp_path / "run"))
    assert main(["pretrain", str(path), "--set", "zero.stage=7"]) == 2
    assert "zero.stage: 7 is out of range; expected one of 0, 1, 2, 3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_throughput_window_reports_tokens_only_for_text_batches():
    from sslscale.train.monitor import Throughput, batch_tokens

    assert batch_tokens({"view1": torch.zeros(4, 1, 28, 28)}) is None
    text = {"input_ids": torch.zeros(4, 16, dtype=torch.long), "attention_mask": torch.ones(4, 16)}
    text["attention_mask"][:, 12:] = 0
    assert batch_tokens(text) == 48
    window = Throughput()
    window.add(8, 48)
    window.add(8, 48)
    window.tick(0.5)
    window.tick(1.5)
    assert window.rates() == {"samples_per_s": 8.0, "step_time_s": 1.0, "tokens_per_s": 48.0}
    window.add(4, None)
    window.tick(2.0)
    assert window.rates() == {"samples_per_s": 2.0, "step_time_s": 2.0}


def test_cli_drops_the_deepspeed_launchers_local_rank_flag(tmp_path, capsys):
    from sslscale.cli import main

    path = td.write_config(tmp_path / "c.yaml", td.config(tmp_path / "run", **{"zero.stage": 9}))
    assert main(["--local_rank=1", "pretrain", str(path)]) == 2  # reached the config check: the flag was dropped
    assert "zero.stage: 9 is out of range" in capsys.readouterr().err


def test_export_without_a_complete_checkpoint_is_a_clear_error(tmp_path, capsys):
    from sslscale.cli import main
    from sslscale.train import config

    (tmp_path / "run" / "checkpoints" / "step00000004").mkdir(parents=True)  # interrupted save only
    config.dump(config.load(None), tmp_path / "run" / "config.yaml")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "has no complete checkpoint to export" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "has no config.yaml" in capsys.readouterr().err


@pytest.mark.dist
def test_sslscale_config_prints_what_the_run_saved(runs, tmp_path, capsys):
    from sslscale.cli import main

    tmp, _, _ = runs
    path = td.write_config(tmp_path / "c.yaml", td.config(f"{tmp}/stage0", **{"zero.stage": 0}))
    capsys.readouterr()
    assert main(["config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp / "stage0" / "config.yaml").read_text()
    assert main(["config", str(path), "--get", "zero.stage"]) == 0 and capsys.readouterr().out == "0\n"
    assert main(["config", str(path), "--set", "optimizer.lrr=1"]) == 2
    assert "unknown key 'optimizer.lrr'; did you mean 'lr'?" in capsys.readouterr().err


def test_bf16_batchnorm_statistics_follow_the_parameters_dtype():
    """DeepSpeed's bf16 casts parameters, not buffers: a BatchNorm model then fails on CPU until its running
    statistics are cast too (queues and other buffers keep their dtype)."""
    from torch import nn

    from sslscale.train.engine import match_norm_statistics

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    model.register_buffer("queue", torch.zeros(3, 2))
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)  # what DeepSpeed does under bf16
    x = torch.rand(2, 1, 8, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        model(x)
    match_norm_statistics(model, torch.bfloat16)
    assert model[1].running_mean.dtype == model[1].running_var.dtype == torch.bfloat16
    assert model.queue.dtype == torch.float32 and model[1].num_batches_tracked.dtype == torch.int64
    assert model(x).dtype == torch.bfloat16
