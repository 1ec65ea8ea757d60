"""The offline metric: Frechet distance maths, the frozen feature nets, point distances."""

import numpy as np
import pytest
import torch
from scipy import linalg

from bench import data
from bench.metrics import points
from bench.metrics.feature_net import accuracy, load_feature_net, train_feature_net, weights_hash
from bench.metrics.frechet import Stats, frechet_distance


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = Stats.of(rng.normal(size=(500, 8)))
    b = Stats.of(rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 1.0)
    covmean = linalg.sqrtm(a.sigma @ b.sigma).real
    expected = ((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma + b.sigma - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("name", ["digits16", "shapes16"])
def test_shipped_feature_nets_classify_the_held_out_split(name):
    ds = getattr(data, name)(**({"n_train": 10, "n_test": 2000} if name == "shapes16" else {}))
    net, extractor = load_feature_net(name, ds.shape[0])
    assert extractor == f"classifier-{name}"
    assert accuracy(net, ds.test_x, ds.test_y) >= 0.9
    assert len(weights_hash(net)) == 16


@pytest.mark.slow
def test_retraining_the_digits_feature_net_is_deterministic_and_accurate():
    ds = data.digits16()
    a = train_feature_net(ds.train_x, ds.train_y, 10, epochs=40)
    assert accuracy(a, ds.test_x, ds.test_y) >= 0.9
    b = train_feature_net(ds.train_x, ds.train_y, 10, epochs=2)
    c = train_feature_net(ds.train_x, ds.train_y, 10, epochs=2)
    assert weights_hash(b) == weights_hash(c)


def test_unknown_datasets_get_a_named_random_cnn():
    net, extractor = load_feature_net("my_folder", 3)
    again, _ = load_feature_net("my_folder", 3)
    assert extractor == "random-cnn" and weights_hash(net) == weights_hash(again)


def test_point_distances_separate_shifted_samples():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g)
    shifted = y + torch.tensor([0.5, 0.0])
    assert abs(points.rbf_mmd2(x, y)) < 0.01 and points.rbf_mmd2(shifted, y) > 0.03
    assert points.energy_distance(x, y) < 0.02 < points.energy_distance(shifted, y)
    assert points.sliced_w2(shifted, y) > points.sliced_w2(x, y)
