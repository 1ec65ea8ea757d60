"""The data layer: built-in datasets, user folders (fixtures made here), and bad paths."""

import numpy as np
import pytest
import torch
from PIL import Image

from bench import data
from bench.errors import UserError


def test_digits16_recipe():
    ds = data.digits16()
    assert ds.train_x.shape == (1347, 1, 16, 16) and ds.test_x.shape == (450, 1, 16, 16)
    assert ds.train_x.min() >= -1 and ds.train_x.max() <= 1
    assert ds.num_classes == 10 and set(ds.test_y.tolist()) == set(range(10))
    # stratified: every class keeps its share of the 450 test images (45 each, +-2)
    counts = torch.bincount(ds.test_y, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47


def test_shapes16_is_rgb_with_three_labels():
    ds = data.shapes16(n_train=300, n_test=30)
    assert ds.train_x.shape == (300, 3, 16, 16) and ds.num_classes == 3
    assert set(ds.train_y.tolist()) == {0, 1, 2}
    # anti-aliased edges: values strictly between background and full colour exist
    assert (
        (ds.train_x > -0.99) & (ds.train_x < ds.train_x.amax(dim=(2, 3), keepdim=True) - 0.05)
    ).any()


@pytest.mark.parametrize("name", ["8gaussians", "moons", "checkerboard"])
def test_toy2d(name):
    ds = data.toy2d(name, n_train=500, n_test=100)
    assert ds.shape == (2,) and ds.kind == "points" and ds.train_y is None
    assert 0.3 < ds.train_x.std() < 2.0


def test_batches_are_a_function_of_seed_and_step():
    ds = data.digits16(conditional=True)
    a, b, c = ds.batch(16, 0, 5), ds.batch(16, 0, 5), ds.batch(16, 0, 6)
    assert torch.equal(a.x1, b.x1) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x1, c.x1)
    assert ds.batch(16, 0, 5, conditional=False).y is None
    # The indices keep their published key, seed * 1_000_003 + step (bench.rng.stream_key).
    g = torch.Generator().manual_seed(3 * 1_000_003 + 5)
    idx = torch.randint(len(ds.train_x), (16,), generator=g)
    assert torch.equal(ds.batch(16, 3, 5).x1, ds.train_x[idx].float())


def _png(path, colour, size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    for i in range(6):
        _png(tmp_path / "cats" / f"{i}.png", (255, 0, 0))
        _png(tmp_path / "dogs" / f"{i}.jpg", (0, 0, 255))
    ds = data.image_folder(str(tmp_path), resolution=8, test_fraction=0.25)
    assert ds.shape == (3, 8, 8) and ds.num_classes == 2
    assert len(ds.train_x) + len(ds.test_x) == 12 and len(ds.test_x) == 3
    red = ds.train_x[ds.train_y == 0]
    assert torch.allclose(red[:, 0], torch.ones_like(red[:, 0])) and torch.allclose(
        red[:, 2], -torch.ones_like(red[:, 2])
    )


def test_image_folder_without_classes_is_unlabeled(tmp_path):
    for i in range(4):
        _png(tmp_path / f"{i}.png", (10 * i, 0, 0))
    ds = data.image_folder(str(tmp_path), resolution=4, channels=1)
    assert ds.num_classes == 0 and ds.train_y is None and ds.shape == (1, 4, 4)


def test_missing_empty_and_unreadable_paths_name_the_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.image_folder(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="data.path is not set"):
        data.image_folder(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        data.image_folder(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    _png(bad / "ok.png", (0, 0, 0))
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        data.image_folder(str(bad))
    with pytest.raises(UserError, match="holds no .npy or .npz"):
        data.latents(str(tmp_path / "empty"))


def test_latent_shards(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "a.npz",
        latents=rng.normal(size=(30, 4, 8, 8)).astype(np.float32),
        labels=rng.integers(0, 5, 30),
    )
    np.savez(
        tmp_path / "b.npz",
        latents=rng.normal(size=(20, 4, 8, 8)).astype(np.float32),
        labels=np.full(20, 4),
    )
    ds = data.latents(str(tmp_path), test_fraction=0.1)
    assert ds.shape == (4, 8, 8) and ds.kind == "latent" and ds.num_classes == 5
    assert len(ds.train_x) == 45 and len(ds.test_x) == 5
    unl = tmp_path / "npy"
    unl.mkdir()
    np.save(unl / "x.npy", rng.normal(size=(10, 4, 8, 8)).astype(np.float32))
    assert data.latents(str(unl)).train_y is None
