"""`sslscale adapt CONFIG.yaml [--set key=value ...]`: adapt an exported encoder to a labelled dataset with every
configured method at every label count, against a random-init and a raw-pixels row.

One loop shares what the methods have in common: the data (loaded and prepared once, as the encoder's exported
preprocessing says), the label subsets (`probe.sample_per_class`, seed s for subset s: the same subsets for every
method and row), the per-layer feature cache of each row (`Task.features`), and the result table. Writes
RUN_DIR/config.yaml (resolved), results.json (rewritten after every cell, so an interrupted sweep keeps what it
finished), results.md, accuracy_vs_labels.png and weights/ROW/*.safetensors (trained parameters of each run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import cast

import torch
import yaml

from sslscale.adapt import probe, report
from sslscale.adapt.config import AdaptConfig, load, to_dict
from sslscale.adapt.datasets import load_shards, load_split
from sslscale.adapt.methods import METHODS, Task
from sslscale.schema import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="adapt YAML (see configs/adapt/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set methods.lora.rank=8 (repeatable)",
    )


def load_data(cfg: AdaptConfig, meta: dict) -> tuple[tuple, tuple, dict]:
    """(train, test, preprocessing used): images prepared as the encoder's metadata says, overridden by data."""
    d = cfg.data
    pre = dict(meta.get("preprocessing") or {})
    if d.image_size is not None:
        pre["image_size"] = d.image_size
    if d.channels is not None:
        pre["channels"] = d.channels
    if d.train_shards is not None and d.test_shards is not None:  # (the config allows both or neither)
        train = load_shards(d.train_shards, pre, limit=d.limit_train)
        test = load_shards(d.test_shards, pre, limit=d.limit_test)
    else:
        train = load_split(d.source, "train", d.data_dir, pre)
        test = load_split(d.source, "test", d.data_dir, pre)
        if d.limit_train:
            train = (train[0][: d.limit_train], train[1][: d.limit_train])
        if d.limit_test:
            test = (test[0][: d.limit_test], test[1][: d.limit_test])
    return train, test, pre


def label_subsets(train_y: torch.Tensor, cfg: AdaptConfig) -> dict[int | str, list[torch.Tensor]]:
    """column -> one index tensor per seed: k per class for each configured k, and all labels (seed 0)."""
    out: dict[int | str, list[torch.Tensor]] = {}
    for k in cfg.sweep.labels_per_class:
        out[k] = [probe.sample_per_class(train_y, k, seed) for seed in range(cfg.sweep.seeds)]
    if cfg.sweep.all_labels:
        out["all"] = [torch.arange(len(train_y))]
    return out


def rows(cfg: AdaptConfig, encoder: torch.nn.Module) -> list[tuple[str, torch.nn.Module | None]]:
    from sslscale.models import encoder_from_config

    out: list[tuple[str, torch.nn.Module | None]] = [("pretrained", encoder)]
    if cfg.baselines.random_init:
        torch.manual_seed(cfg.baselines.init_seed)
        out.append(("random_init", encoder_from_config(cast(dict, encoder.config)).eval()))
    if cfg.baselines.raw_pixels:
        out.append(("raw_pixels", None))
    return out


def sweep(
    cfg: AdaptConfig, encoder: torch.nn.Module, train: tuple, test: tuple, run_dir: Path, header: dict, log=print
) -> dict:
    """Every (row, method entry, column, seed); returns the results document (also written as it grows)."""
    (train_x, train_y), (test_x, test_y) = train, test
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    subsets = label_subsets(train_y, cfg)
    res = {
        **header,
        "num_train": len(train_y),
        "num_test": len(test_y),
        "num_classes": num_classes,
        "seeds": cfg.sweep.seeds,
        "columns": list(subsets),
        "results": [],
    }
    for row, model in rows(cfg, encoder):
        task = Task(
            row=row,
            encoder=model,
            train_x=train_x,
            train_y=train_y,
            test_x=test_x,
            test_y=test_y,
            num_classes=num_classes,
            out_dir=run_dir / "weights" / row,
            encoder_file=cfg.model,
        )
        for entry, (method_name, opts) in cfg.resolved_methods.items():
            method = METHODS[method_name]
            if model is None and method.needs_encoder:
                continue
            for col, per_seed in subsets.items():
                start = time.perf_counter()
                runs = [method.run(task, opts, idx, seed) for seed, idx in enumerate(per_seed)]
                accs = [r["accuracy"] for r in runs]
                m, sd = probe.mean_std(accs)
                res["results"].append(
                    {
                        "row": row,
                        "entry": entry,
                        "method": method_name,
                        "labels_per_class": col,
                        "num_labels": len(per_seed[0]),
                        "mean": m,
                        "std": sd,
                        "per_seed": accs,
                        "seconds": round(time.perf_counter() - start, 2),
                        "runs": runs,
                    }
                )
                log(
                    f"{row:<12} {entry:<14} {report.column_label(col, len(train_y)):>12}: "
                    f"{100 * m:5.1f} ± {100 * sd:4.1f}  ({time.perf_counter() - start:.0f} s)"
                )
                write_json(res, run_dir / "results.json")
    return res


def write_json(res: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(path)


def adapt(cfg: AdaptConfig, log=print) -> dict:
    """Run the configured sweep and write its outputs under cfg.run_dir; returns results.json's content."""
    from sslscale.models import load_encoder, read_metadata

    start = time.perf_counter()
    torch.set_flush_denormal(True)  # denormals in BN/ReLU features otherwise slow CPU convolutions a lot
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    encoder = load_encoder(cfg.model)
    meta = read_metadata(cfg.model)
    train, test, pre = load_data(cfg, meta)
    header = {"encoder": cfg.model, "encoder_config": meta["encoder"], "preprocessing": pre, "config": to_dict(cfg)}
    res = sweep(cfg, encoder, train, test, run_dir, header, log)
    res["seconds"] = round(time.perf_counter() - start, 2)
    write_json(res, run_dir / "results.json")
    (run_dir / "results.md").write_text(report.markdown(res))
    if cfg.plot:
        report.plot(res, run_dir / "accuracy_vs_labels.png")
    return res


def run(args: argparse.Namespace) -> int:
    from sslscale.data import CorruptDataError

    try:
        cfg = load(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"sslscale adapt: {err}", file=sys.stderr)
        return 2
    try:
        res = adapt(cfg)
    except (OSError, ValueError, CorruptDataError) as err:
        print(f"sslscale adapt: error: {err}", file=sys.stderr)
        return 2
    print(report.markdown(res), end="")
    print(f"({res['seconds']:.0f} s; outputs in {cfg.run_dir})")
    return 0
