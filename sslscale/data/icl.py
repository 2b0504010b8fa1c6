"""Few-shot problem sequences for in-context learning (the `icl-rules` source).

Each sequence draws a hidden rule from one family, *symbol mappings*: a rule maps `set_size` (3) input symbols,
drawn from the letters A-Z, to distinct labels drawn from the digits 0-9. A sequence shows solved examples
`x=y` of its rule (inputs drawn uniformly from the rule's set), separated by spaces:

    "K=7 B=2 K=7 W=0 B=2 ..."

Nothing but the preceding examples tells which label an input has: a model can only answer from the context, so
accuracy at 0 shots is chance (1 in 10 labels) and rises as the examples reveal the mapping (the copying /
induction behaviour of Chan et al. 2022's bursty symbol-label sequences).

Splits are by rule, so no test rule is ever seen in pretraining: a rule is a test rule when the first byte of
sha1 of its canonical text is divisible by 10 (about 10% of the 2.6M x 720 rules); train sequences are rejection-
sampled from the other rules, test episodes from these. Everything is a pure function of (split, index) through
numpy's PCG64 seeded per split: the same shards on every machine.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass

import numpy as np

INPUTS = tuple(string.ascii_uppercase)
LABELS = tuple(string.digits)
SET_SIZE = 3
EXAMPLES_PER_SEQUENCE = 16
SEQUENCES = {"train": 40_000, "test": 2_000}
_SEED = {"train": 11, "test": 29}


@dataclass(frozen=True)
class Rule:
    """A hidden mapping input symbol -> label (same order in both tuples)."""

    inputs: tuple[str, ...]
    labels: tuple[str, ...]

    def __call__(self, x: str) -> str:
        return self.labels[self.inputs.index(x)]

    @property
    def key(self) -> str:
        return ",".join(f"{x}{y}" for x, y in sorted(zip(self.inputs, self.labels)))


def is_test_rule(rule: Rule) -> bool:
    """The split of a rule: sha1(canonical text)[0] % 10 == 0 -> test only."""
    return hashlib.sha1(rule.key.encode()).digest()[0] % 10 == 0


def draw_rule(rng: np.random.Generator, split: str, set_size: int = SET_SIZE) -> Rule:
    """A uniformly drawn rule of `split` (rejection sampling on `is_test_rule`)."""
    if split not in SEQUENCES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= set_size <= len(LABELS):
        raise ValueError(f"set_size must be in [1, {len(LABELS)}], got {set_size}")
    while True:
        xs = rng.choice(len(INPUTS), set_size, replace=False)
        ys = rng.choice(len(LABELS), set_size, replace=False)
        rule = Rule(tuple(INPUTS[i] for i in xs), tuple(LABELS[i] for i in ys))
        if is_test_rule(rule) == (split == "test"):
            return rule


def draw_examples(rng: np.random.Generator, rule: Rule, n: int) -> list[tuple[str, str]]:
    """`n` solved examples (x, rule(x)), inputs uniform over the rule's set."""
    return [(x, rule(x)) for x in (rule.inputs[i] for i in rng.integers(0, len(rule.inputs), n))]


def format_example(x: str, y: str) -> str:
    return f"{x}={y}"


def sequences(split: str, n: int | None = None) -> list[str]:
    """The `split`'s pretraining / held-out texts: `n` (default SEQUENCES[split]) sequences of solved examples."""
    if split not in SEQUENCES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng(_SEED[split])
    n = SEQUENCES[split] if n is None else n
    out = []
    for _ in range(n):
        rule = draw_rule(rng, split)
        out.append(" ".join(format_example(x, y) for x, y in draw_examples(rng, rule, EXAMPLES_PER_SEQUENCE)))
    return out


def episodes(
    split: str, n: int, max_shots: int, seed: int = 0
) -> list[tuple[Rule, list[tuple[str, str]], tuple[str, str]]]:
    """`n` evaluation episodes (rule, `max_shots` solved examples, query (x, y)): evaluating at k shots uses the
    first k examples, so every shot count answers the same queries."""
    rng = np.random.default_rng([_SEED[split], seed, 7])
    out = []
    for _ in range(n):
        rule = draw_rule(rng, split)
        shots = draw_examples(rng, rule, max_shots)
        out.append((rule, shots, draw_examples(rng, rule, 1)[0]))
    return out
