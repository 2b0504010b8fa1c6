"""`sslscale generate`: KV-cached decoding equals recomputing the whole prefix each step; T = 0 is greedy and
deterministic; temperature / top-k / top-p probabilities equal their definitions on a fixed distribution, and
draws from the sampler match those probabilities (many draws, a tolerance); stop strings cut the continuation;
the command runs end to end on an exported model."""

from __future__ import annotations

import json

import pytest
import torch

from sslscale.adapt.generate import generate_ids, generate_text, sample_next, sampling_probs
from sslscale.data.text import EOS_ID, train_tokenizer
from sslscale.models import build_encoder, save_encoder

VOCAB = 41


def _model(vocab: int = VOCAB, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_encoder("gpt", vocab_size=vocab, max_seq_len=48, dim=64, depth=2, heads=2, **kw)
    with torch.no_grad():  # sharper, less uniform distributions than the init's
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


PROMPT = torch.tensor([[7, 8, 9, 10, 11], [12, 3, 30, 30, 2]])


@pytest.mark.parametrize("kw", [{}, {"positions": "rope", "kv_heads": 1, "norm": "rmsnorm"}], ids=["gpt2", "llama"])
@pytest.mark.parametrize(
    "sampling", [{"temperature": 0.0}, {"temperature": 0.9, "top_k": 10, "top_p": 0.9}], ids=["greedy", "sampled"]
)
def test_cached_decoding_equals_recomputing_the_prefix(kw, sampling):
    model = _model(**kw)
    runs = [
        generate_ids(
            model, PROMPT, 20, generator=torch.Generator().manual_seed(5), use_cache=cache, stop_token=None, **sampling
        )
        for cache in (True, False)
    ]
    assert runs[0].shape == (2, 25)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :5], PROMPT)


def test_greedy_is_deterministic_and_takes_the_argmax():
    model = _model()
    a = generate_ids(model, PROMPT, 12, temperature=0.0, generator=torch.Generator().manual_seed(1), stop_token=None)
    b = generate_ids(model, PROMPT, 12, temperature=0.0, generator=torch.Generator().manual_seed(2), stop_token=None)
    assert torch.equal(a, b)
    with torch.no_grad():
        for t in range(5, a.shape[1]):
            assert torch.equal(model(a[:, :t])[:, -1].argmax(-1), a[:, t])


def test_rows_stop_at_eos():
    model = _model()
    with torch.no_grad():
        model.lm_head.bias = None
        model.wte.weight[EOS_ID] += 50 * model.norm(model.hidden_states(PROMPT))[0, -1]  # row 0 wants EOS now
    out = generate_ids(model, PROMPT, 6, temperature=0.0)
    assert out[0, 5] == EOS_ID and (out[0, 5:] == EOS_ID).all()


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = [float(torch.exp(v)) for v in x]
    return torch.tensor([v / sum(e) for v in e])


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [
        (1.0, None, None),
        (0.5, None, None),
        (2.0, None, None),
        (1.0, 3, None),
        (0.7, 2, None),
        (1.0, None, 0.8),
        (1.0, None, 0.3),
        (0.5, 4, 0.9),
        (1.0, 1, None),
    ],
)
def test_sampling_probabilities_follow_their_definitions(temperature, top_k, top_p):
    p = _softmax(LOGITS / temperature)  # definition by hand: temperature, then the filters, then renormalise
    keep = torch.ones(len(p), dtype=torch.bool)
    if top_k is not None:
        keep &= torch.arange(len(p)) < top_k  # LOGITS are sorted in descending order
    q = p * keep
    q = q / q.sum()
    if top_p is not None:
        mass, kept = 0.0, []
        for i in range(len(q)):
            if mass >= top_p:
                break
            kept.append(i)
            mass += float(q[i])
        q = torch.tensor([float(q[i]) if i in kept else 0.0 for i in range(len(q))])
        q = q / q.sum()
    probs = sampling_probs(LOGITS[None], temperature, top_k, top_p)[0]
    torch.testing.assert_close(probs, q, rtol=1e-5, atol=1e-7)
    draws = 40_000
    gen = torch.Generator().manual_seed(0)
    ids = sample_next(LOGITS.expand(draws, -1), temperature, top_k, top_p, generator=gen)[:, 0]
    freq = torch.bincount(ids, minlength=len(LOGITS)).float() / draws
    tolerance = 4 * (q * (1 - q) / draws).sqrt() + 1e-9  # 4 standard errors of each frequency
    assert ((freq - q).abs() <= tolerance).all(), (freq, q)


def test_temperature_zero_is_a_one_hot_argmax_and_bad_values_are_named():
    assert sampling_probs(LOGITS[None], 0.0)[0].tolist() == [1.0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sampling_probs(LOGITS, -1.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_next(LOGITS[None], 1.0, top_p=1.5)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        sample_next(LOGITS[None], 1.0, top_k=0)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=48"):
        generate_ids(_model(), PROMPT, 44)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    tok = train_tokenizer(["to be or not to be that is the question"] * 30, tmp / "tokenizer.json", vocab_size=300)
    path = tmp / "gpt.safetensors"
    save_encoder(_model(tok.get_vocab_size()), str(path))
    return path, tok


def test_stop_strings_cut_the_continuation(exported):
    from sslscale.models import load_encoder

    path, tok = exported
    model = load_encoder(str(path))
    full = generate_text(model, tok, "to be", 30, temperature=0.0)
    assert len(full) > 4
    stop = full[2:4]
    cut = generate_text(model, tok, "to be", 30, temperature=0.0, stop=[stop, "never appears \u2603"])
    assert cut == full[: full.find(stop)]


def test_generate_command_prints_one_json_line_per_sample(exported, capsys):
    from sslscale.cli import main

    path, _ = exported
    rc = main(
        [
            "generate",
            str(path),
            "--prompt",
            "to be",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0.8",
            "--top-k",
            "5",
            "--num-samples",
            "2",
            "--seed",
            "3",
        ]
    )
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seed"] for r in lines] == [3, 4] and all(r["prompt"] == "to be" for r in lines)
    assert main(["generate", str(path), "--prompt", "x", "--top-p", "2"]) == 2
