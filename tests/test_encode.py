"""The latent pipeline: image folder -> bench.encode -> data=latents -> train -> decode -> FID.

Offline: a tiny randomly initialised AutoencoderKL saved with save_pretrained stands in for
SD-VAE, and a tiny TorchScript network saved as ``inception-2015-12-05.pt`` stands in for
clean-fid's Inception, so the CLI runs the very code paths a cluster job runs.
"""

import inspect
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIG_DIR, ROOT, run_cli
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from bench import data
from bench.encode import encode
from bench.errors import UserError
from bench.metrics import clean_fid
from bench.metrics.suites import ImageSuite

diffusers = pytest.importorskip("diffusers")

RES = 32  # images; the tiny VAE downsamples 4x: 4x8x8 latents


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RES,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def make_images(folder, per_class=12, classes=("cats", "dogs")):
    """Noise images of assorted sizes (the encoder resizes and centre-crops them)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        for i in range(per_class):
            h, w = (RES + 4 * (i % 3), RES + 8 * (i % 2))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // 2 + 100 * c
            (folder / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"{i:02d}.png")
    return folder


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path / "images")


def run(images, out, vae_dir, **kw):
    settings = dict(resolution=RES, chunk_size=10, batch_size=4, workers=2, progress=False)
    return encode(str(images), str(out), str(vae_dir), **{**settings, **kw})


def read_store(out):
    """The metadata, the four moment fields, the labels and the files of a latent store."""
    meta = json.loads((out / "latents.json").read_text())
    fields = {k: np.load(out / f"{k}.npy") for k in ("mean", "logvar", "mean_flip", "logvar_flip")}
    files = (out / "files.txt").read_text().split()
    return meta, fields, np.load(out / "labels.npy"), files


def test_store_holds_scaled_moments_of_each_image_and_of_its_mirror(images, tmp_path, vae_dir):
    out = tmp_path / "latents"
    run(images, out, vae_dir)
    meta, m, y, files = read_store(out)
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    assert meta["complete"] and meta["format"] == "fewstep-bench latents v2"
    assert meta["scaling_factor"] == vae.config.scaling_factor == 0.18215
    assert meta["vae"] == str(vae_dir) and meta["resolution"] == RES and meta["rows_done"] == 24
    assert meta["latent_shape"] == [4, 8, 8] and meta["count"] == 24
    assert all(a.shape == (24, 4, 8, 8) and a.dtype == np.float16 for a in m.values())
    assert meta["classes"] == ["cats", "dogs"] and meta["source"]["files"] == 24
    assert sorted(files) == sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    assert files != sorted(files)  # a seeded random order: the held-out tail is not one class
    assert all(y[i] == ("dogs" in f) for i, f in enumerate(files))
    # Row i holds s * mu and log(s^2 sigma^2) of the resized, centre-cropped image, and the
    # mirror fields hold exactly what the encoder gives for the flipped image.
    for i in (0, 13):
        x = data.load_image(images / files[i], RES, 3)[None]
        with torch.no_grad():
            plain, flipped = vae.encode(x).latent_dist, vae.encode(x.flip(-1)).latent_dist
        for name, dist in (("", plain), ("_flip", flipped)):
            np.testing.assert_allclose(
                m["mean" + name][i], dist.mean[0].numpy() * 0.18215, atol=2e-3, rtol=2e-3
            )
            want = dist.logvar[0].numpy() + 2 * np.log(0.18215)
            np.testing.assert_allclose(m["logvar" + name][i], want, atol=2e-2, rtol=2e-3)
        assert not np.allclose(m["mean"][i], m["mean_flip"][i], atol=1e-2)  # noise is not symmetric


def test_rerun_does_nothing_and_an_interrupted_encoding_resumes(images, tmp_path, vae_dir, capsys):
    out = tmp_path / "latents"
    run(images, out, vae_dir)
    _, full, _, _ = read_store(out)
    stamp = (out / "mean.npy").stat().st_mtime_ns
    run(images, out, vae_dir)
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "mean.npy").stat().st_mtime_ns == stamp

    # Interrupted after the first chunk: rows 10.. never written, the metadata not complete.
    meta = json.loads((out / "latents.json").read_text())
    meta.update(complete=False, rows_done=10)
    (out / "latents.json").write_text(json.dumps(meta))
    for name in ("mean", "logvar", "mean_flip", "logvar_flip"):
        a = np.load(out / f"{name}.npy", mmap_mode="r+")
        a[10:] = 0
        a.flush()
        del a
    with pytest.raises(UserError, match="unfinished \\(10 of 24 images so far\\)"):
        data.latents(str(out))
    run(images, out, vae_dir)
    assert "10 of 24 already done" in capsys.readouterr().out
    for name, a in read_store(out)[1].items():
        np.testing.assert_array_equal(a, full[name])  # the same numbers as before


def test_old_shard_folders_still_load_as_stored(tmp_path):
    """Folders written by the previous bench.encode (npz shards + a v1 latents.json) load whole,
    with data.flip=false data.posterior=mean; anything else is refused in one sentence."""
    z = np.random.default_rng(0).normal(size=(20, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "shard-00000.npz", latents=z, labels=np.arange(20) % 2)
    meta = {"format": "fewstep-bench latents v1", "complete": True, "shards": ["shard-00000.npz"]}
    meta.update(vae="/x", scaling_factor=0.18215, resolution=32, classes=["a", "b"])
    (tmp_path / "latents.json").write_text(json.dumps(meta))
    ds = data.latents(str(tmp_path), test_fraction=0.25, conditional=True)
    assert ds.num_classes == 2 and torch.equal(ds.train_x, torch.from_numpy(z[:15]))
    with pytest.raises(UserError, match="older shards .* set data.flip=false data.posterior=mean"):
        data.latents(str(tmp_path), flip=True)
    with pytest.raises(UserError, match="data.posterior=sample cannot apply"):
        data.latents(str(tmp_path), posterior="sample")


def test_another_source_or_setting_into_the_same_output_is_an_error(images, tmp_path, vae_dir):
    out = tmp_path / "latents"
    run(images, out, vae_dir)
    with pytest.raises(UserError, match="resolution=32, this run asks for resolution=16"):
        run(images, out, vae_dir, resolution=16)
    make_images(images, per_class=13)  # one more image per class
    with pytest.raises(UserError, match=r"another source \(24 images in .*this input: 26 images"):
        run(images, out, vae_dir)


def test_bad_input_names_the_value(tmp_path, vae_dir):
    with pytest.raises(UserError, match=re.escape(f"input folder '{tmp_path / 'nope'}' does not")):
        run(tmp_path / "nope", tmp_path / "out", vae_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="'.*empty' holds no images"):
        run(tmp_path / "empty", tmp_path / "out", vae_dir)
    bad = make_images(tmp_path / "bad", per_class=2)
    (bad / "dogs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        run(bad, tmp_path / "out", vae_dir)
    with pytest.raises(UserError, match="VAE folder '.*no-vae' does not exist"):
        run(bad, tmp_path / "out2", tmp_path / "no-vae")
    (tmp_path / "not-a-vae").mkdir()
    with pytest.raises(UserError, match="cannot load the VAE '.*not-a-vae' as a diffusers"):
        run(bad, tmp_path / "out2", tmp_path / "not-a-vae")
    with pytest.raises(UserError, match="data.posterior='median' is not allowed"):
        data.latents(str(tmp_path), posterior="median")
    loose = make_images(tmp_path / "loose", per_class=1)
    Image.new("RGB", (RES, RES)).save(loose / "top.png")
    with pytest.raises(UserError, match="labels=folders but 1 images lie directly in"):
        run(loose, tmp_path / "out3", vae_dir, labels="folders")


@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_cli_bad_input_is_one_sentence_and_exit_2(tmp_path, vae_dir, case):
    folder = tmp_path / "missing"
    if case == "corrupt":
        folder = make_images(tmp_path / "imgs", per_class=1)
        (folder / "cats" / "zz.jpg").write_bytes(b"\xff\xd8 truncated")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.encode", f"input={folder}", f"output={tmp_path / 'o'}"]
        + [f"vae={vae_dir}", f"resolution={RES}", "progress=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: ")
    name = "'" + str(folder) + "' does not exist" if case == "missing" else "zz.jpg"
    assert name in lines[-1]


def test_loader_exposes_the_vae_and_decoding_inverts_the_scale(images, tmp_path, vae_dir):
    from bench.vae import VAEDecoder

    out = tmp_path / "latents"
    run(images, out, vae_dir)
    ds = data.latents(str(out), test_fraction=0.25, conditional=True)
    assert ds.kind == "latent" and ds.shape == (4, 8, 8) and ds.num_classes == 2
    assert ds.latent.vae == str(vae_dir) and ds.latent.scaling_factor == 0.18215
    assert ds.latent.resolution == RES and ds.latent.classes == ("cats", "dogs")
    assert len(ds.train_x) == 18 and len(ds.test_x) == 6 and set(ds.test_y.tolist()) == {0, 1}

    decoder = VAEDecoder(ds.latent.vae, ds.latent.scaling_factor, chunk=5)
    images_out = decoder(ds.train_x[:7])
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():  # the stored latents decode like the VAE's own unscaled means
        files = read_store(out)[3]
        x = torch.stack([data.load_image(images / f, RES, 3) for f in files[:7]])
        expected = vae.decode(vae.encode(x).latent_dist.mean).sample
    assert images_out.shape == (7, 3, RES, RES)
    torch.testing.assert_close(images_out, expected, atol=2e-3, rtol=2e-3)  # fp16 means

    # The evaluator decodes with the VAE the metadata names, on both sides of FID.
    def pooled(x):  # a stand-in for Inception: [0, 255] 299x299 -> 48 colour features
        return F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)

    cpu = torch.device("cpu")
    ev = ImageSuite(ds, 6, cpu, fid=True, cache_dir=tmp_path, fid_extractor=pooled)
    assert isinstance(ev.decoder, VAEDecoder) and ev.protocol()["eval.fid_decoder"] == str(vae_dir)
    real = clean_fid.fid(ds.test_x, ev.fid.stats, pooled, cpu, transform=ev.decode)
    noise = clean_fid.fid(
        torch.randn(6, 4, 8, 8) * 3, ev.fid.stats, pooled, cpu, transform=ev.decode
    )
    assert 0 <= real < noise


def test_old_style_latents_still_need_a_decoder_for_fid(tmp_path):
    np.savez(tmp_path / "a.npz", latents=np.random.default_rng(0).normal(size=(20, 4, 8, 8)))
    ds = data.latents(str(tmp_path), test_fraction=0.2)
    assert ds.latent is None
    with pytest.raises(UserError, match="needs eval.decoder .* or latents written by"):
        ImageSuite(ds, 4, torch.device("cpu"), fid=True, cache_dir=tmp_path)


def test_configs_compose(compose, vae_dir):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="encode")
    params = inspect.signature(encode).parameters
    assert set(cfg) - {"hydra"} == set(params)  # every key reaches encode(), nothing else
    assert cfg.vae == "stabilityai/sd-vae-ft-mse" and cfg.resolution == 256

    celeba = compose("+experiment=celebahq256")
    assert celeba.size.size == "B" and celeba.size.patch == 2 and not celeba.data.conditional
    assert (celeba.train.batch_size, celeba.train.steps, celeba.train.lr) == (64, 410_000, 1e-4)
    imagenet = compose("+experiment=imagenet256")
    assert imagenet.size.size == "XL" and imagenet.data.conditional
    assert (imagenet.train.batch_size, imagenet.train.steps) == (256, 810_000)
    for c in (celeba, imagenet):
        assert c.data._target_ == "bench.data.latents" and c.train.ema_rate == 0.999
        assert c.eval.fid and c.eval.num_samples == 50_000 and list(c.eval.budgets) == [1, 4, 128]
    method = instantiate(imagenet.method)
    assert method.cfg_scale == 1.5 and method.bake_cfg_scale == 1.5

    # An explicit decoder from the command line, as sweeps/eval/offline.yaml describes.
    cfg = compose(f"eval.decoder={{_target_:bench.vae.VAEDecoder,vae:{vae_dir}}}")
    decoder = instantiate(cfg.eval.decoder)
    assert decoder(torch.zeros(2, 4, 8, 8)).shape == (2, 3, RES, RES)


def fake_inception(folder):
    """A TorchScript file with the interface clean-fid's InceptionV3W uses (``layers``)."""

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 9, stride=9)

        def forward(self, x):
            return F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 16).flatten(1)  # 2048

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x, return_features: bool = False):
            return self.layers(x)

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.script(Base()).save(str(folder / clean_fid.INCEPTION_FILE))
    return folder


