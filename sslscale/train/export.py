"""`sslscale export RUN_DIR --out FILE.safetensors`: the exported modules of a run, consolidated from any ZeRO stage.

Stage 1-3 checkpoints hold the fp32 master weights partitioned over ranks; DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint` reassembles them. Stage 0 keeps the whole model in
`mp_rank_00_model_states.pt['module']`.

What is written is the objective's `export_modules` (recorded in RUN_DIR/model.json when the run starts; default
the encoder alone: EMA targets, predictors, projectors, queues and classifiers are training-only). With the encoder
alone its `encoder.` prefix is stripped, so the file holds PLAIN encoder keys and loads with
`sslscale.models.load_encoder` (what `sslscale evaluate` reads). An objective exporting more modules (a GPT with its
head, say) keeps each key's module prefix. Metadata key "sslscale" (and the sidecar FILE.json) hold
{"encoder": encoder config, "objective": ..., "modules": [...], "step": ..., "run_dir": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from sslscale.train import checkpoint
from sslscale.train.config import ZeroConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `sslscale pretrain`")
    parser.add_argument("--out", required=True, help="output .safetensors file (a .json sidecar is written too)")
    parser.add_argument("--checkpoint", default="auto",
                        help="'auto' (newest complete checkpoint) or a checkpoint directory")
    parser.add_argument("--hf", default=None, metavar="DIR",
                        help="also write DIR in the Hugging Face layout (GPT-2 / BERT architectures; config.json, "
                             "model.safetensors and the run's tokenizer)")


def run(args: argparse.Namespace) -> int:
    try:
        meta = export(args.run_dir, args.out, args.checkpoint)
        if args.hf:
            meta["hf"] = str(export_hf(args.out, args.hf, run_tokenizer(args.run_dir)))
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"sslscale export: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"exported": str(args.out), "step": meta["step"], "tensors": meta["tensors"],
                      **({"hf": meta["hf"]} if "hf" in meta else {})}))
    return 0


def run_tokenizer(run_dir: str | Path) -> str | None:
    """The tokenizer.json the run's text stream read (data.tokenizer, else the one beside its shards' manifest)."""
    from types import SimpleNamespace

    from sslscale.train.build import data_tokenizer_path

    raw = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    data = raw.get("data") or {}
    return data_tokenizer_path(SimpleNamespace(tokenizer=data.get("tokenizer"), shards=data.get("shards")))


def export_hf(exported: str | Path, out_dir: str | Path, tokenizer: str | None) -> Path:
    """The exported model file rewritten in the Hugging Face layout (`sslscale.models.hf.save_hf`): GPT-2 or BERT
    architectures only (others are refused with the reasons)."""
    from sslscale.models import load_encoder
    from sslscale.models.hf import save_hf

    if tokenizer is not None and not Path(tokenizer).is_file():
        tokenizer = None
    return save_hf(load_encoder(str(exported)), out_dir, tokenizer)


def consolidated_state_dict(ckpt: Path, stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 (stage 1-3) or module-dtype (stage 0) state dict of the trained module."""
    if stage == 0:
        states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return dict(states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))


def exported_state_dict(full: dict[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    """The keys of `modules` as contiguous tensors that own their memory; the prefix is stripped when the only
    module is the encoder (the plain encoder file format)."""
    strip = modules == ["encoder"]
    out = {}
    for module in modules:
        prefix = module + "."
        out.update({(k[len(prefix):] if strip else k): v.detach().contiguous().clone()
                    for k, v in full.items() if k.startswith(prefix)})
    if not out:
        sample = ", ".join(list(full)[:5])
        raise ValueError(f"no parameters of {modules} in the checkpoint (keys start: {sample}); is the trained "
                         "module an Objective with those submodules?")
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
    step = json.loads((ckpt / checkpoint.MARKER).read_text())["step"]
    meta = {"encoder": model_meta.get("encoder"), "objective": model_meta.get("objective"), "modules": modules,
            "step": step,
            "run_dir": str(run_dir.resolve()), "checkpoint": ckpt.name, "tensors": len(weights)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(weights, str(tmp), metadata={"sslscale": json.dumps(meta)})
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return meta
