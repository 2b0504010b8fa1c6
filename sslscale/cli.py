"""The `sslscale` command. Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their subcommand runs, so `sslscale info` and `--help` stay
fast (no torch import)."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from types import ModuleType

from sslscale import __version__

DESCRIPTION = "Self-supervised pretraining on DeepSpeed ZeRO with fused contrastive kernels."
EPILOG = "Run `sslscale COMMAND --help` for the options of a command; launch scripts: launchers/README.md."

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("sslscale.info", "versions, kernel backends, CUDA/Triton status"),
    "shards": ("sslscale.data.shards", "write a source split as webdataset tar shards + manifest.json"),
    "bench": ("sslscale.bench.cli", "kernel, data and training benchmarks (table + JSON)"),
    "config": ("sslscale.train.config", "validate a pretraining config and print it resolved (YAML)"),
    "pretrain": ("sslscale.train.pretrain", "self-supervised pretraining on DeepSpeed ZeRO (YAML config)"),
    "export": ("sslscale.train.export", "encoder weights of a run as safetensors (+ JSON sidecar)"),
    "evaluate": ("sslscale.adapt.evaluate", "linear-probe an exported encoder vs random init and raw pixels"),
    "adapt": ("sslscale.adapt.runner", "few-label adaptation: probe, finetune, LoRA, adapters, kNN"),
    "generate": ("sslscale.adapt.generate", "continue a prompt with an exported causal LM"),
    "lm-eval": ("sslscale.adapt.lm_eval", "held-out bits per character of an exported causal LM"),
}

# OSErrors that are the user's environment, not a bug: reported as one line instead of a traceback.
_ENVIRONMENT_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, ModuleType | None]:
    parser = argparse.ArgumentParser(prog="sslscale", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"sslscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (mod_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(mod_name)
            module.add_arguments(sp)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `deepspeed -m sslscale.cli ...` inserts --local_rank=N before the subcommand; LOCAL_RANK is in the env too
    argv = [a for a in argv if not a.startswith("--local_rank=")]
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    try:
        return int(module.run(args) or 0)
    except OSError as err:
        if err.errno not in _ENVIRONMENT_ERRORS:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"sslscale {args.command}: {err.strerror}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
