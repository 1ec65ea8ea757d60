"""Recipes: the options that reproduce the official codes, and ``recipe=shared|official``.

The official values themselves are checked against the official code by tests/test_golden.py;
here: each option does what its table row says, ``recipe=official`` gives every method its own
official settings (also inside a multirun over methods), and ``recipe=shared`` leaves the run
identity of every existing configuration unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CONFIG_DIR, SMOKE, Analytic, bcast
from omegaconf import OmegaConf
from torch import nn

from bench.data import Batch
from bench.distributed import SINGLE
from bench.dit import EMBEDDING_SCALES, FLOW_MATCHING_LEVEL
from bench.errors import UserError
from bench.identity import ADDED_OPTIONS, identity_hash
from bench.run import job
from methods.base import Nets, StageContext
from methods.progressive_distillation import ProgressiveDistillation


# -- progressive distillation's official options -------------------------------------------------
class Affine(nn.Module):
    """``v = a x`` with a learnable ``a`` (so online, EMA and teacher weights can differ)."""

    num_classes = 0

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x, t, d, y=None):
        return self.a * x


def context(tmp_path, reset=lambda: None) -> StageContext:
    return StageContext(tmp_path, None, torch.device("cpu"), False, 0, reset, SINGLE)


def test_pd_clip_is_on_the_midpoint_only():
    """Official targets_progressive.py:34 clips x' to [-4, 4]; the target (l. 36) is not clipped."""
    fast = Analytic(lambda x, t, d, y: 40 * torch.ones_like(x))
    pd = ProgressiveDistillation(clip=4.0)
    pd.round, pd.round_teacher = 0, fast
    student = Analytic(lambda x, t, d, y: torch.zeros_like(x))
    x1 = x0 = torch.full((4, 3), 5.0)  # x_t = 5 at every t; x' = 5 + 40 / 128 before the clip
    loss, _ = pd.loss(Nets(student, student), Batch(x1, None, x0), 0)
    second = fast.calls[1][0]  # the midpoint the teacher's second call sees
    assert torch.equal(second, torch.full_like(second, 4.0))
    torch.testing.assert_close(loss, torch.tensor(40.0**2))  # target 40, above the clip


def test_pd_round0_guidance_only():
    """bake_cfg_scale guides round 0's teacher (its d is the flow-matching level) and no other."""
    f = lambda x, t, d, y: bcast((y == 3).float(), x) * torch.ones_like(x)  # noqa: E731
    for round_, want in ((0, 1.5), (1, 1.0)):
        teacher = Analytic(f, num_classes=4)
        pd = ProgressiveDistillation(bake_cfg_scale=1.5)
        pd.round, pd.round_teacher = round_, teacher
        student = Analytic(lambda x, t, d, y: torch.zeros_like(x), num_classes=4)
        y = torch.full((4,), 3)
        loss, _ = pd.loss(Nets(student, student), Batch(torch.zeros(4, 2), y, torch.zeros(4, 2)), 0)
        torch.testing.assert_close(loss, torch.tensor(want**2))


def test_pd_constant_d_token_in_training_and_sampling():
    pd = ProgressiveDistillation(d_conditioning="constant")
    for r in (0, 3, 6):
        teacher = Analytic(lambda x, t, d, y: x)
        pd.round, pd.round_teacher = r, teacher
        student = Analytic(lambda x, t, d, y: x)
        pd.loss(Nets(student, student), Batch(torch.randn(4, 2), None, torch.randn(4, 2)), 0)
        tokens = torch.cat([c[2] for c in teacher.calls + student.calls])
        assert torch.all(tokens == FLOW_MATCHING_LEVEL)
    assert {pd.step_size(n) for n in (1, 8, 64)} == {FLOW_MATCHING_LEVEL}
    assert ProgressiveDistillation().step_size(8) == 1 / 8


