"""Memory-mapped stores (bench.store): pixel packing round trip, resume and refusal; latent
draws (posterior samples, mirrors) reproducible per (seed, micro-batch, row); bitwise resume and
DDP equality on a store; host memory that does not grow with the number of rows."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT
from PIL import Image

from bench import data
from bench.errors import UserError
from bench.store import PIXEL_META, synthetic_latents


def make_folder(folder, n=12, size=(20, 12)):
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = "cats" if i % 2 else "dogs"
        (folder / cls).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / cls / f"{i:02d}.png")
    return folder


# -- pixel stores ----------------------------------------------------------------------------------
def test_pixel_store_round_trip_equals_decoding_each_image(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    ds = data.image_folder(str(folder), resolution=8, test_fraction=0.25, progress=False)
    files = sorted(folder.rglob("*.png"))
    want = torch.stack([data.load_image(f, 8, 3) for f in files])
    test = torch.arange(12) % 4 == 3  # every 4th image held out, as the in-memory loader did
    assert len(ds.train_x) == 9 and len(ds.test_x) == 3 and ds.shape == (3, 8, 8)
    # uint8 holds exactly what load_image's [-1, 1] values came from (x * 127.5 + 127.5).
    torch.testing.assert_close(ds.train_x[:], want[~test], atol=1e-6, rtol=0)
    torch.testing.assert_close(ds.test_x[:], want[test], atol=1e-6, rtol=0)
    torch.testing.assert_close(ds.train_x[torch.tensor([5, 0, 5])], want[~test][[5, 0, 5]])
    assert ds.train_y.tolist() == [int(f.parent.name == "dogs") for f in np.array(files)[~test]]


def test_packing_resumes_and_a_changed_source_is_refused(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    store = tmp_path / "store"
    full = data.image_folder(str(folder), resolution=8, store=str(store), progress=False)
    first = full.train_x[:]
    meta = json.loads((store / PIXEL_META).read_text())
    assert meta["complete"] and meta["rows_done"] == 12 and meta["source"]["files"] == 12
    # An interrupted packing: rows 4.. never written, the metadata says 4 done.
    meta.update(complete=False, rows_done=4)
    (store / PIXEL_META).write_text(json.dumps(meta))
    pixels = np.load(store / "pixels.npy", mmap_mode="r+")
    pixels[4:] = 0
    pixels.flush()
    del pixels
    again = data.image_folder(str(folder), resolution=8, store=str(store), progress=False)
    torch.testing.assert_close(again.train_x[:], first, atol=0, rtol=0)
    assert json.loads((store / PIXEL_META).read_text())["complete"]

    with pytest.raises(UserError, match="packed at resolution=8, this run asks for resolution=4"):
        data.image_folder(str(folder), resolution=4, store=str(store), progress=False)
    Image.new("RGB", (9, 9)).save(folder / "cats" / "new.png")  # the folder changed
    with pytest.raises(UserError, match=r"holds another source \(12 images .* now 13 images"):
        data.image_folder(str(folder), resolution=8, store=str(store), progress=False)
    # Without an explicit data.store the changed folder is packed anew, beside the old store.
    ds = data.image_folder(str(folder), resolution=8, progress=False)
    assert len(ds.train_x) + len(ds.test_x) == 13


def test_flip_mirrors_pixel_rows_per_draw(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    plain = data.image_folder(str(folder), resolution=8, progress=False)
    flip = data.image_folder(str(folder), resolution=8, flip=True, progress=False)
    a, b = plain.batch(64, 0, 3), flip.batch(64, 0, 3)
    g = torch.Generator().manual_seed(3)  # the batch's key: seed 0, micro-batch 3
    idx = torch.randint(len(plain.train_x), (64,), generator=g)
    coin = torch.rand(64, generator=g) < 0.5  # drawn after the rows
    assert torch.equal(a.x1, plain.train_x[idx])  # no flip: the rows of earlier versions
    assert torch.equal(b.x1[~coin], a.x1[~coin]) and torch.equal(b.x1[coin], a.x1[coin].flip(-1))
    assert 10 < int(coin.sum()) < 54 and torch.equal(flip.batch(64, 0, 3).x1, b.x1)


# -- latent stores ---------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    synthetic_latents(tmp_path / "lat", 200, shape=(4, 4, 4), classes=3)
    return tmp_path / "lat"


def test_latent_draws_are_reproducible_per_seed_micro_batch_and_row(store):
    mean = np.load(store / "mean.npy").astype(np.float32)
    logvar = np.load(store / "logvar.npy").astype(np.float32)
    mean_f = np.load(store / "mean_flip.npy").astype(np.float32)
    ds = data.latents(str(store), test_fraction=0.1, flip=True, posterior="sample")
    assert len(ds.train_x) == 180 and ds.num_classes == 3 and ds.kind == "latent"
    b = ds.batch(32, 7, 11)
    assert torch.equal(b.x1, ds.batch(32, 7, 11).x1)  # the same key, the same draw
    assert not torch.equal(b.x1, ds.batch(32, 7, 12).x1)
    assert not torch.equal(b.x1, ds.batch(32, 8, 11).x1)
    g = torch.Generator().manual_seed(7 * 1_000_003 + 11)
    idx = torch.randint(180, (32,), generator=g).numpy()
    coin = (torch.rand(32, generator=g) < 0.5).numpy()
    eps = torch.randn(32, 4, 4, 4, generator=g).numpy()
    assert 4 < coin.sum() < 28
    lv = np.where(coin[:, None, None, None], logvar[idx][..., ::-1], logvar[idx])
    mu = np.where(coin[:, None, None, None], mean_f[idx], mean[idx])
    np.testing.assert_allclose(b.x1.numpy(), mu + np.exp(lv / 2) * eps, atol=1e-5)
    # The posterior mean, unflipped: exactly the stored means of the same rows.
    m = data.latents(str(store), test_fraction=0.1, flip=False, posterior="mean").batch(32, 7, 11)
    np.testing.assert_array_equal(m.x1.numpy(), mean[idx])
    assert torch.equal(m.y, torch.from_numpy(np.load(store / "labels.npy")[idx]))
    # Held-out rows are the unflipped means of the tail.
    np.testing.assert_array_equal(ds.test_x[:].numpy(), mean[180:])


def compose_cfg(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "sweeps"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def store_overrides(path):
    return [
        "data=latents",
        f"data.path={path}",
        "data.conditional=true",
        "method=flow_matching",
        "train.steps=4",
        "train.batch_size=8",
        "train.log_every=2",
        "train.ckpt_every=2",
        "train.progress=false",
    ]


def weights(trainer):
    return {
        **trainer.net.state_dict(),
        **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()},
    }


def test_training_on_a_store_resumes_bitwise(store, tmp_path):
    from test_distributed import make_trainer

    cfg = compose_cfg(*store_overrides(store))
    assert cfg.data.flip and cfg.data.posterior == "sample"  # the official recipe by default
    straight = make_trainer(cfg, tmp_path / "a")
    (tmp_path / "a").mkdir()
    straight.fit()
    (tmp_path / "b").mkdir()
    first = make_trainer(cfg, tmp_path / "b")
    first.fit(stop_at=2)
    resumed = make_trainer(cfg, tmp_path / "b")
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_gloo_processes_on_a_store_match_grad_accum_2(store, tmp_path):
    from test_distributed import _rank, assert_close, free_port, make_trainer

    overrides = store_overrides(store)
    single = make_trainer(compose_cfg(*overrides, "train.grad_accum=2"), tmp_path / "one")
    (tmp_path / "one").mkdir()
    single.fit()
    (tmp_path / "two").mkdir()
    mp.spawn(_rank, args=(free_port(), overrides, str(tmp_path / "two"), None), nprocs=2)
    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1))
    assert_close(r0["net"], r1["net"], "rank 0 vs rank 1", atol=0)
    assert_close(r0["net"], single.net.state_dict(), "net", atol=2e-5)


RSS_PROBE = """
import sys, torch
from bench import data
kind, path = sys.argv[1], sys.argv[2]
ds = data.latents(path, flip=kind == "store", posterior="sample" if kind == "store" else "mean",
                  conditional=True)
