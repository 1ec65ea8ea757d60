"""Hydra launchers that know what each job costs (``bench.plan``).

``PlanLauncher`` is what ``plan=true`` launches with (``bench.run.cli`` puts it in place of the
chosen launcher's ``_target_``, keeping that launcher's settings): Hydra's sweeper expands the
command exactly as it would for a real launch (comma lists, ``hydra.sweeper.params`` of an
experiment), and instead of starting the jobs the launcher composes each job's config, plans it and
prints the plan -- with the SLURM request of each job under ``hydra/launcher=slurm``.

``PlannedSlurmLauncher`` (``sweeps/hydra/launcher/slurm.yaml``) is hydra-submitit-launcher's SLURM
launcher whose request is sized per job: the preset's ``${plan:...}`` values are resolved in each
job's own config, jobs asking for the same resources share one job array, and every array is
submitted before any is waited for. Each job is the plugin's own callable, so requeueing on a time
limit or preemption (submitit's ``checkpoint``) works as before.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from bench import plan
from bench.errors import EXIT_USER_ERROR, UserError

#: the launcher settings a plan sizes per job (the rest are the preset's, the same for all)
SIZED = ("gpus_per_node", "tasks_per_node", "timeout_min", "mem_gb")
SLURM_PRESETS = ("slurm", "submitit_slurm")


def job_configs(launcher, job_overrides: Sequence[Sequence[str]]):
    """Each job's composed config, as the job itself will see it."""
    load = launcher.hydra_context.config_loader.load_sweep_config
    return [load(launcher.config, list(o)) for o in job_overrides]


class PlanLauncher(Launcher):
    """Prints the plan of the sweep's jobs; launches nothing (module docstring)."""

    def __init__(self, **params) -> None:
        self.params = params

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        choices = self.config.hydra.runtime.choices
        launcher = str(choices.get("hydra/launcher") or "local")
        try:
            if str(choices.get("hydra/sweeper") or "basic") != "basic":
                raise UserError(
                    f"plan=true cannot list the jobs of hydra/sweeper={choices['hydra/sweeper']}: "
                    "they depend on the results of earlier jobs; plan the search space's "
                    "corners with the basic sweeper instead"
                )
            cfgs = job_configs(self, job_overrides)
            # the SLURM request as the preset resolves it in each job (its ${plan:...} values)
            requests = [request(c) for c in cfgs] if launcher in SLURM_PRESETS else None
            for c, r in zip(cfgs, requests or [], strict=False):
                check_time_limit(
                    r["timeout_min"], OmegaConf.select(c, "hydra.launcher.signal_delay_s")
                )
            plans = plan.plan_sweep(cfgs, requests)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        print(plan.render(plans, len(cfgs), launcher, bool(cfgs[0].get("allow_long_cpu"))))
        return [
            JobReturn(
                overrides=list(o), cfg=c, hydra_cfg=self.config, working_dir=".",
                task_name="plan", status=JobStatus.COMPLETED, _return_value=None,
            )
            for o, c in zip(job_overrides, cfgs, strict=True)
        ]  # fmt: skip


def request(cfg) -> dict:
    """The sized launcher settings of one job, resolved in that job's config."""
    return {k: OmegaConf.select(cfg, f"hydra.launcher.{k}") for k in SIZED}


SIGNAL_LEAD_MAX_S = 65535


def _whole(value) -> bool:
    """An integer, or a float with nothing after the point (YAML may give either); not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and value.is_integer()


def check_time_limit(timeout_min, signal_delay_s) -> None:
    """SLURM warns a job ``signal_delay_s`` (up to 60 s more) before its time limit and the
    warning is a stop request (save, requeue): a limit inside that lead would stop every job as
    it starts and requeue it for ever. Checked by the launcher before submission and by the
    plan, so both refuse the same requests."""
    # sbatch(1): --signal=SIG@N takes N in whole seconds from 0 to 65535; --time at least 1 min
    if signal_delay_s is not None and not (
        _whole(signal_delay_s) and 0 <= int(signal_delay_s) <= SIGNAL_LEAD_MAX_S
    ):
        raise UserError(
            f"hydra.launcher.signal_delay_s={signal_delay_s} is not a lead sbatch accepts: "
            f"allowed are whole seconds from 0 (no warning) to {SIGNAL_LEAD_MAX_S}"
        )
    if timeout_min is not None and not (_whole(timeout_min) and int(timeout_min) >= 1):
        raise UserError(
            f"hydra.launcher.timeout_min={timeout_min} is not a time limit: allowed are whole "
            "minutes from 1"
        )
    lead = plan.warning_lead(signal_delay_s or 0)
    if timeout_min is not None and lead and float(timeout_min) * 60 <= lead:
        raise UserError(
            f"hydra.launcher.timeout_min={timeout_min} is inside the time-limit warning "
            f"(hydra.launcher.signal_delay_s={signal_delay_s} s before it, up to 60 s earlier in "
            "SLURM): the job would be told to stop as it starts; ask for more minutes than "
            f"{lead / 60:g}, or a shorter lead"
        )


class PlannedSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher with requests sized per job (module docstring)."""

    def executor(self, sized: dict):
        """The plugin's executor set-up, with this group's sized settings."""
        import submitit

        params = {**self.params, **sized}
        init = {
            "folder": params["submitit_folder"],
            "slurm_max_num_timeout": params["max_num_timeout"],
        }
        executor = submitit.AutoExecutor(cluster="slurm", **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        skip = {"submitit_folder", "max_num_timeout"}
        executor.update_parameters(
            **{k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in skip}
        )
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # The line hydra-submitit-launcher prints, so a log reads the same under either launcher.
        print(f"Submitit 'slurm' sweep output dir : {sweep_dir}", flush=True)
        groups: dict[tuple, list[int]] = {}
        cfgs = job_configs(self, job_overrides)
        for i, cfg in enumerate(cfgs):
            groups.setdefault(tuple(request(cfg).items()), []).append(i)
        try:
            for cfg in cfgs:  # a bad planning key would have left the preset's request silently
                plan.planning_of(cfg)
            for sized in groups:
                check_time_limit(dict(sized)["timeout_min"], self.params.get("signal_delay_s"))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        submitted = {}
        for sized, members in groups.items():
            params = [
                (list(job_overrides[i]), "hydra.sweep.dir", initial_job_idx + i,
                 f"job_id_for_{initial_job_idx + i}", Singleton.get_state())
                for i in members
            ]  # fmt: skip
            for i in members:
                print(
                    f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))} "
                    f"(SLURM: {', '.join(f'{k}={v}' for k, v in sized)})",
                    flush=True,
                )
            jobs = self.executor(dict(sized)).map_array(self, *zip(*params, strict=True))
            submitted.update(zip(members, jobs, strict=True))
        return [submitted[i].results()[0] for i in range(len(job_overrides))]
