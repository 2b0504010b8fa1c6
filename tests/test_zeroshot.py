"""Zero-shot CLIP classification (`sslscale.adapt.zeroshot`): classifier rows are the normalised mean of the
normalised template embeddings (against a plain per-prompt computation with hand-built token ids), logits and
predictions against their definitions, argument errors, and the export round trip with its tokenizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslscale.adapt import zeroshot
from sslscale.data import text as textlib
from sslscale.models import CLIP, save_encoder

NAMES = ["coat", "sneaker", "ankle boot"]
TEMPLATES = ["a photo of a {}.", "{}, product shot.", "catalogue item: {}."]
SEQ = 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [t.format(n) for n in NAMES + ["bag", "dress"] for t in TEMPLATES] * 5
    return textlib.train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return CLIP(
        image_encoder={
            "name": "vit",
            "size": "cpu_tiny",
            "image_size": 28,
            "patch_size": 7,
            "in_channels": 1,
            "dim": 32,
            "depth": 1,
            "heads": 2,
        },
        text_encoder={
            "name": "text_transformer",
            "vocab_size": tokenizer.get_vocab_size(),
            "max_seq_len": SEQ,
            "dim": 32,
            "depth": 1,
            "heads": 1,
        },
        embed_dim=16,
    ).eval()


def _plain_prompt_embedding(model: CLIP, tokenizer, prompt: str) -> torch.Tensor:
    """One prompt on its own, ids built by hand: [CLS] tokens [EOS], no padding at all."""
    ids = torch.tensor([[textlib.CLS_ID, *tokenizer.encode(prompt).ids, textlib.EOS_ID]])
    with torch.no_grad():
        return F.normalize(model.encode_text(ids), dim=1)[0]


def test_classifier_rows_are_the_normalised_mean_of_normalised_template_embeddings(model, tokenizer):
    got = zeroshot.zero_shot_classifier(model, tokenizer, NAMES, TEMPLATES)
    assert got.shape == (len(NAMES), 16)
    for c, name in enumerate(NAMES):
        per_template = torch.stack([_plain_prompt_embedding(model, tokenizer, t.format(name)) for t in TEMPLATES])
        expected = per_template.mean(0)
        expected = expected / expected.norm()
        torch.testing.assert_close(got[c], expected, rtol=1e-5, atol=1e-6)
        # the templates really differ (the average is not of identical rows)
        assert float((per_template[0] - per_template[1]).norm()) > 1e-3
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(NAMES)))


def test_one_template_gives_that_prompts_embedding_and_a_path_loads_the_tokenizer(model, tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    got = zeroshot.zero_shot_classifier(model, str(path), NAMES, TEMPLATES[:1])
    for c, name in enumerate(NAMES):
        torch.testing.assert_close(
            got[c], _plain_prompt_embedding(model, tokenizer, TEMPLATES[0].format(name)), rtol=1e-5, atol=1e-6
        )


def test_logits_predictions_and_accuracy_follow_their_definitions(model):
    images = torch.rand(7, 1, 28, 28)
    with torch.no_grad():
        protos = F.normalize(model.encode_image(images[:3]), dim=1)  # class c = the embedding of image c
        scale = float(model.logit_scale())
        expected = scale * F.normalize(model.encode_image(images), dim=1) @ protos.T
    logits = zeroshot.zero_shot_logits(model, protos, images, batch_size=3)  # batches of 3: 3 + 3 + 1
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    pred = zeroshot.zero_shot_predict(model, protos, images)
    assert pred[:3].tolist() == [0, 1, 2]  # each prototype image is closest to its own class
    torch.testing.assert_close(pred, expected.argmax(1))
    labels = expected.argmax(1).clone()
    labels[3:5] = (labels[3:5] + 1) % 3  # two of seven wrong
    assert zeroshot.zero_shot_accuracy(model, protos, images, labels) == pytest.approx(5 / 7)


def test_the_models_mode_is_restored(model, tokenizer):
    model.train()
    try:
        zeroshot.zero_shot_classifier(model, tokenizer, NAMES, TEMPLATES)
        zeroshot.zero_shot_logits(model, torch.randn(3, 16), torch.rand(2, 1, 28, 28))
        assert model.training
    finally:
        model.eval()


def test_bad_arguments_are_clear_errors(model, tokenizer):
    with pytest.raises(ValueError, match=r"exactly one '\{\}'.*'a photo'"):
        zeroshot.zero_shot_classifier(model, tokenizer, NAMES, ["a photo"])
    with pytest.raises(ValueError, match="class_names is empty"):
        zeroshot.zero_shot_classifier(model, tokenizer, [], TEMPLATES)
    with pytest.raises(ValueError, match="templates is empty"):
        zeroshot.zero_shot_classifier(model, tokenizer, NAMES, [])
    with pytest.raises(TypeError, match="CLIP-like model with encode_image"):
        zeroshot.zero_shot_logits(model.visual, torch.randn(3, 16), torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        zeroshot.zero_shot_accuracy(model, torch.randn(3, 16), torch.rand(3, 1, 28, 28), torch.zeros(2))


def test_caption_ids_layout():
    class Tok:  # ids 10, 11, ... per word
        def encode_batch(self, texts):
            return [type("E", (), {"ids": [10 + i for i, _ in enumerate(t.split())]})() for t in texts]

    ids, mask = textlib.caption_ids(Tok(), ["a b c", "a b c d e f g"], 6)
    assert ids.tolist() == [[1, 10, 11, 12, 4, 0], [1, 10, 11, 12, 13, 4]]  # cut to seq_len - 2, [EOS] kept
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    with pytest.raises(ValueError, match="seq_len must be >= 3"):
        textlib.caption_ids(Tok(), ["a"], 2)


def test_load_clip_reads_the_export_and_its_tokenizer(model, tokenizer, tmp_path):
    path = tmp_path / "clip.safetensors"
    tokenizer.save(str(tmp_path / "clip.tokenizer.json"))
    save_encoder(model, str(path), extra={"tokenizer": "clip.tokenizer.json"})
    loaded, tok = zeroshot.load_clip(path)
    assert tok.get_vocab_size() == tokenizer.get_vocab_size()
    a = zeroshot.zero_shot_classifier(model, tokenizer, NAMES, TEMPLATES)
    b = zeroshot.zero_shot_classifier(loaded, tok, NAMES, TEMPLATES)
    torch.testing.assert_close(a, b)
    save_encoder(model, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="names no tokenizer"):
        zeroshot.load_clip(tmp_path / "bare.safetensors")


@pytest.mark.slow  # ~20 s under contention: three probe rows with cross-validation
def test_sslscale_evaluate_probes_a_clip_exports_image_tower(model, tmp_path, capsys):
    import json

    from sslscale.cli import main
    from tests.test_probe import _fake_fashion

    (tmp_path / "data").mkdir()
    data = _fake_fashion(tmp_path / "data")
    path = str(tmp_path / "clip.safetensors")
    save_encoder(model, path)
    out = tmp_path / "res.json"
    rc = main(
        ["evaluate", path, "--data-dir", str(data), "--labels-per-class", "2", "--seeds", "1", "--json", str(out)]
    )
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    # the image tower's 32 features (not the 16-wide projection, not a CLIP forward that needs text)
    assert rows["pretrained"]["feature_dim"] == rows["random_init"]["feature_dim"] == model.visual.out_dim == 32
