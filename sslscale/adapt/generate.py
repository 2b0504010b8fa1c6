"""Text generation from a causal LM: `sslscale generate MODEL --prompt ... [--max-new-tokens N --temperature T
--top-k K --top-p P --seed S --stop STR]`.

Sampling (`sampling_probs` is the definition, `sample_next` draws from it): temperature T divides the logits
(T = 0: greedy argmax, deterministic); top-k keeps the k most likely tokens; top-p (nucleus) keeps the smallest set
of most likely tokens whose probability reaches p (the most likely token always stays); the kept probabilities are
renormalised. Both filters apply after the temperature, as in Hugging Face's and nanoGPT's samplers.

Decoding runs with the model's KV cache (`GPT.new_cache`): the prompt is one forward, then one token per step;
`use_cache=False` recomputes the whole prefix every step (the oracle the cache is tested against). Generation
stops after `max_new_tokens`, at [EOS] (the separator training packs between passages), or when the decoded
continuation contains a stop string (cut before it). The prompt is preceded by [EOS], as every packed passage is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslscale.data.text import EOS_ID


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sampling_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """(..., V) logits -> the (..., V) distribution the next token is drawn from (one-hot at the argmax for T=0)."""
    _check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        keep_sorted = before < top_p  # first token: before = 0, always kept
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B, 1) next token ids drawn from `sampling_probs` (argmax when temperature is 0)."""
    if temperature == 0:
        _check_sampling(temperature, top_k, top_p)
        return logits.argmax(dim=-1, keepdim=True)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop_token: int | None = EOS_ID,
) -> torch.Tensor:
    """(B, T) prompt ids -> (B, T + n) with n <= max_new_tokens new tokens; a row that drew `stop_token` keeps
    repeating it (the batch stops when every row has)."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, T >= 1) token ids, got shape {tuple(prompt.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    limit = int(getattr(model, "max_seq_len", prompt.shape[1] + max_new_tokens))
    if prompt.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's max_seq_len={limit}: shorten one of them"
        )
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens) if use_cache else None
        out, step_ids = prompt, prompt
        done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        for _ in range(max_new_tokens):
            logits = model(step_ids if use_cache else out, cache=cache)[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if stop_token is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, stop_token), nxt)
                done |= nxt[:, 0] == stop_token
            out = torch.cat([out, nxt], dim=1)
            step_ids = nxt
            if stop_token is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return out


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 200,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = 0,
    stop: list[str] | tuple[str, ...] = (),
) -> str:
    """The continuation of `prompt` (without the prompt), cut before the first stop string it contains."""
    ids = torch.tensor([[EOS_ID, *tokenizer.encode(prompt).ids]], device=next(model.parameters()).device)
    generator = None if seed is None else torch.Generator(device=ids.device).manual_seed(seed)
    out = generate_ids(
        model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
    )
    new = [t for t in out[0, ids.shape[1] :].tolist() if t != EOS_ID]
    text = tokenizer.decode(new)
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def find_tokenizer(model_path: str | Path, explicit: str | None = None) -> str:
    """`explicit`, else the tokenizer of the run the model was exported from, else tokenizer.json beside it."""
    if explicit:
        return explicit
    from sslscale.models import read_metadata
    from sslscale.train.export import run_tokenizer

    run_dir = read_metadata(str(model_path)).get("run_dir")
    if run_dir and (Path(run_dir) / "config.yaml").is_file():
        found = run_tokenizer(run_dir)
        if found and Path(found).is_file():
            return found
    beside = Path(model_path).with_name("tokenizer.json")
    if beside.is_file():
        return str(beside)
    raise FileNotFoundError(f"no tokenizer found for {model_path}: pass --tokenizer PATH/tokenizer.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an exported causal LM (.safetensors from `sslscale export`)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (deterministic)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop when the continuation contains STR (repeatable; cut before it)",
    )
    parser.add_argument("--num-samples", type=int, default=1, help="samples (seeds seed, seed + 1, ...)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the exported run's)")


def run(args: argparse.Namespace) -> int:
    from sslscale.data.text import load_tokenizer
    from sslscale.models import load_encoder

    try:
        model = load_encoder(args.model)
        if not hasattr(model, "new_cache"):
            raise ValueError(f"{args.model} holds a {type(model).__name__}, not a causal LM with a KV cache")
        tokenizer = load_tokenizer(find_tokenizer(args.model, args.tokenizer))
        for i in range(args.num_samples):
            text = generate_text(
                model,
                tokenizer,
                args.prompt,
                args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed + i,
                stop=args.stop,
            )
            print(json.dumps({"prompt": args.prompt, "seed": args.seed + i, "text": text}))
    except (FileNotFoundError, ValueError) as err:
        print(f"sslscale generate: {err}", file=sys.stderr)
        return 2
    return 0
