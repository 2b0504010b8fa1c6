"""`sslscale info`: what is installed and which kernel backends can run here (a table, or `--json`)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import textwrap

import torch

from sslscale import __version__, _ext
from sslscale.ops import backends


def _version(package: str) -> str | None:
    """The installed distribution's version, without importing it (deepspeed's import alone takes seconds)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    ext = _ext.load()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    table: dict[str, dict] = {}
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


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def format_table(info: dict, width: int | None = None) -> str:
    """The human-readable report: short key/value sections, then one row per (op, backend) whose reason is
    wrapped (never cut) to `width` columns (default: the terminal's, at least 60)."""
    if width is None:
        width = max(60, shutil.get_terminal_size((100, 24)).columns)
    ext = info["extension"]
    if ext["built"]:
        parts = [
            "OpenMP" if ext["with_openmp"] else "no OpenMP",
            f"{ext['threads']} threads",
            "CUDA kernels" if ext["with_cuda"] else "no CUDA kernels",
        ]
        built = "yes (" + ", ".join(parts) + ")"
    else:
        built = f"no: {ext['error']}"
    cuda_build = f"CUDA {info['torch_cuda']}" if info["torch_cuda"] else "CPU build"
    interpreter = "on" if info["triton_interpret"] else "off"
    sections = {
        "versions": [
            ("sslscale", info["sslscale"]),
            ("python", info["python"]),
            ("torch", f"{info['torch']} ({cuda_build})"),
            ("triton", f"{_or_dash(info['triton'])} (interpreter {interpreter})"),
            ("deepspeed", _or_dash(info["deepspeed"])),
            ("webdataset", _or_dash(info["webdataset"])),
        ],
        "device": [("CUDA available", "yes" if info["cuda_available"] else "no"), ("GPU", _or_dash(info["gpu"]))],
        "extension sslscale._C": [
            ("built", built),
            ("SSLSCALE_BACKEND", info["backend_env"] or "(unset: automatic choice)"),
        ],
    }
    lines: list[str] = []
    for title, rows in sections.items():
        lines.append(title)
        for key, value in rows:
            lines += textwrap.wrap(str(value), width, initial_indent=f"  {key:<18s}", subsequent_indent=" " * 20) or [
                f"  {key}"
            ]
    op_w = max(len("op"), *(len(op) for op in info["backends"]))
    be_w = max(len("backend"), *(len(b) for t in info["backends"].values() for b in t))
    head = f"  {'op':<{op_w}s}  {'backend':<{be_w}s}  usable  "
    lines += ["", "kernel backends", head + "why"]
    for op, table in info["backends"].items():
        for i, (name, cell) in enumerate(table.items()):
            prefix = f"  {op if i == 0 else '':<{op_w}s}  {name:<{be_w}s}  {'yes' if cell['usable'] else 'no':<6s}  "
            lines += textwrap.wrap(
                cell["why"] or "-",
                width,
                initial_indent=prefix,
                subsequent_indent=" " * len(prefix),
                break_long_words=False,
                break_on_hyphens=False,
            ) or [prefix.rstrip()]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0
