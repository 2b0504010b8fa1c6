"""`sslscale export RUN_DIR --out FILE.safetensors`: the exported modules of a run, consolidated from any ZeRO stage.

Stage 1-3 checkpoints hold the fp32 master weights partitioned over ranks; DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint` reassembles them. Stage 0 keeps the whole model in
`mp_rank_00_model_states.pt['module']`.

What is written is the objective's `export_modules` (recorded in RUN_DIR/model.json when the run starts; default
the encoder alone: EMA targets, predictors, projectors, queues and classifiers are training-only). With the encoder
alone its `encoder.` prefix is stripped, so the file holds PLAIN encoder keys and loads with
`sslscale.models.load_encoder` (what `sslscale evaluate` reads). An objective exporting more modules (a GPT with its
head, say) keeps each key's module prefix. Metadata key "sslscale" (and the sidecar FILE.json) hold
{"encoder": encoder config, "objective": ..., "modules": [...], "step": ..., "run_dir": ...}; a run on text
shards also gets its tokenizer copied to FILE_STEM.tokenizer.json beside the weights, named in "tokenizer".

The checkpoint is the newest complete one that verifies (`checkpoint.resolve_resume`); its files are read with
the weights-only unpickler (`train/safe_load.py`), and weights holding NaN/inf are refused with their names.

`--hf DIR` also writes a GPT or BERT encoder in the Hugging Face layout (`sslscale.models.hf`: GPT2LMHeadModel /
BertForPreTraining), with the tokenizer saved with the run's shards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from sslscale.train import checkpoint, safe_load
from sslscale.train.config import ZeroConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `sslscale pretrain`")
    parser.add_argument("--out", required=True, help="output .safetensors file (a .json sidecar is written too)")
    parser.add_argument(
        "--checkpoint", default="auto", help="'auto' (newest complete checkpoint) or a checkpoint directory"
    )
    parser.add_argument(
        "--hf",
        default=None,
        metavar="DIR",
        help="also write the Hugging Face layout of a GPT or BERT encoder to DIR (config.json, "
        "model.safetensors and the tokenizer saved with the run's shards)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        meta = export(args.run_dir, args.out, args.checkpoint)
        if args.hf is not None:
            meta["hf"] = str(export_hf(args.out, args.hf, args.run_dir))
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"sslscale export: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # where the output goes: read-only, full, a file in the way
        print(f"sslscale export: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "exported": str(args.out),
                "step": meta["step"],
                "tensors": meta["tensors"],
                **({"hf": meta["hf"]} if "hf" in meta else {}),
            }
        )
    )
    return 0


def consolidated_state_dict(ckpt: Path, stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 (stage 1-3) or module-dtype (stage 0) state dict of the trained module."""
    if stage == 0:
        states = safe_load.load(ckpt / "mp_rank_00_model_states.pt")
        assert isinstance(states, dict)
        return dict(states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with safe_load.weights_only():  # DeepSpeed's loader asks for weights_only=False: forced to True
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
    except Exception as err:
        if safe_load.is_refusal(err):
            raise safe_load.refusal(ckpt, err) from err
        raise


def check_finite(weights: dict[str, torch.Tensor], where: str) -> None:
    """Refuse to export weights holding NaN/inf, naming them (a diverged run must not look like a result)."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ValueError(
            f"{where}: {len(bad)} of {len(weights)} tensors hold NaN/inf ({shown}); not exported "
            "(export an earlier checkpoint with --checkpoint PATH)"
        )


def exported_state_dict(full: dict[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    """The keys of `modules` as contiguous tensors that own their memory; the prefix is stripped when the only
    module is the encoder (the plain encoder file format)."""
    strip = modules == ["encoder"]
    out = {}
    for module in modules:
        prefix = module + "."
        out.update(
            {
                (k[len(prefix) :] if strip else k): v.detach().contiguous().clone()
                for k, v in full.items()
                if k.startswith(prefix)
            }
        )
    if not out:
        sample = ", ".join(list(full)[:5])
        raise ValueError(
            f"no parameters of {modules} in the checkpoint (keys start: {sample}); is the trained "
            "module an Objective with those submodules?"
        )
    return out


def encoder_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys under `encoder.` with the prefix removed."""
    return exported_state_dict(full, ["encoder"])


def export(run_dir: str | Path, out: str | Path, which: str = "auto") -> dict:
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml; is it a run directory of `sslscale pretrain`?")
    # Only the ZeRO stage is needed: read it without re-validating the whole config (whose builders and
    # components may not be importable where the export runs).
    raw = yaml.safe_load(cfg_path.read_text()) or {}
    stage = (raw.get("zero") or {}).get("stage", ZeroConfig().stage)
    ckpt = checkpoint.resolve_resume(which, run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to export")
    model_meta = json.loads((run_dir / "model.json").read_text()) if (run_dir / "model.json").is_file() else {}
    modules = list(model_meta.get("export_modules", ["encoder"]))
    weights = exported_state_dict(consolidated_state_dict(ckpt, stage), modules)
    check_finite(weights, str(ckpt))
    step = json.loads((ckpt / checkpoint.MARKER).read_text())["step"]
    meta = {
        "encoder": model_meta.get("encoder"),
        "objective": model_meta.get("objective"),
        "modules": modules,
        "step": step,
        "run_dir": str(run_dir.resolve()),
        "checkpoint": ckpt.name,
        "tensors": len(weights),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = model_meta.get("tokenizer")
    if tokenizer:  # a text model: its tokenizer travels with the weights, named relative to them
        if not Path(tokenizer).is_file():
            raise FileNotFoundError(
                f"the run's tokenizer {tokenizer} (RUN_DIR/model.json) no longer exists; the "
                "export would not be usable without it"
            )
        name = out.stem + ".tokenizer.json"
        shutil.copyfile(tokenizer, out.parent / name)
        meta["tokenizer"] = name
    tmp = out.with_name(out.name + ".tmp")
    save_file(weights, str(tmp), metadata={"sslscale": json.dumps(meta)})
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return meta


def run_tokenizer(run_dir: str | Path) -> str | None:
    """The tokenizer file a text run trained with (`data.tokenizer`, else the one saved with `data.shards`); None
    for a run without text data."""
    from sslscale.data.pipelines import get_pipeline
    from sslscale.data.shardlist import resolve_shards
    from sslscale.data.stream import tokenizer_path

    data = (yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}).get("data") or {}
    pipeline = data.get("pipeline", "labeled")
    if not get_pipeline(pipeline).uses_text:
        return None
    _, manifest, base = resolve_shards(data.get("shards", ""))
    return tokenizer_path(data.get("tokenizer"), manifest, base, pipeline)


def export_hf(exported: str | Path, out_dir: str | Path, run_dir: str | Path | None = None) -> Path:
    """The Hugging Face layout (`sslscale.models.hf.save_hf`) of an exported GPT or BERT, with the run's
    tokenizer when `run_dir` names one."""
    from sslscale.models import load_encoder
    from sslscale.models.hf import save_hf

    tokenizer = run_tokenizer(run_dir) if run_dir is not None else None
    return save_hf(load_encoder(str(exported)), out_dir, tokenizer)
