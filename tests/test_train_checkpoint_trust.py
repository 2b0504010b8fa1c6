"""Checkpoints that are damaged or tampered with (issue 12, items 6 and 8): the marker lists sizes and CRC32s,
`--resume auto` and export fall back to the newest checkpoint that verifies and say which was skipped and why,
and a pickle payload in a checkpoint file never runs (not on export, not on resume), with the file named. Before
the fix a damaged newest checkpoint was a raw traceback, and the payload created its file on both paths."""

import argparse
import contextlib
import io
import json
import shutil

import pytest
import torch

from sslscale.train import checkpoint, integrity, safe_load
from sslscale.train.export import export
from sslscale.train.export import run as export_run
from tests import train_doubles as td
from tests.dist_utils import run_distributed


class Payload:
    """Unpickling this calls open(path, "w"): a file appears if any code from the pickle runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(ckpt, name: str, marker_file, reseal: bool = True) -> None:
    """Replace one file of `ckpt` with a payload; re-sealing the marker makes the checksums agree (a deliberate
    edit, not damage)."""
    torch.save({"module": Payload(str(marker_file))}, ckpt / name)
    if reseal:
        data = checkpoint.MARKER
        body = json.loads((ckpt / data).read_text())
        integrity.seal(ckpt, data, {k: v for k, v in body.items() if k != "files"})


def _flip_byte(path, at: float = 0.5) -> None:
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * at)] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_seal_records_sizes_and_checksums_and_problem_names_what_changed(tmp_path):
    ckpt = tmp_path / "step00000001"
    ckpt.mkdir()
    (ckpt / "a.bin").write_bytes(b"x" * 1000)
    (ckpt / "b.bin").write_bytes(b"y" * 10)
    body = integrity.seal(ckpt, "COMPLETE", {"step": 1})
    assert body["files"]["a.bin"] == {"size": 1000, "crc32": f"{__import__('zlib').crc32(b'x' * 1000):08x}"}
    assert integrity.problem(ckpt, "COMPLETE") is None
    _flip_byte(ckpt / "a.bin")
    assert "a.bin has CRC32" in integrity.problem(ckpt, "COMPLETE")
    (ckpt / "a.bin").write_bytes(b"x" * 999)
    assert integrity.problem(ckpt, "COMPLETE") == "a.bin has 999 bytes, COMPLETE recorded 1000"
    (ckpt / "b.bin").unlink()
    (ckpt / "a.bin").write_bytes(b"x" * 1000)
    assert integrity.problem(ckpt, "COMPLETE") == "b.bin is missing"
    (ckpt / "COMPLETE").write_text("{not json")
    assert "marker is unreadable" in integrity.problem(ckpt, "COMPLETE")


def test_the_weights_only_context_refuses_a_payload_even_where_the_caller_asks_for_pickle(tmp_path):
    made = tmp_path / "made-by-payload"
    torch.save({"x": Payload(str(made))}, tmp_path / "evil.pt")
    assert "io.open" in safe_load.unsafe_globals(tmp_path / "evil.pt")
    with pytest.raises(safe_load.UnsafeCheckpointError, match=r"evil\.pt: refused to load"):
        safe_load.load(tmp_path / "evil.pt")
    with safe_load.weights_only(), pytest.raises(Exception, match=r"(?i)weights only"):
        torch.load(tmp_path / "evil.pt", weights_only=False)  # what DeepSpeed's loaders call
    assert not made.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the control: outside the context the payload runs
    assert made.exists()


def _quiet_pretrain(cfg: dict, resume=None) -> dict:
    from sslscale.train.config import from_dict
    from sslscale.train.pretrain import pretrain

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            out = pretrain(from_dict(cfg), resume=resume)
    except checkpoint.CheckpointError as e:
        out = {"error": str(e)}
    out["stderr"] = err.getvalue()
    return out


def _scenarios(rank, world, tmp):
    from pathlib import Path

    tmp = Path(tmp)
    cfg = {"schedule.total_steps": 4, "checkpoint.every": 2, "checkpoint.keep_last": 5}
    out = {
        "base": _quiet_pretrain(td.config(tmp / "base", **cfg)),
        "stage0": _quiet_pretrain(td.config(tmp / "stage0", **cfg, **{"zero.stage": 0})),
    }
    step4 = Path("checkpoints") / checkpoint.tag_for(4)
    step2 = Path("checkpoints") / checkpoint.tag_for(2)
    model = "mp_rank_00_model_states.pt"

    shutil.copytree(tmp / "base", tmp / "damaged")  # one flipped byte in the newest checkpoint
    _flip_byte(tmp / "damaged" / step4 / model)
    out["damaged"] = _quiet_pretrain(td.config(tmp / "damaged", **cfg), resume="auto")

    shutil.copytree(tmp / "base", tmp / "payload1")  # a payload in the newest checkpoint, marker re-sealed
    _plant(tmp / "payload1" / step4, model, tmp / "made-on-resume1")
    out["payload1"] = _quiet_pretrain(td.config(tmp / "payload1", **cfg), resume="auto")

    shutil.copytree(tmp / "base", tmp / "payload2")  # payloads in every checkpoint
    for step in (step2, step4):
        _plant(tmp / "payload2" / step, model, tmp / "made-on-resume2")
    out["payload2"] = _quiet_pretrain(td.config(tmp / "payload2", **cfg), resume="auto")

    shutil.copytree(tmp / "base", tmp / "again")  # resuming a finished run: nothing to do, a strict summary
    out["again"] = _quiet_pretrain(td.config(tmp / "again", **cfg), resume="auto")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    return tmp, run_distributed(_scenarios, 1, str(tmp))[0]


@pytest.mark.dist
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(runs):
    tmp, out = runs
    r = out["damaged"]
    assert "error" not in r, r
    assert (
        f"skipping checkpoint {tmp / 'damaged' / 'checkpoints' / 'step00000004'}: mp_rank_00_model_states.pt has CRC32"
    ) in r["stderr"]
    assert "resumed from" in r["stderr"] and "step00000002 at step 2" in r["stderr"]
    assert r["step"] == 4 and r["state"] == "finished"
    # the recomputed steps replace their old lines, and the same numbers come out (the fallback resumed exactly)
    assert [m["step"] for m in td.metrics(tmp / "damaged")] == [1, 2, 3, 4]
    assert [m["loss"] for m in td.metrics(tmp / "damaged")] == [m["loss"] for m in td.metrics(tmp / "base")]
    assert integrity.problem(tmp / "damaged" / "checkpoints" / "step00000004", checkpoint.MARKER) is None


@pytest.mark.dist
def test_resume_never_runs_a_payload_and_names_the_file(runs):
    tmp, out = runs
    r = out["payload1"]
    assert "error" not in r, r
    assert (
        "step00000004: mp_rank_00_model_states.pt would import io.open when loaded" in r["stderr"]
        and "step00000002 at step 2" in r["stderr"]
    )
    r = out["payload2"]
    assert r["error"].startswith(f"no checkpoint in {tmp / 'payload2' / 'checkpoints'} can be trusted: ")
    assert r["error"].count("mp_rank_00_model_states.pt would import io.open") == 2
    assert not (tmp / "made-on-resume1").exists() and not (tmp / "made-on-resume2").exists()


@pytest.mark.dist
def test_export_never_runs_a_payload_and_names_the_file(runs, tmp_path, capsys):
    tmp, _ = runs
    made = tmp_path / "made-on-export"
    for stage_run in ("base", "stage0"):  # zero_to_fp32 (stage 2) and the plain module file (stage 0)
        run_dir = tmp_path / stage_run
        shutil.copytree(tmp / stage_run, run_dir)
        export(run_dir, tmp_path / f"{stage_run}.safetensors")  # intact: exports
        ckpt = run_dir / "checkpoints" / "step00000004"
        name = "mp_rank_00_model_states.pt"
        _plant(ckpt, name, made)
        args = argparse.Namespace(run_dir=str(run_dir), out=str(tmp_path / "x.safetensors"), checkpoint=str(ckpt))
        assert export_run(args) == 2
        assert f"{name} would import io.open" in capsys.readouterr().err
        # and even with a marker that does not list the file, the weights-only load refuses it
        (ckpt / checkpoint.MARKER).write_text('{"step": 4}')
        with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt.*refused|refused.*mp_rank_00_model_states"):
            from sslscale.train.export import consolidated_state_dict

            consolidated_state_dict(ckpt, 0 if stage_run == "stage0" else 2)
    assert not made.exists()


@pytest.mark.dist
def test_export_refuses_nonfinite_weights_naming_them(runs, tmp_path):
    tmp, _ = runs
    run_dir = tmp_path / "nan"
    shutil.copytree(tmp / "stage0", run_dir)
    ckpt = run_dir / "checkpoints" / "step00000004"
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)
    states["module"]["encoder.net.3.bias"][0] = float("nan")
    torch.save(states, ckpt / "mp_rank_00_model_states.pt")
    integrity.seal(ckpt, checkpoint.MARKER, {"step": 4, "world_size": 1})
    with pytest.raises(ValueError, match=r"1 of 4 tensors hold NaN/inf \(net\.3\.bias\); not exported"):
        export(run_dir, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.dist
def test_resuming_a_finished_run_gives_a_strict_json_summary(runs):
    _, out = runs
    r = out["again"]
    assert r["step"] == 4 and r["state"] == "finished" and r["loss"] is None  # no step ran: no loss, not NaN
    json.dumps({k: v for k, v in r.items() if k != "stderr"}, allow_nan=False)
