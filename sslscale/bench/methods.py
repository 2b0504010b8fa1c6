"""`sslscale bench methods`: the method table. Each recipe is pretrained (2 processes, the local launcher), exported
and evaluated on the same label subsets; one markdown table + one JSON.

Columns: linear probe at k labels/class (mean ± std over seeds; `sslscale evaluate`'s probe and subsets), linear
probe with all labels, weighted kNN (k=20, cosine, the whole training split as the bank), and what the pretraining
cost: wall seconds of the launcher (start-up and checkpoints included) and samples/s of the training steps (from
the run's metrics.jsonl: samples over the summed step times). Baseline rows: each encoder architecture at a
seed-fixed random init, and raw pixels, evaluated once.

Each finished recipe leaves RUNS/NAME/method_result.json (baselines: RUNS/baselines.json); a rerun reuses them
unless `--fresh`, so an interrupted table continues where it stopped. `assemble(results, baselines)` turns those
JSONs into the table; it is what the tests check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sslscale.bench.common import write_json

REPO = Path(__file__).resolve().parents[2]
RECIPES = (
    "simclr_fmnist",
    "byol_fmnist",
    "moco_v2_fmnist",
    "autoencoder_fmnist",
    "mae_vit_fmnist",
    "rotation_fmnist",
    "jigsaw_fmnist",
    "supervised_fmnist",
)
LAUNCHER = REPO / "launchers" / "local" / "pretrain_2proc.sh"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipes",
        default=",".join(RECIPES),
        help="recipe names under configs/pretrain/ (or YAML paths), comma-separated",
    )
    parser.add_argument("--runs-dir", default="runs/methods", help="run directories and per-recipe results")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to every recipe (repeatable), e.g. schedule.total_steps=50",
    )
    parser.add_argument("--labels-per-class", type=int, default=10, help="k of the few-label probe (default 10)")
    parser.add_argument("--seeds", type=int, default=3, help="label subsets of the few-label probe (default 3)")
    parser.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN column (default 20)")
    parser.add_argument("--limit-train", type=int, default=None, help="evaluate on the first N training images")
    parser.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--fresh", action="store_true", help="ignore results and runs left by an earlier call")
    parser.add_argument("--markdown", default=None, help="markdown table path (default: OUT with .md)")


def recipe_path(name: str) -> Path:
    """A recipe name (configs/pretrain/NAME.yaml) or a YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {name!r} does not exist")
        return path
    path = REPO / "configs" / "pretrain" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no recipe {name!r}: expected one of {known} or a .yaml path")
    return path


def training_rate(metrics_file: Path) -> dict[str, float | int | None]:
    """steps, samples and samples/s of the training steps from a run's metrics.jsonl (each line's step time
    covers the steps since the previous line)."""
    lines = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
    lines = [r for r in lines if "samples" in r]
    if not lines:
        raise ValueError(f"{metrics_file} holds no logged training steps")
    seconds, prev = 0.0, 0
    for r in lines:
        if r.get("step_time_s") is not None:
            seconds += r["step_time_s"] * (r["step"] - prev)
        prev = r["step"]
    samples = lines[-1]["samples"]
    return {
        "steps": lines[-1]["step"],
        "samples": samples,
        "train_seconds": round(seconds, 1),
        "samples_per_s": round(samples / seconds, 1) if seconds else None,
        "final_loss": lines[-1].get("loss"),
        "probe_acc": next((r["probe_acc"] for r in reversed(lines) if "probe_acc" in r), None),
    }


def pretrain(config: Path, run_dir: Path, overrides: list[str]) -> float:
    """Run the 2-process launcher on `config` into `run_dir`; wall seconds. A failed run is an error naming it."""
    cmd = [str(LAUNCHER), str(config), "--set", f"run_dir={run_dir}", "--set", "logging.progress=false"]
    cmd += [x for s in overrides for x in ("--set", s)]
    env = {**os.environ, "PYTHON": sys.executable}
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if rc == 75:
        raise RuntimeError(
            f"pretraining {config.name} was preempted (checkpointed): rerun the same command to resume it; see {log}"
        )
    if rc != 0:
        raise RuntimeError(f"pretraining {config.name} failed with exit status {rc}; see {log}")
    return time.perf_counter() - start


def method_label(objective: dict, default: str) -> str:
    """The objective's registry name, with its `variant` when it has one ("autoencoder (masked)")."""
    name = objective.get("name", default)
    return f"{name} ({objective['variant']})" if objective.get("variant") else name