for step in range(20):
    ds.batch(64, 0, step)
# The process's own resident memory, the dataset alive; mapped file pages (RssFile) are the page
# cache, shared by every process of a node and dropped under pressure.
status = open("/proc/self/status").read()
print(int(status.split("RssAnon:")[1].split()[0]) * 1024)
"""


def rss(kind: str, path) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, kind, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


def test_host_memory_does_not_grow_with_the_rows_of_a_store(tmp_path):
    """100x the rows: the store's anonymous resident memory grows by a small fraction of the bytes added, while
    the in-memory loader (older shard folders) grows by at least those bytes (the test can fail)."""
    shape = (4, 8, 8)
    small, big = 500, 50_000
    for n in (small, big):
        synthetic_latents(tmp_path / f"store{n}", n, shape=shape, classes=10)
        z = np.load(tmp_path / f"store{n}" / "mean.npy")
        (tmp_path / f"shards{n}").mkdir()
        np.savez(tmp_path / f"shards{n}" / "a.npz", latents=z, labels=np.zeros(n, dtype=np.int64))
    added = (big - small) * int(np.prod(shape)) * 4  # float32 rows the in-memory loader holds
    store_growth = rss("store", tmp_path / f"store{big}") - rss("store", tmp_path / f"store{small}")
    memory_growth = rss("shards", tmp_path / f"shards{big}") - rss(
        "shards", tmp_path / f"shards{small}"
    )
    assert memory_growth > added, (memory_growth, added)
    assert store_growth < 0.1 * added, (store_growth, added)
