"""kNN against a brute-force loop; layer choice against a hand-written truncated forward."""

import math

import torch

from sslscale.adapt.knn import knn_predict
from sslscale.adapt.layers import depth_of_parameters, extract, resolve_layer
from sslscale.models import build_encoder


def _brute_force(train_x, train_y, test_x, num_classes, k, t):
    preds = []
    for q in test_x:
        sims = [float(q @ x) / (float(q.norm()) * float(x.norm())) for x in train_x]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_y[i])] += math.exp(sims[i] / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def test_knn_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(60, 5, generator=gen), torch.randn(25, 5, generator=gen)
    train_y = torch.randint(0, 4, (60,), generator=gen)
    for k, t in ((1, 0.1), (7, 0.07), (20, 1.0), (100, 0.5)):  # k > N is clipped
        got = knn_predict(train_x, train_y, test_x, 4, k=k, temperature=t, batch_size=8)
        assert torch.equal(got, _brute_force(train_x, train_y, test_x, 4, min(k, 60), t)), (k, t)


def test_layer_choice_reads_the_named_block():
    enc = build_encoder("convnet_small", in_channels=1, widths=[4, 6, 8], strides=[2, 1, 2]).eval()
    x = torch.randn(5, 1, 10, 10)
    assert resolve_layer(enc, "penultimate") == "features.1"
    torch.testing.assert_close(extract(enc, x, "penultimate"), enc.features[:2](x).mean(dim=(2, 3)))
    torch.testing.assert_close(extract(enc, x, "features.0"), enc.features[0](x).mean(dim=(2, 3)))
    torch.testing.assert_close(extract(enc, x, "last"), enc(x))
    try:
        resolve_layer(enc, "features.9")
    except ValueError as err:
        assert "features.0 .. features.2" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def test_layer_depths_for_layer_decay():
    enc = build_encoder("vit", size="cpu_tiny", image_size=8, patch_size=4, in_channels=1)
    depth, n = depth_of_parameters(enc)
    assert depth["embed.proj.weight"] == 0 and depth["norm.weight"] == n - 1
    assert depth[next(k for k in depth if k.startswith("blocks.0."))] == 1
