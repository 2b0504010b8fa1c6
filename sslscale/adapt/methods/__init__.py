"""The adapt runner's methods: name -> `Method` (run function + options dataclass), see `base.py`.

Adding a method is one module with `METHOD = Method(...)` and one line here. Slots kept for methods built
elsewhere: "zeroshot" (CLIP class prompts, sslscale/adapt/zeroshot.py) and "icl" / "label_scoring" (language
models, sslscale/adapt/icl.py).
"""

from __future__ import annotations

from sslscale.adapt.methods import adapter, finetune, knn, lora, probe
from sslscale.adapt.methods.base import Method, Task

METHODS: dict[str, Method] = {
    "probe": probe.METHOD,
    "knn": knn.METHOD,
    "finetune": finetune.METHOD,
    "lora": lora.METHOD,
    "adapter": adapter.METHOD,
}

__all__ = ["METHODS", "Method", "Task"]
