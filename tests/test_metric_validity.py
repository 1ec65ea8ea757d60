"""Does the metric measure quality? The six checks of docs/evaluation.md, plus the clean-fid path.

Each check runs on digits16 (the shipped classifier's features) and on a labelled folder of
rendered shapes that the tests write as PNG files and read back with ``data=image_folder`` (the
default features of a user's folder: a random CNN z-scored on the training split):

1. real vs real sits at the floor, the floor is not vanishingly small, and KID is within 2 sigma
   of 0;
2. blur and noise ladders give strictly increasing FD;
3. the mean image and pure noise score >= 10x the floor;
4. dropping classes cuts recall and coverage (by >= 0.3 on digits16 keeping 5 of 10 classes;
   by >= 0.3 and >= 0.2 on the folder keeping 1 of 3), precision moves < 0.05;
5. the oracle sampler (Euler on the exact flow-matching velocity of the empirical training set,
   the best any flow-matching model can do) improves strictly with steps and its one-step output
   is exactly the data mean; it memorises (copy rate) where held-out data does not;
6. the same call twice gives identical values.
"""

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import gaussian_blur

from bench import data
from bench.errors import UserError
from bench.metrics import clean_fid, points
from bench.metrics.suites import ImageSuite
from methods.flow_matching import FlowMatching

SHAPES = ("disk", "square", "triangle")


@pytest.fixture(scope="module")
def digits():
    return data.digits16()


def shapes_folder(root):
    """3,000 rendered 16x16 shapes as PNG files in one folder per shape (a user's dataset)."""
    x, y = data.render_shapes(3000, seed=5)
    pixels = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    for i, (img, label) in enumerate(zip(pixels, y.tolist(), strict=True)):
        folder = root / SHAPES[label]
        folder.mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    ds = data.image_folder(str(root), resolution=16, channels=3)
    # A folder is read as memory-mapped rows; the ladders below do tensor arithmetic on its images.
    return replace(ds, train_x=ds.train_x[:], test_x=ds.test_x[:])


@dataclass
class Case:
    """A dataset, its suite at ``n`` samples, and how a mode-dropping sampler looks on it."""

    data: data.Dataset
    ev: ImageSuite
    n: int
    kept_classes: int
    coverage_drop: float


@pytest.fixture(scope="module", params=["digits16", "shapes_folder"])
def case(request, tmp_path_factory):
    if request.param == "digits16":
        digits = request.getfixturevalue("digits")
        return Case(digits, ImageSuite(digits, 450, torch.device("cpu")), 450, 5, 0.3)
    folder = shapes_folder(tmp_path_factory.mktemp("shapes"))
    return Case(folder, ImageSuite(folder, 300, torch.device("cpu")), 300, 1, 0.2)


@pytest.fixture(scope="module")
def ev(digits):
    return ImageSuite(digits, 450, torch.device("cpu"))


def fd(ev, x):
    return ev.metrics(x, "k")["fd/train/k"]


