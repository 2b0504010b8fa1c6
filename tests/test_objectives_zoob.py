"""Autoencoders (plain, denoising, masked; MAE on the ViT), supervised, rotation and jigsaw: each loss and its
gradients against a plain re-implementation on a tiny random batch; the masked loss counts hidden patches only;
the MAE encoder sees visible patches only; the jigsaw permutation set and pipeline."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sslscale.models import build_encoder
from sslscale.objectives import build_objective
from sslscale.objectives.jigsaw import cut_tiles, permutation_set


def _convnet():
    return build_encoder("convnet_small", widths=[8, 16], strides=[2, 2])


def _vit(pool="mean"):
    return build_encoder("vit", size="cpu_tiny", image_size=28, patch_size=7, in_channels=1, pool=pool)


def _grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def _assert_same_loss_and_grads(obj, loss, expected):
    params = [p for p in obj.parameters() if p.requires_grad]
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    got, want = _grads(loss, params), _grads(expected, params)
    assert sum(g is not None for g in got) > 0
    for (name, _), g, w in zip([(n, p) for n, p in obj.named_parameters() if p.requires_grad], got, want):
        if w is None:
            assert g is None or not g.abs().any(), name
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)


def _plain_cross_entropy(logits, y):
    logp = logits - logits.exp().sum(1, keepdim=True).log()
    return -logp[torch.arange(len(y)), y].mean()


# ------------------------------------------------------------------------------------ supervised, rotation
def test_supervised_loss_and_gradients_equal_a_plain_linear_classifier():
    torch.manual_seed(0)
    obj = build_objective("supervised", _convnet(), num_classes=10)
    batch = {"image": torch.randn(6, 1, 28, 28), "label": torch.tensor([0, 3, 9, 3, 1, 7])}
    loss, metrics = obj(batch)
    feats = obj.encoder(batch["image"])  # same BN batch statistics as the objective's forward
    logits = feats @ obj.classifier.weight.T + obj.classifier.bias
    _assert_same_loss_and_grads(obj, loss, _plain_cross_entropy(logits, batch["label"]))
    acc = (logits.argmax(1) == batch["label"]).float().mean()
    assert float(metrics["acc"]) == pytest.approx(float(acc))
    assert obj.export_modules == ("encoder",)


def test_rotation_predicts_the_pipeline_rotation_not_the_label():
    torch.manual_seed(0)
    obj = build_objective("rotation", _convnet())
    x = torch.randn(5, 1, 28, 28)
    batch = {"image": x, "rotation": torch.tensor([0, 1, 2, 3, 1]), "label": torch.tensor([9, 9, 9, 9, 9])}
    loss, metrics = obj(batch)
    logits = obj.classifier(obj.encoder(x))
    assert logits.shape == (5, 4)
    _assert_same_loss_and_grads(obj, loss, _plain_cross_entropy(logits, batch["rotation"]))
    assert "rotation_acc" in metrics


def test_classification_rejects_unlabelled_and_out_of_range_targets():
    obj = build_objective("supervised", _convnet(), num_classes=10)
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"label -1 is outside \[0, 10\).*without a label"):
        obj({"image": x, "label": torch.tensor([1, -1])})
    with pytest.raises(ValueError, match=r"label 10 is outside \[0, 10\)"):
        obj({"image": x, "label": torch.tensor([10, 1])})
    with pytest.raises(KeyError, match="rotation"):
        build_objective("rotation", _convnet())({"image": x, "label": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
        build_objective("supervised", _convnet(), num_classes=1)


# ------------------------------------------------------------------------------------------- autoencoder
def test_denoising_autoencoder_is_the_mse_of_the_clean_image_from_the_noisy_one():
    obj = build_objective("autoencoder", _convnet(), variant="denoising", noise_std=0.3)
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(1)
    loss, metrics = obj({"image": x})
    torch.manual_seed(1)
    recon = obj.decoder(obj.encoder(x + 0.3 * torch.randn_like(x)))
    assert recon.shape == x.shape
    _assert_same_loss_and_grads(obj, loss, ((recon - x) ** 2).mean())
    assert float(metrics["recon_mse"]) == pytest.approx(float(loss.detach()))


def test_plain_autoencoder_reconstructs_its_own_input():
    torch.manual_seed(0)
    obj = build_objective("autoencoder", _convnet(), variant="plain")
    x = torch.randn(3, 1, 28, 28)
    loss, _ = obj({"image": x})
    _assert_same_loss_and_grads(obj, loss, ((obj.decoder(obj.encoder(x)) - x) ** 2).mean())


def _fixed_mask(obj, hidden_rows):
    """Patch obj.draw_hidden to return the given (B, N) hidden mask (with MAE's visible / restore indices)."""
    hidden = torch.tensor(hidden_rows, dtype=torch.bool)
    visible = torch.stack([torch.nonzero(~h).squeeze(1) for h in hidden])
    order = torch.stack([torch.cat([torch.nonzero(~h).squeeze(1), torch.nonzero(h).squeeze(1)]) for h in hidden])
    obj.draw_hidden = lambda b, device: (visible, hidden, order.argsort(1))
    return hidden


def _random_hidden(b, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        row = [True] * n
        for i in torch.randperm(n, generator=gen)[:k].tolist():
            row[i] = False
        rows.append(row)
    return rows


def test_masked_conv_autoencoder_counts_hidden_pixels_only():
    torch.manual_seed(0)
    obj = build_objective("autoencoder", _convnet(), variant="masked", patch_size=7, mask_ratio=0.75)
    hidden = _fixed_mask(obj, _random_hidden(3, 16, 4, seed=0))
    x = torch.randn(3, 1, 28, 28)
    loss, metrics = obj({"image": x})
    # plain: pixel mask by loops, hidden pixels zeroed in the input, squared error summed over hidden pixels
    pix = torch.zeros(3, 1, 28, 28)
    for b in range(3):
        for n in range(16):
            if hidden[b, n]:
                r, c = divmod(n, 4)
                pix[b, :, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7] = 1
    recon = obj.decoder(obj.encoder(x * (1 - pix)))
    expected = (((recon - x) ** 2) * pix).sum() / pix.sum()
    _assert_same_loss_and_grads(obj, loss, expected)
    assert float(metrics["hidden_frac"]) == pytest.approx(12 / 16)


@pytest.mark.parametrize("encoder", ["convnet", "vit"])
def test_masked_loss_ignores_what_is_predicted_for_visible_patches(encoder):
    torch.manual_seed(0)
    enc = _convnet() if encoder == "convnet" else _vit()
    obj = build_objective("autoencoder", enc, variant="masked", patch_size=7, mask_ratio=0.75)
    hidden = _fixed_mask(obj, _random_hidden(2, 16, 4, seed=1))
    x = torch.randn(2, 1, 28, 28)
    obj.eval()  # BatchNorm / dropout deterministic across the three forwards
    base, _ = obj({"image": x})

    def perturb(where):
        def hook(module, args, out):
            out = out.clone()
            if encoder == "vit":  # (B, N, patch_dim) predictions
                out[where] += 5.0
            else:  # (B, 1, 28, 28) image: perturb the pixels of the chosen patches
                for b, n in zip(*torch.nonzero(where, as_tuple=True)):
                    r, c = divmod(int(n), 4)
                    out[b, :, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7] += 5.0
            return out

        return obj.decoder.register_forward_hook(hook)

    handle = perturb(~hidden)
    visible_changed, _ = obj({"image": x})
    handle.remove()
    handle = perturb(hidden & (torch.arange(16) == int(torch.nonzero(hidden[0])[0])))
    hidden_changed, _ = obj({"image": x})
    handle.remove()
    torch.testing.assert_close(visible_changed, base)
    assert float(hidden_changed.detach()) > float(base.detach()) + 1e-3


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_mae_encoder_sees_only_the_visible_patches(pool):
    torch.manual_seed(0)
    obj = build_objective("autoencoder", _vit(pool), variant="masked", patch_size=7, mask_ratio=0.75)
    seen = []
    obj.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    tokens = []
    obj.encoder.register_forward_hook(lambda m, a, out: tokens.append(out))
    captured = []
    orig = obj.encoder.forward_features
    obj.encoder.forward_features = lambda x, visible=None: captured.append(orig(x, visible)) or captured[-1]
    hidden = _fixed_mask(obj, _random_hidden(2, 16, 4, seed=2))
    x = torch.randn(2, 1, 28, 28)
    obj.eval()
    obj({"image": x})
    prefix = 1 if pool == "cls" else 0
    assert seen == [torch.Size([2, prefix + 4, 64])]  # 4 visible of 16 patches (75 % hidden)
    # pixels of hidden patches do not reach the encoder at all
    x2 = x.clone()
    for b, n in zip(*torch.nonzero(hidden, as_tuple=True)):
        r, c = divmod(int(n), 4)
        x2[b, :, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7] = torch.randn(1, 7, 7) * 3
    obj({"image": x2})
    torch.testing.assert_close(captured[0], captured[1])


def test_mae_loss_and_gradients_equal_a_plain_reimplementation():
    torch.manual_seed(0)
    obj = build_objective(
        "autoencoder",
        _vit("cls"),
        variant="masked",
        patch_size=7,
        mask_ratio=0.75,
        norm_pix_loss=True,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
    )
    hidden = _fixed_mask(obj, _random_hidden(2, 16, 4, seed=3))
    x = torch.randn(2, 1, 28, 28)
    loss, _ = obj({"image": x})
    enc, dec = obj.encoder, obj.decoder
    visible = [torch.nonzero(~h).squeeze(1).tolist() for h in hidden]
    tokens = enc.forward_features(x, torch.tensor(visible))
    emb = dec.embed(tokens)
    rows = []
    for b in range(2):  # rebuild the decoder input token by token: class token, then the grid with mask tokens
        seq = [emb[b, 0]]
        for n in range(16):
            t = emb[b, 1 + visible[b].index(n)] if n in visible[b] else dec.mask_token[0, 0]
            seq.append(t + dec.pos_embed[0, n])
        rows.append(torch.stack(seq))
    h = torch.stack(rows)
    for block in dec.blocks:
        h = block(h)
    pred = dec.head(dec.norm(h))[:, 1:]
    total, count = 0.0, 0
    for b in range(2):
        for n in range(16):
            if hidden[b, n]:
                r, c = divmod(n, 4)
                t = x[b, 0, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7].reshape(-1)  # row-major pixels (1 channel)
                t = (t - t.mean()) / torch.sqrt(t.var() + 1e-6)
                total = total + ((pred[b, n] - t) ** 2).mean()
                count += 1
    _assert_same_loss_and_grads(obj, loss, total / count)


def test_vit_plain_autoencoder_decodes_every_token_and_reads_every_patch():
    torch.manual_seed(0)
    obj = build_objective("autoencoder", _vit(), variant="denoising", patch_size=7, noise_std=0.2)
    torch.manual_seed(3)
    loss, metrics = obj({"image": torch.randn(2, 1, 28, 28)})
    assert torch.isfinite(loss) and float(metrics["hidden_frac"]) == 0.0


def test_autoencoder_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"variant='masekd'.*did you mean 'masked'"):
        build_objective("autoencoder", _convnet(), variant="masekd")
    with pytest.raises(ValueError, match="decoder='transformer' needs a ViT encoder"):
        build_objective("autoencoder", _convnet(), decoder="transformer")
    with pytest.raises(ValueError, match="patch_size=4 / image_size=28 must match the ViT's patch_size=7"):
        build_objective("autoencoder", _vit(), variant="masked", patch_size=4)
    with pytest.raises(ValueError, match="image_size=28 must be divisible by patch_size=5"):
        build_objective("autoencoder", _convnet(), patch_size=5)
    with pytest.raises(ValueError, match="noise_std must be > 0"):
        build_objective("autoencoder", _convnet(), variant="denoising", noise_std=0.0)
    obj = build_objective("autoencoder", _convnet())
    with pytest.raises(ValueError, match=r"built for \(1, 28, 28\) images, got \(1, 32, 32\)"):
        obj({"image": torch.randn(2, 1, 32, 32)})


# ------------------------------------------------------------------------------------------------ jigsaw
def _hamming(a, b):
    return sum(int(x != y) for x, y in zip(a, b))


@pytest.mark.parametrize("n,count", [(4, 6), (4, 24), (9, 12)])
def test_permutation_set_is_greedy_max_min_hamming(n, count):
    perms, dmin = permutation_set(n, count, seed=5)
    rows = [tuple(p) for p in perms.tolist()]
    assert len(rows) == count and len(set(rows)) == count
    assert all(sorted(r) == list(range(n)) for r in rows)
    assert dmin == min(_hamming(a, b) for a, b in itertools.combinations(rows, 2))
    # greedy: each permutation added was at the largest min-distance to the earlier ones of all candidates
    every = np.array(list(itertools.permutations(range(n))))
    for i in range(1, count):
        chosen = np.array(rows[:i])
        to_set = (every[:, None, :] != chosen[None]).sum(-1).min(1)
        assert min(_hamming(rows[i], c) for c in rows[:i]) == to_set.max(), i
    again, _ = permutation_set(n, count, seed=5)
    assert torch.equal(perms, again)  # deterministic given the seed
    if count < math.factorial(n):
        assert not torch.equal(perms, permutation_set(n, count, seed=6)[0])


def test_permutation_set_rejects_impossible_sizes():
    with pytest.raises(ValueError, match=r"num_permutations must be in \[2, 24\] for 4 tiles, got 25"):
        permutation_set(4, 25)
    with pytest.raises(ValueError, match="grid must be >= 2"):
        build_objective("jigsaw", _convnet(), grid=1)


def test_jigsaw_loss_and_gradients_equal_a_plain_reimplementation():
    torch.manual_seed(0)
    obj = build_objective("jigsaw", _convnet(), grid=3, num_permutations=10, tile_gap=2, hidden_dim=32)
    x = torch.randn(4, 1, 28, 28)
    draw = torch.tensor([3, 2**61 + 7, 19, 4])
    loss, metrics = obj({"image": x, "jigsaw_draw": draw})
    perms, _ = permutation_set(9, 10, seed=0)
    k = [int(d) % 10 for d in draw]
    tiles = []
    for b in range(4):  # position j of image b shows tile perms[k_b][j]; cells of 9 px from pixel 0, tiles of 7
        for j in range(9):
            r, c = divmod(int(perms[k[b], j]), 3)
            tiles.append(x[b, :, 9 * r + 1 : 9 * r + 8, 9 * c + 1 : 9 * c + 8])
    feats = obj.encoder(torch.stack(tiles)).reshape(4, -1)
    logits = obj.classifier(feats)
    _assert_same_loss_and_grads(obj, loss, _plain_cross_entropy(logits, torch.tensor(k)))
    assert float(metrics["perm_acc"]) == pytest.approx(float((logits.argmax(1) == torch.tensor(k)).float().mean()))


def test_cut_tiles_takes_cell_centres_in_row_major_order():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    t = cut_tiles(x, grid=2, gap=1)
    assert t.shape == (2, 4, 1, 2, 2)
    torch.testing.assert_close(t[1, 3, 0], x[1, 0, 3:5, 3:5])
    torch.testing.assert_close(t[0, 1, 0], x[0, 0, 0:2, 3:5])


def test_jigsaw_pipeline_draws_from_the_batch_generator_and_resumes_exactly(tmp_path_factory):
    from sslscale.data import StreamSpec, build_stream

    from .data_helpers import shards

    data = shards(tmp_path_factory, "fashion-mnist", "test", per_shard=32, limit=128)
    spec = StreamSpec(shards=str(data), pipeline="jigsaw", batch_size=8, num_workers=0, seed=3)
    stream = build_stream(spec)
    it = iter(stream)
    first = next(it)
    state = stream.state_dict()
    second = next(it)
    assert first["jigsaw_draw"].dtype == torch.int64 and first["jigsaw_draw"].shape == (8,)
    assert not torch.equal(first["jigsaw_draw"], second["jigsaw_draw"])
    resumed = build_stream(spec)
    resumed.load_state_dict(state)
    again = next(iter(resumed))
    assert torch.equal(again["jigsaw_draw"], second["jigsaw_draw"])
    torch.testing.assert_close(again["image"], second["image"])
    other = next(
        iter(build_stream(StreamSpec(shards=str(data), pipeline="jigsaw", batch_size=8, num_workers=0, seed=4)))
    )
    assert not torch.equal(other["jigsaw_draw"], first["jigsaw_draw"])


def test_mae_position_embeddings_and_mask_token_get_no_weight_decay():
    obj = build_objective("autoencoder", _vit("cls"), variant="masked", patch_size=7)
    groups = {g.name: g for g in obj.param_groups()}
    names = {id(p): n for n, p in obj.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"].params}
    assert {"decoder.pos_embed", "decoder.mask_token", "encoder.embed.pos_embed", "encoder.embed.cls_token"} <= no_decay
    assert "decoder.head.weight" in {names[id(p)] for p in groups["decay"].params}
