"""`sslscale bench WHAT`: dispatch to one benchmark module (`add_arguments(parser)`, `run(args)`)."""

from __future__ import annotations

import argparse
import importlib

SUITES: dict[str, tuple[str, str]] = {
    "infonce": ("sslscale.bench.infonce", "fused InfoNCE vs reference: fwd+bwd time, peak extra memory"),
    "attention": ("sslscale.bench.attention", "fused causal attention vs reference and SDPA"),
    "data": ("sslscale.bench.data", "two-view image and MLM/CLM text stream throughput"),
    "train": ("sslscale.bench.train", "SimCLR training throughput per ZeRO stage, engine overhead"),
    "methods": (
        "sslscale.bench.methods",
        "the method table: pretrain each recipe (2 processes), export, probe and "
        "kNN on the same label subsets, with random-init and raw-pixel rows",
    ),
    "gpu-static": (
        "sslscale.bench.gpu_static",
        "registers, spills, shared memory, occupancy, grids of the GPU kernels for sm_90, without a GPU",
    ),
    "gpu-check": ("sslscale.bench.gpu_check", "on a GPU: every GPU test, then the GPU benchmarks, one JSON"),
    "chaos": ("sslscale.bench.chaos", "random kills (ranks, launcher, group, during saves) vs one uninterrupted run"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, (mod_name, help_text) in SUITES.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--out", default=None, help="JSON output path (default: bench-results/<suite>.json)")
        sp.set_defaults(_module=mod_name)
        try:
            importlib.import_module(mod_name).add_arguments(sp)
        except ModuleNotFoundError:
            sp.set_defaults(_missing=True)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_missing", False):
        raise SystemExit(f"benchmark suite {args.suite!r} is not part of this build yet")
    return int(importlib.import_module(args._module).run(args) or 0)
