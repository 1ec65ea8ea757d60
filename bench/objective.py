"""The value a job returns to a Hydra sweeper (Optuna minimises it).

``objective.metric`` names an MLflow metric family and ``objective.steps`` the step budget it is
read at: ``metric=fd/train steps=1`` -> the job returns ``fd/train/steps_1`` (a ``{k}`` in the
metric is replaced by ``steps_N`` instead). ``metric: null`` (the default): the job returns None.
sweeps/config.yaml declares the keys; sweeps/experiment/optuna_lr.yaml is a search that uses them.
"""

from __future__ import annotations

from omegaconf import DictConfig

from bench.errors import UserError


def objective_name(cfg: DictConfig) -> str | None:
    spec = cfg.get("objective")
    if not spec or not spec.get("metric"):
        return None
    metric, k = str(spec.metric), f"steps_{int(spec.steps)}"
    return metric.replace("{k}", k) if "{k}" in metric else f"{metric}/{k}"


def sweeper_choice() -> str | None:
    """The ``hydra/sweeper`` option of the running job (None outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    return (
        HydraConfig.get().runtime.choices.get("hydra/sweeper")
        if HydraConfig.initialized()
        else None
    )


def check_objective(cfg: DictConfig, sweeper: str | None) -> None:
    """Before anything trains: an optimising sweeper has a value to optimise, and the objective's
    step budget is one the job evaluates."""
    name = objective_name(cfg)
    if name is None:
        if sweeper and sweeper.startswith("optuna"):
            raise UserError(
                f"hydra/sweeper={sweeper} needs a value to minimise: set objective.metric and "
                "objective.steps (e.g. objective.metric=fd/train objective.steps=1), or use "
                "+experiment=optuna_lr"
            )
        return
    if int(cfg.objective.steps) not in [int(s) for s in cfg.eval.budgets]:
        raise UserError(
            f"objective.steps={cfg.objective.steps} is not among eval.budgets="
            f"{list(cfg.eval.budgets)}; add it to eval.budgets"
        )


def objective_value(cfg: DictConfig, results: dict[int, dict[str, float]]) -> float | None:
    """The objective of a finished job, read from the metrics it evaluated (None without one)."""
    name = objective_name(cfg)
    if name is None:
        return None
    metrics = results.get(int(cfg.objective.steps), {})
    if name not in metrics:
        raise UserError(
            f"objective metric {name!r} was not measured by this job; it measured: "
            f"{', '.join(sorted(metrics)) or 'nothing at that budget'}"
        )
    return float(metrics[name])