@pytest.mark.slow
def test_encode_train_sample_decode_fid_through_the_clis(images, tmp_path, vae_dir):
    """The README's two commands at toy scale: the imagenet256 experiment (class-conditional,
    CFG, eval=clean_fid) on a tiny DiT, FID from decoded samples through clean-fid's code."""
    out = tmp_path / "latents"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.encode", f"input={images}", f"output={out}"]
        + [f"vae={vae_dir}", f"resolution={RES}", "chunk_size=10", "progress=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 24 x 2 posterior moments of (4, 8, 8) latents" in proc.stdout
    proc = run_cli(
        "+experiment=imagenet256",
        f"data.path={out}",
        "data.test_fraction=0.25",
        "size=tiny",
        "train.steps=2",
        "train.batch_size=8",
        "train.grad_accum=1",
        "train.ckpt_every=2",
        "train.log_every=2",
        "train.progress=false",
        "eval.num_samples=16",
        "eval.batch_size=16",
        "eval.budgets=[1,4]",
        "eval.interpolation=false",
        f"eval.inception_dir={fake_inception(tmp_path / 'inception')}",
        f"eval.cache_dir={tmp_path / 'stats'}",
        f"paths.root={tmp_path / 'results'}",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"fid_decoder={vae_dir}" in proc.stdout
    (run_dir,) = (tmp_path / "results" / "runs").iterdir()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "finished"
    (metrics,) = state["evaluated"].values()
    for steps in ("1", "4"):
        fid = metrics[steps][f"fid/steps_{steps}"]
        assert np.isfinite(fid) and fid > 0
    assert list((tmp_path / "stats").glob("fid-stats-*.npz"))  # decoded training statistics