def _row(res: dict) -> dict:
    """The evaluate() fields the table shows."""
    return {
        "few_mean": res["few_label"]["mean"],
        "few_std": res["few_label"]["std"],
        "few_per_seed": res["few_label"]["per_seed"],
        "all_labels": res["all_labels"]["accuracy"],
        "knn": res.get("knn", {}).get("accuracy"),
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def assemble(results: list[dict], baselines: dict) -> tuple[str, dict]:
    """(markdown table, JSON payload) from per-recipe results and the baselines.

    A result: {"recipe", "method", "encoder", "eval": row, "pretrain": {"wall_seconds", "samples_per_s", ...}};
    baselines: {"random_init": {encoder name: row}, "raw_pixels": row, "labels_per_class", "seeds", "knn_k"}; a row
    holds few_mean, few_std, all_labels, knn (fractions). Every row must share the label subsets: results and
    baselines with another labels_per_class or seed count are an error."""
    k, seeds, knn_k = baselines["labels_per_class"], baselines["seeds"], baselines["knn_k"]
    for r in results:
        got = (r["labels_per_class"], r["seeds"], r["knn_k"])
        if got != (k, seeds, knn_k):
            raise ValueError(
                f"result of {r['recipe']} was evaluated with (labels_per_class, seeds, knn_k) = {got}, "
                f"the baselines with {(k, seeds, knn_k)}: rerun it with the same settings"
            )
    head = (
        f"| method | recipe | encoder | linear probe, {k} labels/class (mean ± std, {seeds} seeds) | "
        f"linear probe, all labels | kNN (k={knn_k}) | pretraining s | samples/s |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    rows = []
    for r in results:
        e, p = r["eval"], r["pretrain"]
        rate = "–" if p.get("samples_per_s") is None else f"{p['samples_per_s']:,.0f}"
        lines.append(
            f"| {r['method']} | `{r['recipe']}` | {r['encoder']} | {_pct(e['few_mean'])} ± "
            f"{_pct(e['few_std'])} | {_pct(e['all_labels'])} | {_pct(e['knn'])} | "
            f"{p['wall_seconds']:.0f} | {rate} |"
        )
        rows.append({"kind": "pretrained", **r})
    for encoder, e in sorted(baselines["random_init"].items()):
        lines.append(
            f"| random init | – | {encoder} | {_pct(e['few_mean'])} ± {_pct(e['few_std'])} | "
            f"{_pct(e['all_labels'])} | {_pct(e['knn'])} | – | – |"
        )
        rows.append({"kind": "random_init", "encoder": encoder, "eval": e})
    e = baselines["raw_pixels"]
    lines.append(
        f"| raw pixels | – | – | {_pct(e['few_mean'])} ± {_pct(e['few_std'])} | {_pct(e['all_labels'])} | "
        f"{_pct(e['knn'])} | – | – |"
    )
    rows.append({"kind": "raw_pixels", "eval": e})
    payload = {"labels_per_class": k, "seeds": seeds, "knn_k": knn_k, "rows": rows}
    return "\n".join(lines) + "\n", payload


def run(args: argparse.Namespace) -> int:
    import torch

    from sslscale.adapt.datasets import load_split
    from sslscale.adapt.evaluate import evaluate
    from sslscale.models import encoder_from_config, load_encoder, read_metadata
    from sslscale.train.export import export

    torch.set_flush_denormal(True)
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    configs = {n: recipe_path(n) for n in names}  # every name checked before anything runs
    settings = {"labels_per_class": args.labels_per_class, "seeds": args.seeds, "knn_k": args.knn_k}
    data: dict[str, Any] = {}

    def splits():
        if not data:
            train, test = load_split("fashion-mnist", "train"), load_split("fashion-mnist", "test")
            if args.limit_train:
                train = (train[0][: args.limit_train], train[1][: args.limit_train])
            if args.limit_test:
                test = (test[0][: args.limit_test], test[1][: args.limit_test])
            data.update(train=train, test=test)
        return data["train"], data["test"]

    def rows_of(encoder, which):
        res = evaluate(encoder, *splits(), args.labels_per_class, args.seeds, rows=which, knn_k=args.knn_k)
        return {row: _row(res["rows"][row]) for row in which}

    results: list[dict] = []
    encoders: dict[str, dict] = {}
    for config in configs.values():
        stem = config.stem
        out = runs / stem / "method_result.json"
        if out.is_file() and not args.fresh:
            results.append(json.loads(out.read_text()))
            encoders.setdefault(results[-1]["encoder"], results[-1]["encoder_config"])
            print(f"[methods] {stem}: reusing {out}", flush=True)
            continue
        if args.fresh and (runs / stem).exists():
            import shutil

            shutil.rmtree(runs / stem)
        print(f"[methods] {stem}: pretraining (2 processes)", flush=True)
        wall = pretrain(config, runs / stem, args.overrides)
        file = runs / stem / "encoder.safetensors"
        export(runs / stem, file)
        meta = read_metadata(str(file))
        print(f"[methods] {stem}: evaluating", flush=True)
        result = {
            "recipe": stem,
            "method": method_label(meta.get("objective") or {}, stem),
            "encoder": meta["encoder"]["name"],
            "encoder_config": meta["encoder"],
            **settings,
            "eval": rows_of(load_encoder(str(file)), ("pretrained",))["pretrained"],
            "pretrain": {"wall_seconds": round(wall, 1), **training_rate(runs / stem / "metrics.jsonl")},
            "overrides": args.overrides,
        }
        out.write_text(json.dumps(result, indent=2))
        results.append(result)
        encoders.setdefault(result["encoder"], meta["encoder"])

    base_file = runs / "baselines.json"
    baselines = json.loads(base_file.read_text()) if base_file.is_file() and not args.fresh else {}
    if {k: baselines.get(k) for k in settings} != settings:
        baselines = {**settings, "random_init": {}}
    # evaluate() builds the random-init encoder itself (seed 0) from the config of the encoder it is given
    for enc_name, enc_config in encoders.items():
        if enc_name not in baselines["random_init"]:
            print(f"[methods] random init {enc_name}: evaluating", flush=True)
            baselines["random_init"][enc_name] = rows_of(encoder_from_config(enc_config), ("random_init",))[
                "random_init"
            ]
    if "raw_pixels" not in baselines and encoders:
        print("[methods] raw pixels: evaluating", flush=True)
        any_encoder = encoder_from_config(next(iter(encoders.values())))
        baselines["raw_pixels"] = rows_of(any_encoder, ("raw_pixels",))["raw_pixels"]
    base_file.write_text(json.dumps(baselines, indent=2))

    table, payload = assemble(results, baselines)
    print(table)
    path = write_json(args.out, "methods", payload)
    md = Path(args.markdown) if args.markdown else path.with_suffix(".md")
    md.write_text(table)
    print(f"wrote {md}")
    return 0
