"""The offline metric: Frechet distance maths, the frozen feature nets, point distances."""

import numpy as np
import pytest
import torch
from scipy import linalg

from bench import data
from bench.metrics import bootstrap, points
from bench.metrics.feature_net import (
    accuracy,
    extract,
    load_feature_net,
    train_feature_net,
    weights_hash,
)
from bench.metrics.frechet import Stats, frechet_distance
from bench.metrics.suites import sig


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


def test_unknown_datasets_get_a_named_random_cnn_z_scored_on_the_training_split():
    train_x = torch.rand(200, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    net, extractor = load_feature_net("my_folder", 3, train_x=train_x)
    again, _ = load_feature_net("my_folder", 3, train_x=train_x)
    assert extractor == "random-cnn" and weights_hash(net) == weights_hash(again)
    f = torch.as_tensor(extract(net, train_x), dtype=torch.float64)
    assert net.kept > 0 and f.shape == (200, net.kept)
    torch.testing.assert_close(
        f.mean(0), torch.zeros(net.kept, dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        f.std(0), torch.ones(net.kept, dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_point_distances_separate_shifted_samples():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g)
    shifted = y + torch.tensor([0.5, 0.0])
    assert abs(points.rbf_mmd2(x, y)) < 0.01 and points.rbf_mmd2(shifted, y) > 0.03
    assert points.energy_distance(x, y) < 0.02 < points.energy_distance(shifted, y)
    assert points.sliced_w2(shifted, y) > points.sliced_w2(x, y)


def gaussian_pair(d: int, seed: int):
    """A generated Gaussian N(mu_g, S_g) and exact reference statistics, and their FD."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(d, d)) / np.sqrt(d), rng.normal(size=(d, d)) / np.sqrt(d)
    mu_g, s_g = 0.3 * rng.normal(size=d), a @ a.T + 0.2 * np.eye(d)
    reference = Stats(np.zeros(d), b @ b.T + 0.2 * np.eye(d), n=10**9)
    return (
        mu_g,
        np.linalg.cholesky(s_g),
        reference,
        frechet_distance(Stats(mu_g, s_g, 0), reference),
    )


def test_each_bootstrap_resample_is_the_fd_of_the_resampled_features():
    """The vectorised resampling equals FD of explicitly repeated rows, resample by resample."""
    mu, chol, reference, _ = gaussian_pair(6, 0)
    x = np.random.default_rng(1).normal(size=(50, 6)) @ chol.T + mu
    boot = bootstrap.resampled_fd(x, reference, resamples=5, seed=3)
    counts = np.random.default_rng(3).multinomial(50, np.full(50, 1 / 50), size=5)
    for b in range(5):
        explicit = frechet_distance(Stats.of(np.repeat(x, counts[b], axis=0)), reference)
        assert boot[b] == pytest.approx(explicit, rel=1e-9)


def test_the_bootstrap_interval_covers_the_population_fd_at_the_stated_rate():
    """200 draws of 300 samples from a 16-d Gaussian whose FD to the reference is known: the
    basic interval covers the population FD about 95 % of the time (binomial sd 1.5 %). The plain
    percentile interval, one FD bias too high, does not: why the basic interval is reported."""
    mu, chol, reference, true = gaussian_pair(16, 0)
    rng = np.random.default_rng(0)
    basic = percentile = 0
    for trial in range(200):
        x = rng.normal(size=(300, 16)) @ chol.T + mu
        value = frechet_distance(Stats.of(x), reference)
        ci = bootstrap.frechet_interval(value, x, reference, resamples=200, seed=trial)
        pct = bootstrap.percentile_interval(x, reference, resamples=200, seed=trial)
        basic += ci.low <= true <= ci.high
        percentile += pct.low <= true <= pct.high
    assert 0.90 <= basic / 200 <= 0.99, basic
    assert percentile / 200 < 0.8, percentile


def test_significant_digits_never_hide_a_small_number():
    assert sig(1.234e-6) == "1.23e-06" and sig(0.000412) == "0.000412"
    assert sig(77.644) == "77.64" and sig(-0.0204) == "-0.0204" and sig(0.71) == "0.710"
