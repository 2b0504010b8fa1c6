"""`sslscale bench methods`: the table assembled from per-recipe result JSONs (fake ones: no training here), the
training-rate reading of metrics.jsonl, reuse of finished results, and the errors for mismatched settings."""

from __future__ import annotations

import json

import pytest

from sslscale.bench import methods


def _row(few, sd, full, knn):
    return {"few_mean": few, "few_std": sd, "few_per_seed": [few] * 3, "all_labels": full, "knn": knn}


def _result(recipe, method, encoder, row, wall, rate, k=10):
    return {
        "recipe": recipe,
        "method": method,
        "encoder": encoder,
        "encoder_config": {"name": encoder},
        "labels_per_class": k,
        "seeds": 3,
        "knn_k": 20,
        "eval": row,
        "pretrain": {"wall_seconds": wall, "samples_per_s": rate, "steps": 600, "samples": 153600},
    }


BASELINES = {
    "labels_per_class": 10,
    "seeds": 3,
    "knn_k": 20,
    "random_init": {"vit": _row(0.55, 0.02, 0.70, 0.60), "convnet_small": _row(0.661, 0.011, 0.838, 0.7)},
    "raw_pixels": _row(0.706, 0.023, 0.841, 0.855),
}
RESULTS = [
    _result("simclr_fmnist", "simclr", "convnet_small", _row(0.727, 0.008, 0.875, 0.80), 232.4, 1012.3),
    _result("mae_vit_fmnist", "autoencoder", "vit", _row(0.6, 0.0123, 0.75, None), 301.0, None),
]


def test_table_has_one_row_per_recipe_then_the_baselines():
    table, payload = methods.assemble(RESULTS, BASELINES)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| method | recipe | encoder | linear probe, 10 labels/class (mean ± std, 3 seeds)")
    assert "kNN (k=20)" in lines[0] and lines[1].count("|") == lines[0].count("|")
    assert lines[2] == "| simclr | `simclr_fmnist` | convnet_small | 72.7 ± 0.8 | 87.5 | 80.0 | 232 | 1,012 |"
    assert lines[3] == "| autoencoder | `mae_vit_fmnist` | vit | 60.0 ± 1.2 | 75.0 | – | 301 | – |"
    # random-init rows sorted by encoder name, raw pixels last
    assert lines[4] == "| random init | – | convnet_small | 66.1 ± 1.1 | 83.8 | 70.0 | – | – |"
    assert lines[5].startswith("| random init | – | vit | 55.0 ± 2.0 |")
    assert lines[6] == "| raw pixels | – | – | 70.6 ± 2.3 | 84.1 | 85.5 | – | – |"
    assert len(lines) == 7
    assert [r["kind"] for r in payload["rows"]] == [
        "pretrained",
        "pretrained",
        "random_init",
        "random_init",
        "raw_pixels",
    ]
    assert payload["rows"][0]["eval"]["few_mean"] == 0.727 and payload["labels_per_class"] == 10


def test_results_on_other_label_subsets_are_refused():
    odd = _result("byol_fmnist", "byol", "convnet_small", _row(0.7, 0.01, 0.86, 0.8), 200, 900, k=5)
    with pytest.raises(
        ValueError,
        match=r"byol_fmnist was evaluated with .* = \(5, 3, 20\), the baselines with "
        r"\(10, 3, 20\)",
    ):
        methods.assemble([odd], BASELINES)


def test_training_rate_sums_the_logged_step_times(tmp_path):
    lines = [
        {"step": 10, "loss": 3.0, "samples": 2560, "step_time_s": 0.2},
        {"step": 20, "loss": 2.5, "samples": 5120, "step_time_s": 0.3, "probe_acc": 0.7},
        {"step": 25, "loss": 2.0, "samples": 6400, "step_time_s": 0.4},
    ]
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rate = methods.training_rate(f)
    seconds = 10 * 0.2 + 10 * 0.3 + 5 * 0.4
    assert rate["train_seconds"] == pytest.approx(seconds)
    assert rate["samples_per_s"] == pytest.approx(round(6400 / seconds, 1))
    assert (rate["steps"], rate["samples"], rate["final_loss"], rate["probe_acc"]) == (25, 6400, 2.0, 0.7)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no logged training steps"):
        methods.training_rate(tmp_path / "empty.jsonl")


def test_method_label_names_the_variant():
    assert methods.method_label({"name": "autoencoder", "variant": "masked"}, "x") == "autoencoder (masked)"
    assert methods.method_label({"name": "simclr", "temperature": 0.2}, "x") == "simclr"
    assert methods.method_label({}, "rotation_fmnist") == "rotation_fmnist"


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match=r"no recipe 'simclr_fminst'.*'simclr_fmnist'"):
        methods.recipe_path("simclr_fminst")


def test_run_reuses_finished_results_and_writes_table_and_json(tmp_path, capsys):
    """Results and baselines left by an earlier call are reused: no pretraining, no evaluation."""
    import argparse

    runs = tmp_path / "runs"
    for r in RESULTS:
        (runs / r["recipe"]).mkdir(parents=True)
        (runs / r["recipe"] / "method_result.json").write_text(json.dumps(r))
    (runs / "baselines.json").write_text(json.dumps(BASELINES))
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    methods.add_arguments(parser)
    args = parser.parse_args(
        ["--recipes", "simclr_fmnist,mae_vit_fmnist", "--runs-dir", str(runs), "--out", str(tmp_path / "methods.json")]
    )
    assert methods.run(args) == 0
    table = (tmp_path / "methods.md").read_text()
    assert table == methods.assemble(RESULTS, BASELINES)[0]
    payload = json.loads((tmp_path / "methods.json").read_text())
    assert payload["suite"] == "methods" and len(payload["rows"]) == 5
    assert "reusing" in capsys.readouterr().out