def test_real_vs_real_is_at_the_floor_and_kid_is_zero(case):
    """Real training images (a stride over the whole split) score like the held-out floor: their
    interval for the population FD reaches down to the floor's. A single draw's FD moves a lot at
    these counts (450 random digits16 training images: 0.6 to 1.8 over five draws, floor 0.71),
    so the plain values are compared with a margin only."""
    d, ev = case.data, case.ev
    floor = ev.floor["fd/train/floor"]
    assert floor > 0.01  # a floor on the scale of the numbers, not 1e-6 printed as 0.00
    real = ev.metrics(d.train_x[:: len(d.train_x) // case.n][: case.n], "k")
    assert real["fd/train/ci95_low/k"] <= ev.floor["fd/train/ci95_high/floor"]
    assert real["fd/train/k"] < 3 * floor
    m = ev.metrics(d.test_x, "k")
    assert abs(m["kid/k"]) < 2 * m["kid_std/k"] + 1e-4
    assert float(ev.table_row(m, "k").split()[0]) > 0.01  # printed, the floor is not 0.00


def test_blur_and_noise_ladders_increase_strictly(case):
    x, ev = case.data.test_x, case.ev
    blur = [fd(ev, gaussian_blur(x, [9, 9], [s, s])) for s in (0.5, 1.0, 1.5, 2.0)]
    noise_gen = torch.Generator().manual_seed(0)
    noise = [
        fd(ev, (x + s * torch.randn(x.shape, generator=noise_gen)).clamp(-1, 1))
        for s in (0.1, 0.2, 0.4)
    ]
    assert all(a < b for a, b in zip(blur, blur[1:], strict=False)), blur
    assert all(a < b for a, b in zip(noise, noise[1:], strict=False)), noise
    assert blur[0] > case.ev.floor["fd/train/floor"]


def test_mean_image_and_noise_are_far_above_the_floor(case):
    d, ev, n = case.data, case.ev, case.n
    floor = ev.floor["fd/train/floor"]
    mean = d.train_x.mean(0, keepdim=True).expand(n, -1, -1, -1)
    noise = torch.randn(n, *d.shape, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    assert fd(ev, mean) >= 10 * floor and fd(ev, noise) >= 10 * floor


def test_dropping_classes_cuts_recall_not_precision(case):
    d, ev = case.data, case.ev
    full = ev.metrics(d.test_x, "k")
    keep = d.test_x[d.test_y < case.kept_classes]
    dropped = ev.metrics(keep.repeat(d.num_classes, 1, 1, 1)[: case.n], "k")
    assert full["recall/k"] - dropped["recall/k"] >= 0.3
    assert full["coverage/k"] - dropped["coverage/k"] >= case.coverage_drop
    assert abs(full["precision/k"] - dropped["precision/k"]) < 0.05
    assert dropped["fd/train/k"] > 3 * ev.floor["fd/train/floor"]
    if "class_kl/k" in full:  # a classifier's head labels the samples
        assert dropped["class_kl/k"] > full["class_kl/k"] + 0.3


class EmpiricalFlow(torch.nn.Module):
    """The exact flow-matching velocity of the empirical data ``x1_i`` with Gaussian noise:
    ``v(x, t) = (E[x1 | x_t = x] - x) / (1 - t)``, posterior weights
    ``w_i ~ exp(-|x - t x1_i|^2 / (2 (1 - t)^2))``."""

    num_classes = 0

    def __init__(self, x1):
        super().__init__()
        self.x1 = x1.flatten(1).double()

    def forward(self, x, t, d, y=None):
        t0 = float(t[0])
        flat = x.flatten(1).double()
        logw = -torch.cdist(flat, t0 * self.x1).square() / (2 * (1 - t0) ** 2)
        mean = logw.softmax(1) @ self.x1
        return ((mean - flat) / (1 - t0)).view_as(x).float()


def test_the_oracle_sampler_improves_strictly_and_starts_at_the_mean(case):
    d, ev = case.data, case.ev
    oracle, fm = EmpiricalFlow(d.train_x), FlowMatching()
    x0 = torch.randn(case.n, *d.shape, generator=torch.Generator().manual_seed(2))
    one = fm.sample(oracle, x0, 1)
    torch.testing.assert_close(
        one, d.train_x.mean(0, keepdim=True).expand_as(one), atol=1e-5, rtol=0
    )
    scores = {n: ev.metrics(fm.sample(oracle, x0, n), "k") for n in (1, 2, 4, 8, 32)}
    fds = [scores[n]["fd/train/k"] for n in (1, 2, 4, 8, 32)]
    assert all(a > b for a, b in zip(fds, fds[1:], strict=False)), fds
    # the oracle reproduces training images; held-out images are not copies
    assert scores[32]["copy_rate/k"] > 0.9
    assert ev.metrics(d.test_x, "k")["copy_rate/k"] < 0.1


def test_identical_values_on_repeat(case):
    x = gaussian_blur(case.data.test_x, [9, 9], [1.0, 1.0])
    assert case.ev.metrics(x, "k") == case.ev.metrics(x, "k")


def test_intervals_are_logged_ordered_and_narrow_with_more_samples(ev, digits):
    x = gaussian_blur(digits.test_x, [9, 9], [1.0, 1.0])
    wide, narrow = ev.metrics(x[:150], "k"), ev.metrics(x, "k")
    for m in (wide, narrow):
        for base in ("fd/train", "fd/test"):
            assert 0 <= m[f"{base}/ci95_low/k"] < m[f"{base}/ci95_high/k"]
    width = lambda m: m["fd/train/ci95_high/k"] - m["fd/train/ci95_low/k"]  # noqa: E731
    assert width(narrow) < width(wide)
    assert ev.floor["fd/train/ci95_low/floor"] < ev.floor["fd/train/ci95_high/floor"]
    assert "200 resamples" in ev.protocol()["eval.bootstrap"]
    no_intervals = ImageSuite(digits, 450, torch.device("cpu"), resamples=0)
    assert not [k for k in no_intervals.metrics(x, "k") if "ci95" in k]
    with pytest.raises(UserError, match="eval.bootstrap=5 is not allowed"):
        ImageSuite(digits, 450, torch.device("cpu"), resamples=5)


def test_toy_point_metrics_rank_quality():
    ref = data.toy_points("8gaussians", 2000, 1)
    real = data.toy_points("8gaussians", 2000, 2)
    # real vs real is at the floor (unbiased MMD ~ 0), and the same call twice is identical
    assert abs(points.rbf_mmd2(real, ref)) < 5e-3
    assert points.energy_distance(real, ref) == points.energy_distance(real, ref)
    g = torch.Generator().manual_seed(0)
    noisy = [real + s * torch.randn(real.shape, generator=g) for s in (0.1, 0.3, 0.6)]
    energy = [points.energy_distance(x, ref) for x in [real, *noisy]]
    assert all(a < b for a, b in zip(energy, energy[1:], strict=False)), energy
    mean = real.mean(0, keepdim=True).expand_as(real)
    assert points.rbf_mmd2(mean, ref) >= 10 * max(points.rbf_mmd2(real, ref), 1e-3)


def pooled_features(x):
    """A tiny stand-in for Inception: [0, 255] 299x299 images -> 48 pooled colour features."""
    return F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)


def test_clean_fid_code_path_with_a_custom_extractor(tmp_path, digits):
    cpu = torch.device("cpu")
    key = {"dataset": "digits16", "split": "train", "resolution": "16x16", "extractor": "pooled"}
    stats, path = clean_fid.reference_stats(
        digits.train_x[:300], key, tmp_path, pooled_features, cpu
    )
    assert path.exists() and path.parent == tmp_path and stats.n == 300
    again, _ = clean_fid.reference_stats(digits.train_x[:300], key, tmp_path, pooled_features, cpu)
    np.testing.assert_array_equal(again.mu, stats.mu)  # read back from the .npz cache
    real = clean_fid.fid(digits.test_x[:200], stats, pooled_features, cpu)
    noise = clean_fid.fid(torch.rand(200, 1, 16, 16) * 2 - 1, stats, pooled_features, cpu)
    assert 0 <= real < noise / 10
    # Through the suite: FID with its interval, in the printed table.
    ev = ImageSuite(
        digits, 200, cpu, fid=True, cache_dir=tmp_path, fid_extractor=pooled_features, resamples=50
    )
    m = ev.metrics(digits.test_x[:200], "k")
    assert 0 <= m["fid/ci95_low/k"] < m["fid/ci95_high/k"]
    assert "FID" in ev.table_head and "FID [" in ev.interval_row(m, "k")
    assert len(ev.table_row(m, "k").split()) == len(ev.table_head.split())


def test_missing_inception_weights_name_the_file(tmp_path):
    with pytest.raises(UserError, match=rf"place inception-2015-12-05.pt .* in {tmp_path}"):
        clean_fid.inception(tmp_path, torch.device("cpu"))


def test_pixel_pca_and_random_cnn_feature_spaces_rank_quality(digits):
    for features in ("pixel_pca", "random_cnn"):
        ev = ImageSuite(digits, 450, torch.device("cpu"), features=features)
        assert ev.extractor_name == features.replace("_", "-")
        noise = torch.randn(450, 1, 16, 16, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
        blurred = gaussian_blur(digits.test_x, [9, 9], [1.5, 1.5])
        assert ev.floor["fd/train/floor"] < fd(ev, blurred) < fd(ev, noise)
        assert "class_kl/k" not in ev.metrics(noise, "k")  # no classifier, no labels


def test_exact_w2_is_zero_for_identical_sets_and_grows_with_a_shift():
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    assert points.exact_w2(x, x) == pytest.approx(0.0, abs=1e-9)
    assert points.exact_w2(x + torch.tensor([1.0, 0.0]), x) == pytest.approx(1.0, abs=1e-6)


class Upsampler(torch.nn.Module):
    """A stand-in VAE decoder: 4x8x8 latents -> 3x16x16 images in [-1, 1]."""

    def forward(self, z):
        return torch.tanh(F.interpolate(z[:, :3], scale_factor=2, mode="nearest"))


def test_fid_on_latents_decodes_both_sides(tmp_path):
    g = torch.Generator().manual_seed(0)
    lat = data.Dataset(
        "lat",
        torch.randn(120, 4, 8, 8, generator=g),
        None,
        torch.randn(20, 4, 8, 8, generator=g),
        None,
        kind="latent",
    )
    with pytest.raises(UserError, match="needs eval.decoder"):
        ImageSuite(
            lat,
            40,
            torch.device("cpu"),
            fid=True,
            cache_dir=tmp_path,
            fid_extractor=pooled_features,
        )
    ev = ImageSuite(
        lat,
        40,
        torch.device("cpu"),
        fid=True,
        cache_dir=tmp_path,
        fid_extractor=pooled_features,
        decoder=Upsampler(),
    )
    real = clean_fid.fid(
        lat.test_x, ev.fid.stats, pooled_features, torch.device("cpu"), transform=ev.decode
    )
    junk = clean_fid.fid(
        torch.full((20, 4, 8, 8), 3.0),
        ev.fid.stats,
        pooled_features,
        torch.device("cpu"),
        transform=ev.decode,
    )
    assert real < junk
    assert ev.fid.path.exists()  # the decoded reference statistics are cached