def test_pd_official_round_start(tmp_path):
    """teacher_weights=ema, ema_rate=None, reset_optimizer=false, lr_schedule=constant: the EMA
    teaches and keeps running, the optimizer state survives, the learning rate is constant."""
    resets = []
    pd = ProgressiveDistillation(
        teacher_weights="ema", ema_rate=None, reset_optimizer=False, lr_schedule="constant"
    )
    ctx = context(tmp_path, lambda: resets.append(1))
    pd.bind(ctx)
    pd.attach_teacher(Affine(1.0))
    nets = Nets(online=Affine(2.0), ema=Affine(3.0))
    pd.begin_stage(2, nets, ctx, fresh=True)
    assert pd.round_teacher.a.item() == 3.0 and nets.ema.a.item() == 3.0 and not resets
    assert pd.lr_factor(15, 70) == 1.0 and pd.ema_rate is None
    pd.begin_stage(0, nets, ctx, fresh=True)  # round 0: everything starts as the teacher
    assert pd.round_teacher.a.item() == nets.online.a.item() == nets.ema.a.item() == 1.0

    default = ProgressiveDistillation()
    default.bind(ctx)
    default.attach_teacher(Affine(1.0))
    nets = Nets(online=Affine(2.0), ema=Affine(3.0))
    default.begin_stage(2, nets, ctx, fresh=True)
    assert default.round_teacher.a.item() == 2.0 and nets.ema.a.item() == 2.0 and resets == [1]
    assert default.ema_rate == 0.0 and default.lr_factor(15, 70) == 0.5


def test_pd_refuses_a_teacher_that_embeds_differently(tmp_path):
    from bench.dit import DiT

    def dit(embedding: str) -> DiT:
        t_scale, d_scale = EMBEDDING_SCALES[embedding]
        return DiT((1, 4, 4), 16, 1, 2, patch=2, t_scale=t_scale, d_scale=d_scale)

    pd = ProgressiveDistillation(embedding="raw")
    pd.attach_teacher(dit("dit"))
    ctx = context(tmp_path)
    student = dit("raw")
    with pytest.raises(UserError, match="embeds t and d"):
        pd.begin_stage(0, Nets(student, copy.deepcopy(student)), ctx, fresh=True)


# -- the embedding option --------------------------------------------------------------------------
@pytest.mark.parametrize("embedding", ["dit", "raw"])
def test_embedding_option_builds_the_network(compose, embedding):
    """``raw`` feeds t and the integer level to the sinusoid as they are (official model.py)."""
    from bench.build import build, embedding_of

    _, net, method, _ = build(compose("method=shortcut", f"method.embedding={embedding}"))
    t_scale, d_scale = EMBEDDING_SCALES[embedding]
    assert embedding_of(net) == {"d_embedding": "level", "t_scale": t_scale, "d_scale": d_scale}
    assert net.t_embed.scale == method.t_scale == t_scale


# -- recipe=shared | official ----------------------------------------------------------------------
METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
OFFICIAL_DIR = CONFIG_DIR / "recipe" / "method" / "official"


def sweep_jobs(*arguments: str) -> list[list[str]]:
    """The override lists Hydra's basic sweeper gives each job of ``-m ARGUMENTS``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(arguments))
    (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return batch


def leaves(node, prefix=""):
    """``{dotted.key: value}`` of every leaf of a plain container."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def test_every_method_has_an_official_recipe():
    assert sorted(p.stem for p in OFFICIAL_DIR.glob("*.yaml")) == METHODS


def test_a_multirun_over_methods_gives_each_its_own_official_recipe(compose):
    jobs = sweep_jobs(f"method={','.join(METHODS)}", "recipe=official")
    assert len(jobs) == len(METHODS)
    seen = {}
    for overrides in jobs:
        cfg = compose(*overrides)
        method = dict(o.split("=", 1) for o in overrides)["method"]
        resolved = OmegaConf.to_container(cfg, resolve=True)
        want = leaves(
            OmegaConf.to_container(OmegaConf.load(OFFICIAL_DIR / f"{method}.yaml"), resolve=False)
        )
        got = leaves(resolved)
        for key, value in want.items():
            if isinstance(value, str) and value.startswith("${"):
                continue  # an interpolation (live reflow's gen_cfg_scale), resolved per run
            assert got[key] == value, (
                f"{method}: {key} = {got[key]!r}, its official recipe says {value!r}"
            )
        assert resolved["recipe"] == "official"
        seen[method] = (tuple(resolved["train"]["betas"]), resolved["train"]["ema_rate"])
    # not one recipe for all: MeanFlow's optimizer and EMA differ from the shortcut code's
    assert seen["meanflow"] != seen["shortcut"]


@pytest.mark.parametrize("method", METHODS)
def test_official_options_are_reachable(compose, method):
    """Every value an official recipe sets is accepted by the method (a real option)."""
    from bench.build import make_method

    cfg = compose(f"method={method}", "recipe=official")
    built = make_method(cfg)
    for key, value in OmegaConf.to_container(cfg.method, resolve=True).items():
        if key in ("_target_", "teacher"):
            continue
        attr = "loss_type" if key == "loss" else key
        got = getattr(built, attr)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


