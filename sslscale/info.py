"""`sslscale info`: what is installed and which kernel backends can run here."""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from sslscale import __version__, _ext
from sslscale.ops import backends


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "?")
    except Exception:  # noqa: BLE001  (any import failure means "not usable")
        return None


def collect() -> dict:
    ext = _ext.load()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    table = {}
    for op in backends.OPS:
        table[op] = {}
        for name in backends.BACKENDS:
            device = cuda if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else cpu
            avail = backends.availability(op, name, device)
            table[op][name] = {"usable": avail.usable, "why": avail.reason}
    return {
        "sslscale": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": _version("triton"),
        "triton_interpret": backends.triton_interpreted(),
        "deepspeed": _version("deepspeed"),
        "webdataset": _version("webdataset"),
        "extension": {
            "built": ext is not None,
            "error": _ext.error(),
            "with_cuda": bool(ext and ext.with_cuda()),
            "with_openmp": bool(ext and ext.with_openmp()),
            "threads": ext.num_threads() if ext else None,
        },
        "backend_env": os.environ.get("SSLSCALE_BACKEND"),
        "backends": table,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("sslscale", "python", "torch", "torch_cuda", "cuda_available", "gpu", "triton",
                "triton_interpret", "deepspeed", "webdataset", "backend_env"):
        print(f"{key:18s} {info[key]}")
    ext = info["extension"]
    status = "built" if ext["built"] else f"NOT built ({ext['error']})"
    print(f"{'extension':18s} {status}; cuda={ext['with_cuda']} openmp={ext['with_openmp']} threads={ext['threads']}")
    print("\nbackend     " + "".join(f"{op:<44s}" for op in backends.OPS))
    for name in backends.BACKENDS:
        cells = []
        for op in backends.OPS:
            cell = info["backends"][op][name]
            cells.append(f"{'yes' if cell['usable'] else 'no':4s}{cell['why'][:40]:<40s}")
        print(f"{name:12s}" + "".join(cells))
    return 0
