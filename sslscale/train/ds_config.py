"""A user's DeepSpeed JSON (`zero.config`) against the sslscale config: checked when the config is loaded, before
any process group starts, and turned into the JSON DeepSpeed gets.

A stock DeepSpeed JSON is accepted. Its keys fall in three groups:
- keys sslscale also owns (`OWNED`: batch sizes, accumulation, clipping, precision, ZeRO stage and offload, the
  optimizer and the LR schedule): translated to sslscale keys. A key set in both places must agree (else an error
  naming both values); a key set only in the JSON is taken from it; the HF-style value "auto" means "sslscale's".
  `train_batch_size` must equal data.batch_size x world size x grad_accum: checked at load when the launcher's
  environment gives the world size (WORLD_SIZE / SLURM_NTASKS), else only for divisibility, and again at engine
  start with the real world size. `optimizer` maps when it is Adam/AdamW (DeepSpeed's Adam is AdamW unless
  adam_w_mode=false), `scheduler` when it is WarmupCosineLR, WarmupDecayLR or WarmupLR with a linear warmup from
  zero; anything else is an error saying to use the sslscale `optimizer:` / `schedule:` sections (sslscale's client
  torch optimizer is what runs; DeepSpeed never sees these two sections).
- keys passed through to DeepSpeed as written (`PASSED`), `steps_per_print` and `wall_clock_breakdown` included
  (sslscale's defaults, silence, apply only when the JSON leaves them out);
- anything else at the top level is an error naming the nearest valid key (a typo such as `zero_optimisation`
  would otherwise be ignored by DeepSpeed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sslscale.schema import ConfigError, nearest

# Top-level keys sslscale translates (and checks) itself.
OWNED = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "bf16",
    "fp16",
    "zero_optimization",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
)
# Top-level keys DeepSpeed 0.19 reads that pass through unchanged.
PASSED = (
    "steps_per_print",
    "wall_clock_breakdown",
    "memory_breakdown",
    "dump_state",
    "prescale_gradients",
    "gradient_predivide_factor",
    "gradient_allreduce_op",
    "communication_data_type",
    "seq_parallel_communication_data_type",
    "sparse_gradients",
    "disable_allgather",
    "dataloader_drop_last",
    "checkpoint",
    "data_types",
    "activation_checkpointing",
    "flops_profiler",
    "comms_logger",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "aio",
    "timers",
    "compile",
    "torch_autocast",
    "amp",
    "log_level",
    "disable_python_gc",
    "elasticity",
    "autotuning",
    "nebula",
    "data_efficiency",
    "curriculum_learning",
    "compression_training",
    "weight_quantization",
    "hybrid_engine",
    "pipeline",
    "tensor_parallel",
    "sparse_attention",
    "graph_harvesting",
    "use_data_before_expert_parallelism",
    "zero_allow_comm_data_type_fp32",
    "managed_gradient_accumulation",
    "use_node_local_storage",
    "monitor_config",
)

_OPTIMIZERS = {"adam": "adamw", "adamw": "adamw"}
_SCHEDULES = {"warmupcosinelr": "cosine", "warmupdecaylr": "linear", "warmuplr": "constant"}
_OFFLOAD_DEVICES = ("none", "cpu")


def read(path: str | Path) -> dict:
    """The JSON at `path`, its top-level keys checked."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"zero.config={path}: cannot read it ({err.strerror or err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"zero.config={path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"zero.config={path}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in data:
        if key not in OWNED and key not in PASSED:
            raise ConfigError(f"zero.config={path}: unknown DeepSpeed key '{key}'{nearest(key, OWNED + PASSED)}")
    return data


def _enabled(section: Any) -> Any:
    return section.get("enabled", False) if isinstance(section, Mapping) else section


def _offload_device(zero: Mapping, key: str, path: str | Path) -> str | None:
    section = zero.get(key)
    if section is None:
        return None
    device = section.get("device", "none") if isinstance(section, Mapping) else section
    if device not in _OFFLOAD_DEVICES:
        raise ConfigError(
            f"zero.config={path}: zero_optimization.{key}.device={device!r} is not supported through "
            f"sslscale; expected one of {', '.join(_OFFLOAD_DEVICES)} (see configs/deepspeed/README.md)"
        )
    return device


def translate(ds: Mapping, path: str | Path) -> dict[str, Any]:
    """The sslscale keys (dotted) the JSON sets, with their values; "auto" values are left out."""
    out: dict[str, Any] = {}
    pairs = {
        "train_micro_batch_size_per_gpu": "data.batch_size",
        "gradient_accumulation_steps": "grad_accum",
        "gradient_clipping": "grad_clip",
    }
    for key, target in pairs.items():
        if key in ds:
            out[target] = ds[key]
    on = [name for name in ("bf16", "fp16") if _enabled(ds.get(name)) is True]
    if len(on) > 1:
        raise ConfigError(f"zero.config={path}: both bf16 and fp16 are enabled; enable one")
    if on:
        out["precision"] = on[0]
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        raise ConfigError(f"zero.config={path}: zero_optimization must be an object, got {zero!r}")
    if "stage" in zero:
        out["zero.stage"] = zero["stage"]
    for key in ("offload_optimizer", "offload_param"):
        device = _offload_device(zero, key, path)
        if device is not None:
            out[f"zero.{key}"] = device
    if ds.get("zero_allow_untested_optimizer") is False or ds.get("zero_force_ds_cpu_optimizer") is True:
        raise ConfigError(
            f"zero.config={path}: zero_allow_untested_optimizer=false / zero_force_ds_cpu_optimizer="
            "true would refuse sslscale's client torch optimizer; drop them"
        )
    if "optimizer" in ds:
        out.update(_optimizer(ds["optimizer"], path))
    if "scheduler" in ds:
        out.update(_scheduler(ds["scheduler"], path))
    return {k: v for k, v in out.items() if v != "auto"}


def _optimizer(section: Any, path: str | Path) -> dict[str, Any]:
    kind = str(section.get("type", "")) if isinstance(section, Mapping) else ""
    params = dict(section.get("params", {})) if isinstance(section, Mapping) else {}
    name = _OPTIMIZERS.get(kind.lower())
    if name is None or params.pop("adam_w_mode", True) is False:
        raise ConfigError(
            f"zero.config={path}: optimizer type {kind!r}{' with adam_w_mode=false' if name else ''} "
            "does not map to an sslscale optimizer; remove the JSON's optimizer section and use the "
            "sslscale `optimizer:` section (adamw | sgd | lars)"
        )
    params.pop("torch_adam", None)
    out = {"optimizer.name": name}
    for key in ("lr", "betas", "eps", "weight_decay"):
        if key in params:
            out[f"optimizer.{key}"] = params.pop(key)
    if params:
        raise ConfigError(
            f"zero.config={path}: optimizer.params {sorted(params)} have no sslscale equivalent; "
            "use the sslscale `optimizer:` section"
        )
    return out


def _scheduler(section: Any, path: str | Path) -> dict[str, Any]:
    kind = str(section.get("type", "")) if isinstance(section, Mapping) else ""
    params = dict(section.get("params", {})) if isinstance(section, Mapping) else {}
    decay = _SCHEDULES.get(kind.lower())
    use = (
        "remove the JSON's scheduler section and use the sslscale `schedule:` section (linear warmup from 0, "
        "then cosine | linear | constant)"
    )
    if decay is None:
        raise ConfigError(f"zero.config={path}: scheduler type {kind!r} does not map to the sslscale schedule; {use}")
    if params.pop("warmup_type", "linear") != "linear":
        raise ConfigError(f"zero.config={path}: scheduler {kind} with a non-linear warmup_type; {use}")
    for key in ("warmup_min_ratio", "warmup_min_lr"):
        if params.pop(key, 0) not in (0, "auto"):
            raise ConfigError(f"zero.config={path}: scheduler {kind} with {key} != 0 (sslscale warms up from 0); {use}")
    out: dict[str, Any] = {"schedule.decay": decay}
    names = {
        "total_num_steps": "schedule.total_steps",
        "warmup_num_steps": "schedule.warmup_steps",
        "cos_min_ratio": "schedule.min_lr_ratio",
        "warmup_max_lr": "optimizer.lr",
    }
    for key, target in names.items():
        if key in params:
            out[target] = params.pop(key)
    params.pop("last_batch_iteration", None)
    if params:
        raise ConfigError(f"zero.config={path}: scheduler.params {sorted(params)} have no sslscale equivalent; {use}")
    return out


def _lookup(data: Mapping, dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _assign(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def merge(raw: dict) -> dict[str, Any]:
    """Fill the sslscale keys the YAML leaves out from the JSON named by raw `zero.config` (in place); returns the
    JSON's values for the keys the YAML also sets, for `check` to compare once the config is built."""
    found, path = _lookup(raw, "zero.config")
    if not found or not path:
        return {}
    both = {}
    for key, value in translate(read(path), path).items():
        explicit, _ = _lookup(raw, key)
        if explicit:
            both[key] = value
        else:
            _assign(raw, key, value)
    return both


def _value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def world_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The world size the launcher announces (torchrun / deepspeed / SLURM), or None."""
    env = os.environ if environ is None else environ
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return None


def check(cfg: Any, both: Mapping[str, Any], world: int | None) -> None:
    """Keys set in the YAML and the JSON agree; `train_batch_size` fits (fully when `world` is known)."""
    path = cfg.zero.config
    for key, value in both.items():
        mine = _value(cfg, key)
        if not _same(value, mine):
            raise ConfigError(
                f"zero.config={path} gives {key}={value!r} but the sslscale config has {key}={mine!r}; "
                "make them agree or drop one"
            )
    if path:
        check_train_batch(read(path), cfg, world)


def check_train_batch(ds: Mapping, cfg: Any, world: int | None) -> None:
    total = ds.get("train_batch_size", "auto")
    if total == "auto":
        return
    per_rank = cfg.data.batch_size * cfg.grad_accum
    where = f"zero.config={cfg.zero.config} has train_batch_size={total}"
    if world is not None and total != per_rank * world:
        raise ConfigError(
            f"{where} but data.batch_size={cfg.data.batch_size} x grad_accum={cfg.grad_accum} x "
            f"world size {world} = {per_rank * world}; make them agree or drop train_batch_size"
        )
    if world is None and (not isinstance(total, int) or total % per_rank):
        raise ConfigError(
            f"{where}, not a multiple of data.batch_size={cfg.data.batch_size} x grad_accum="
            f"{cfg.grad_accum} = {per_rank} (it must be that times the world size)"
        )


def engine_json(cfg: Any, world: int) -> dict:
    """The JSON DeepSpeed gets: the user's JSON (checked again with the real world size), minus the sections
    sslscale runs itself, with the keys sslscale owns set from the config."""
    ds: dict[str, Any] = {}
    if cfg.zero.config:
        ds = read(cfg.zero.config)
        check(cfg, translate(ds, cfg.zero.config), world)
    for key in ("optimizer", "scheduler", "train_batch_size", "fp16", "bf16"):
        ds.pop(key, None)
    zero = dict(ds.get("zero_optimization", {}))
    zero["stage"] = cfg.zero.stage
    for key in ("offload_optimizer", "offload_param"):
        device = getattr(cfg.zero, key)
        section = dict(zero.get(key) or {})
        if device == "none":
            zero.pop(key, None)
        else:
            section["device"] = device
            zero[key] = section
    user_fp16 = read(cfg.zero.config).get("fp16", {}) if cfg.zero.config else {}
    ds.update(
        {
            "train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.data.batch_size * cfg.grad_accum * world,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": cfg.precision == "bf16"},
            "fp16": {**(user_fp16 if cfg.precision == "fp16" else {}), "enabled": cfg.precision == "fp16"},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,  # offload with sslscale's client optimizer
        }
    )
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("checkpoint", {}).setdefault("tag_validation", "Fail")
    return ds
