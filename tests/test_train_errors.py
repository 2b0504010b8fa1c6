"""Bad input gives one clear line and exit status 2, not a traceback (issue 12, item 11). Checked case by case:
config-level mistakes (already caught when the YAML loads: pipeline name, augment key typo, a negative probe
size), YAML syntax errors, `--resume` of a missing directory (both before any process group starts), a missing
`data.shards` directory (found after the group started: status.json records it), `sslscale evaluate` on seven
kinds of bad encoder files, an export to an unwritable place, and the run summary of a resumed finished run
(strict JSON: no NaN)."""

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from sslscale.train import config as config_mod
from sslscale.train.pretrain import add_arguments as pretrain_arguments
from sslscale.train.pretrain import run as pretrain_run
from tests import train_doubles as td

RECIPE = "configs/pretrain/simclr_fmnist.yaml"


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.pipeline=bogus", "data: pipeline must be one of ["),
        ("data.augment.crop_scael=0.2", "unknown key 'data.augment.crop_scael'; did you mean 'crop_scale'?"),
        ("probe.train_samples=-5", "probe.train_samples: -5 is out of range; expected >= 1"),
        ("nonfinite_max_consecutive=-1", "nonfinite_max_consecutive: -1 is out of range; expected >= 0"),
    ],
)
def test_config_mistakes_are_caught_when_the_yaml_loads(override, message):
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.load(RECIPE, [override])
    assert message in str(err.value)


def _pretrain_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pretrain_arguments(parser)
    return parser.parse_args(list(argv))


def test_yaml_syntax_errors_name_the_file_and_the_place(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  encoder: [unclosed\nseed: 1\n")
    assert pretrain_run(_pretrain_args(str(bad))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sslscale pretrain: {bad}: not valid YAML at line 3, column 5") and "Traceback" not in err
    assert config_mod.run(argparse.Namespace(config=str(bad), overrides=[], get=None)) == 2
    assert "not valid YAML at line 3" in capsys.readouterr().err


def test_resume_of_a_missing_checkpoint_fails_before_any_process_group(tmp_path, capsys):
    cfg = td.write_config(tmp_path / "c.yaml", td.config(tmp_path / "run"))
    assert pretrain_run(_pretrain_args(str(cfg), "--resume", str(tmp_path / "missing"))) == 2
    assert capsys.readouterr().err == (
        f"sslscale pretrain: --resume {tmp_path / 'missing'}: no such checkpoint "
        "directory (expected 'auto' or a RUN_DIR/checkpoints/stepNNNNNNNN directory)\n"
    )
    (tmp_path / "half").mkdir()
    assert pretrain_run(_pretrain_args(str(cfg), "--resume", str(tmp_path / "half"))) == 2
    assert "not a complete checkpoint (no COMPLETE marker" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


@pytest.mark.dist
def test_missing_data_shards_after_the_group_starts_is_one_line_and_recorded(tmp_path):
    run_dir = tmp_path / "run"
    cfg = td.write_config(
        tmp_path / "c.yaml",
        td.config(
            run_dir, **{"data.builder": "sslscale.train.build:build_stream", "data.shards": str(tmp_path / "no-shards")}
        ),
    )
    [(rc, out)] = td.wait_all(td.launch(cfg, 1))
    assert rc == 2, out[-3000:]
    assert f"sslscale pretrain: shards '{tmp_path / 'no-shards'}': no such file or directory" in out
    assert "Traceback" not in out
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 2 and "no-shards" in status["error"]


def _bad_encoder_files(tmp_path, good):
    """Seven files `sslscale evaluate` cannot use, each broken in its own way."""
    files = {"missing": tmp_path / "missing.safetensors"}
    files["empty"] = tmp_path / "empty.safetensors"
    files["empty"].write_bytes(b"")
    files["garbage"] = tmp_path / "garbage.safetensors"
    files["garbage"].write_bytes(b"\x00\x01not a safetensors file" * 10)
    raw = good.read_bytes()
    files["truncated"] = tmp_path / "truncated.safetensors"
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["no_metadata"] = tmp_path / "nometa.safetensors"
    save_file({"w": torch.zeros(2)}, str(files["no_metadata"]))
    files["bad_sidecar"] = tmp_path / "sidecar.safetensors"
    save_file({"w": torch.zeros(2)}, str(files["bad_sidecar"]))
    (tmp_path / "sidecar.json").write_text("{not json")
    files["wrong_weights"] = tmp_path / "wrong.safetensors"
    meta = json.dumps({"encoder": {"name": "convnet_small"}})
    save_file({"w": torch.zeros(2)}, str(files["wrong_weights"]), metadata={"sslscale": meta})
    return files


def test_evaluate_reports_each_bad_encoder_file_in_one_line(tmp_path, capsys):
    from sslscale.adapt import evaluate
    from sslscale.models import build_encoder, save_encoder

    good = tmp_path / "good.safetensors"
    save_encoder(build_encoder("convnet_small"), str(good))
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    for kind, path in _bad_encoder_files(tmp_path, good).items():
        assert evaluate.run(parser.parse_args([str(path)])) == 2, kind
        err = capsys.readouterr().err
        assert err.startswith(f"sslscale evaluate: error: cannot load the encoder {path}: "), (kind, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (kind, err)


def test_export_to_an_unwritable_place_is_one_line(tmp_path, capsys, monkeypatch):
    from sslscale.train import export as export_mod

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step00000001").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("zero: {stage: 0}\n")
    (run_dir / "checkpoints" / "step00000001" / "COMPLETE").write_text('{"step": 1}')
    monkeypatch.setattr(export_mod, "consolidated_state_dict", lambda ckpt, stage: {"encoder.w": torch.ones(2)})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = argparse.Namespace(run_dir=str(run_dir), out=str(blocker / "w.safetensors"), checkpoint="auto")
    assert export_mod.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sslscale export: cannot write {blocker / 'w.safetensors'}: ") and err.count("\n") == 1