@pytest.mark.parametrize("method", METHODS)
def test_shared_recipe_keeps_the_identity_of_existing_runs(compose, method):
    """recipe=shared is the default and changes no setting; the options added with the recipes
    sit at their neutral values, which stay out of the hash: the config without them (what runs
    recorded before had) hashes the same."""
    from omegaconf import open_dict

    cfg = compose(f"method={method}")
    assert cfg.recipe == "shared" and compose(f"method={method}", "recipe=shared") == cfg
    older = copy.deepcopy(cfg)
    added = ADDED_OPTIONS.get(cfg.method._target_, {})
    with open_dict(older):
        for key in added:
            del older.method[key]
    assert identity_hash(older) == identity_hash(cfg)
    for key, neutral in added.items():  # any other value is a run of its own
        changed = copy.deepcopy(cfg)
        changed.method[key] = "raw" if key == "embedding" else _other(neutral)
        assert identity_hash(changed) != identity_hash(cfg), key
    assert identity_hash(compose(f"method={method}", "recipe=official")) != identity_hash(cfg)


def _other(value):
    """A value of the same kind as ``value`` that differs from it."""
    if value is None:
        return 1.0
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        return value + 0.5
    return value + "_"


def test_an_official_pd_run_records_its_recipe(compose, tmp_path, mlflow_uri):
    """A whole official progressive-distillation run (its official flow-matching teacher too):
    the EMA teaches, the optimizer is kept, d is constant; MLflow has recipe=official."""
    import mlflow

    cfg = compose(
        "method=progressive_distillation",
        "recipe=official",
        f"paths.root={tmp_path}",
        f"tracking.uri={mlflow_uri}",
        "train.steps=14",
        *SMOKE,
        "eval.budgets=[1,64,128]",
    )
    job(cfg)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 2  # the teacher and the student
    for run in runs:
        assert run.data.tags["recipe"] == run.data.params["recipe"] == "official"
        assert run.info.status == "FINISHED"
    student = next(r for r in runs if r.data.tags["method"] == "progressive_distillation")
    assert student.data.params["method.d_conditioning"] == "constant"


@pytest.mark.parametrize("experiment", ["celebahq256", "imagenet256"])
def test_paper_experiments_run_the_official_recipe(compose, experiment):
    """Every ``key=value`` the experiment's flag table names is what the experiment composes to,
    and the recipe is the official one (online weights, raw embedding)."""
    import re

    import yaml

    cfg = compose(f"+experiment={experiment}", "data.path=/nowhere")
    assert cfg.recipe == "official" and cfg.eval.weights == "online"
    assert cfg.method.embedding == "raw" and cfg.method.k_ratio == 0.125
    text = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text()
    table = [line for line in text.splitlines() if line.startswith("# |")]
    pairs = re.findall(
        r"((?:method|train|eval|size)\.[a-z_]+)=(\[[^\]]*\]|[^\s|(),]+)", "\n".join(table)
    )
    assert len(pairs) >= 12, pairs
    for key, value in pairs:
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == yaml.safe_load(value), (
            f"{experiment}: {key} is {got!r}, its table says {value}"
        )


def test_official_backbone_options():
    """attention=official scales the logits by 1/head_dim, adaln_init=xavier leaves the blocks'
    adaLN weights non-zero; the defaults are the DiT's (bitwise the network of before)."""
    from bench.dit import DiT

    def net(**kw):
        torch.manual_seed(0)
        return DiT((1, 4, 4), 16, 1, 2, patch=2, **kw)

    default, official = net(), net(attention="official", adaln_init="xavier")
    assert default.blocks[0].adaLN[-1].weight.abs().sum() == 0
    assert official.blocks[0].adaLN[-1].weight.abs().sum() > 0
    attn, x = default.blocks[0].attn, torch.randn(2, 4, 16)
    naive = copy.deepcopy(attn)
    naive.naive = True
    torch.testing.assert_close(attn(x), naive(x))  # the spelled-out softmax is SDPA's
    official_attn = copy.deepcopy(attn)
    official_attn.scale = 1 / 8  # head_dim 8: the official temperature
    assert official.blocks[0].attn.scale == 1 / 8
    naive.scale = 1 / 8
    torch.testing.assert_close(official_attn(x), naive(x))
    assert not torch.allclose(official_attn(x), attn(x))
