"""``python -m reports.build``: read runs from MLflow, write one self-contained report folder.

    python -m reports.build                                   # every run in ./mlflow.db -> report/
    python -m reports.build experiments=[fewstep-bench] metric=fd/train out=report
    python -m reports.build tracking.uri=http://127.0.0.1:5055 "filter=\"tags.data = 'digits16'\""
    python -m reports.build baseline=flow_matching            # + paired differences vs a method
    python -m reports.build group_by=[method.k_ratio] since=2026-11-01

The folder holds ``report.md`` (for a README), ``report.html`` (tables and figures; opens in a
browser with no server and references only files inside the folder), ``table.tex``, ``tidy.csv``
(the data frame every table and figure is made from), ``cells.csv`` (mean, interval, seeds and
mark of every cell), ``figures/`` (PNG, and PDF for ``figures.tex``) and ``grids/``. The builder
never trains or samples; a missing, failed or running run shows up as such, and a store whose
runs all failed or are running gets a report of their status.

Runs differing only in seed are one cell (mean and 95% t-interval over seeds); one identity logged
twice counts once; a column holds one protocol; the winner of a column is marked only when it is
significant (``reports.significance``). docs/reports.md describes every number.
"""

from __future__ import annotations

import html
import os
import shutil
import sys
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from bench.errors import UserError
from reports import figures, tables, timing
from reports.collect import Collected, collect, search


def loss_history(c: Collected, client) -> pd.DataFrame:
    rows = []
    for _, run in c.runs.iterrows():
        label = f"{run['method']} {run['size']} seed {run['seed']}"
        for m in client.get_metric_history(run["run_id"], "train/loss"):
            rows.append({"label": label, "step": m.step, "loss": m.value})
    return pd.DataFrame(rows, columns=["label", "step", "loss"])


def eval_history(client, values: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The curves of evaluation during training (``eval.every``, bench.curves) of every run in
    the table: each logged point of ``curve/<metric>/steps_<N>`` as a row (the run's table row,
    seed, budget N, training step, value). Interval bounds (``curve/<metric>/ci95_low/...``) are
    other metrics and are left out."""
    prefix = f"curve/{metric}/steps_"
    runs = values.drop_duplicates("run_id").set_index("run_id")
    rows = []
    for rid, run in runs.iterrows():
        names = [k for k in client.get_run(rid).data.metrics if k.startswith(prefix)]
        for name in names:
            budget = name[len(prefix) :]
            if not budget.isdigit():
                continue
            for m in client.get_metric_history(rid, name):
                rows.append(
                    {
                        "row": run["row"],
                        "column_tag": run.get("column_tag", ""),
                        "seed": run.get("seed", ""),
                        "budget": int(budget),
                        "step": int(m.step),
                        "value": float(m.value),
                    }
                )
    cols = ["row", "column_tag", "seed", "budget", "step", "value"]
    return pd.DataFrame(rows, columns=cols).sort_values(["row", "budget", "seed", "step"])


def fetch_grids(c: Collected, client, out: Path) -> dict[str, dict[str, Path]]:
    """Sample grids of every run, copied into ``out/grids/<run>/``: {run id: {name: path}}."""
    grids: dict[str, dict[str, Path]] = {}
    for _, run in c.runs.iterrows():
        try:
            names = [a.path for a in client.list_artifacts(run["run_id"], "grids")]
        except Exception:
            continue
        dest = out / "grids" / str(run["run_id"])
        for name in names:
            local = Path(client.download_artifacts(run["run_id"], name, str(dest.parent / "_dl")))
            target = dest / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(local), target)
            grids.setdefault(run["run_id"], {})[target.stem] = target
        shutil.rmtree(dest.parent / "_dl", ignore_errors=True)
    return grids


def grids_per_row(values: pd.DataFrame, grids: dict[str, dict[str, Path]]) -> dict:
    """{table row: {steps: grid}} from the row's first seed that logged grids."""
    out = {}
    for row, g in values.drop_duplicates("run_id").groupby("row"):
        for rid in g.sort_values("seed", key=lambda s: pd.to_numeric(s, errors="coerce"))["run_id"]:
            steps = {
                int(n.split("_")[1]): p
                for n, p in grids.get(rid, {}).items()
                if n.startswith("steps_") and n.split("_")[1].isdigit()
            }
            if steps:
                out[row] = steps
                break
    return out


def run_label(run: pd.Series) -> str:
    return f"{run['data']} / {run['size']} / {run['method']} (seed {run['seed']})"


STYLE = (
    "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
    "table.comparison{border-collapse:collapse;font-size:13px}"
    "table.comparison td,table.comparison th{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}"
    "img{max-width:560px;margin:6px}img.wide{max-width:1100px}"
    ".grid img{width:180px;image-rendering:pixelated}"
    ".note{color:#555}.loud{color:#a00;font-weight:bold}</style>"
)


def render_html(
    title: str,
    protocol: str,
    table_html: str,
    figs: dict,
    skipped: dict,
    grids: dict,
    out: Path,
    notes: list[str],
    significance: list[str],
    legend: list[str],
    paired_html: str = "",
    timing_html: str = "",
) -> str:
    rel = lambda p: p.relative_to(out).as_posix()  # noqa: E731
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title>",
        STYLE,
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p class='note'>{e(protocol)}</p>",
    ]
    parts += [f"<p class='loud'>{e(x)}</p>" for x in legend]
    parts += [table_html, f"<p class='note'>{e(tables.LEGEND)}</p>"]
    if significance:
        parts.append(
            "<h2>Significance</h2><ul>"
            + "".join(f"<li>{e(n)}</li>" for n in significance)
            + "</ul>"
        )
    if paired_html:
        parts += ["<h2>Paired differences</h2>", paired_html]
        parts.append(f"<p class='note'>{e(tables.PAIRED_LEGEND)}</p>")
    if timing_html:
        parts += ["<h2>Estimated vs measured time</h2>", timing_html]
    if notes:
        parts.append(
            "<h2>Notes</h2><ul>"
            + "".join(
                f"<li class='{'loud' if n.isupper() or n.split(':')[0].isupper() else ''}'>{e(n)}</li>"
                for n in notes
            )
            + "</ul>"
        )
    parts.append("<h2>Figures</h2>")
    for name, path in figs.items():
        wide = " class='wide'" if name.startswith("samples") or "compute" in name else ""
        parts.append(
            f"<figure><img{wide} src='{rel(path)}' alt='{e(name)}'>"
            f"<figcaption>{e(name)}</figcaption></figure>"
        )
    if skipped:
        parts.append(
            "<p class='note'>Not shown: "
            + "; ".join(f"{e(k)} ({e(v)})" for k, v in skipped.items())
            + "</p>"
        )
    if grids:
        parts.append("<h2>Samples</h2>")
        for label, named in grids.items():
            cells = "".join(
                f"<figure><img src='{rel(p)}' alt='{e(n)}'><figcaption>{e(n)}</figcaption></figure>"
                for n, p in sorted(named.items(), key=lambda kv: _grid_order(kv[0]))
            )
            parts.append(
                f"<h3>{e(label)}</h3><div class='grid' style='display:flex;flex-wrap:wrap'>{cells}</div>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def _grid_order(name: str) -> tuple[int, str]:
    step = name.split("_")[1] if name.startswith("steps_") else ""
    return (int(step), name) if step.isdigit() else (10**6, name)


def figures_tex(figs: dict, out: Path) -> str:
    """LaTeX figure environments for the PDF twins of the report's figures."""
    blocks = []
    for name, path in figs.items():
        pdf = path.with_suffix(".pdf").relative_to(out).as_posix()
        label = "fig:" + path.stem.replace("_", "-")
        caption = tables._tex_escape(name)
        blocks.append(
            "\\begin{figure}[t]\n\\centering\n"
            f"\\includegraphics[width=\\linewidth]{{{pdf}}}\n"
            f"\\caption{{{caption}}}\n\\label{{{label}}}\n\\end{{figure}}\n"
        )
    return "% \\input{figures.tex} from a document in this folder (needs graphicx)\n" + "\n".join(
        blocks
    )


def status_report(c: Collected, cfg: DictConfig, out: Path) -> Path:
    """A store whose runs measured nothing (all failed or still running): their status table."""
    runs = c.runs.sort_values(["data", "size", "method", "seed"], key=lambda s: s.map(str))
    table = pd.DataFrame(
        {
            "run": [run_label(r) for _, r in runs.iterrows()],
            "status": runs["status"].fillna("unknown").values,
            "reason": runs["reason"].values,
        }
    ).set_index("run")
    head = (
        f"no run logged any metric ({len(runs)} runs: "
        + ", ".join(f"{n} {s}" for s, n in sorted(runs["status"].value_counts().items()))
        + ")"
    )
    (out / "report.md").write_text(
        f"# {cfg.title}\n\n_{head}_\n\n{table.to_markdown()}\n"
        + "".join(f"\n- {n}" for n in c.notes)
        + "\n"
    )
    (out / "report.html").write_text(
        "\n".join(
            [
                "<!DOCTYPE html>",
                "<html lang='en'><head><meta charset='utf-8'>",
                f"<title>{html.escape(cfg.title)}</title>{STYLE}</head><body>",
                f"<h1>{html.escape(cfg.title)}</h1><p class='loud'>{html.escape(head)}</p>",
                table.to_html(classes="comparison", border=0),
                "".join(f"<p class='note'>{html.escape(n)}</p>" for n in c.notes),
                "</body></html>",
            ]
        )
    )
    (out / "table.tex").write_text(f"% {head}\n" + table.to_latex())
    c.tidy.to_csv(out / "tidy.csv", index=False)
    print(f"report: {out.resolve()}/report.html ({head})")
    return out


def select_budgets(c: Collected, budgets) -> list[int] | None:
    """Keep the columns of ``budgets`` (step counts) only, in place; None keeps every budget.
    A shared run reused by a smaller experiment carries the budgets of both (a run evaluated at
    1..128 steps in a table of 1 / 4 / 128); the table is the experiment's."""
    if budgets is None or (OmegaConf.is_list(budgets) or isinstance(budgets, list)) and not budgets:
        return None
    values = list(budgets) if OmegaConf.is_list(budgets) or isinstance(budgets, list) else [budgets]
    shown = f"[{', '.join(map(str, values))}]"
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(
                f"budgets={shown}: {v} is not a step count; allowed are whole numbers of steps "
                "from 1, e.g. budgets=[1,4,128]"
            )
    logged = sorted(set(int(x) for x in c.tidy["steps"]))
    kept = c.tidy[c.tidy["steps"].isin(values)]
    if kept.empty:
        raise UserError(
            f"budgets={shown}: none was logged by these runs; logged: {', '.join(map(str, logged))}"
        )
    c.tidy = kept
    return sorted(set(values))


def build(cfg: DictConfig) -> Path:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    df = search(cfg.tracking.uri, list(cfg.experiments) or None, cfg.filter or "", cfg.since)
    c = collect(df, list(cfg.group_by))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metric = cfg.metric
    if c.tidy.empty:
        return status_report(c, cfg, out)
    shown = select_budgets(c, cfg.get("budgets"))
    if metric not in set(c.tidy["metric"]):
        known = ", ".join(sorted(set(c.tidy["metric"]))) or "none"
        raise UserError(f"metric {metric!r} was not logged by these runs; logged: {known}")
    row_keys = tables.ROW_KEYS + tuple(cfg.group_by)
    table = tables.comparison(c, metric, row_keys, cfg.get("protocols", "split"))
    protocol = tables.protocol_line(c, metric)
    if shown:
        listed = ", ".join(map(str, shown))
        protocol += f"; step budgets shown: {listed} (budgets=[{listed}])"
    significance = [tables.significance_summary(table)] + tables.significance_notes(table)
    baseline = cfg.get("baseline")
    paired = (
        tables.paired_differences(c, metric, str(baseline), row_keys, table) if baseline else None
    )

    client = mlflow.tracking.MlflowClient()
    _, values = tables.cell_frame(c, metric, row_keys)
    tag = {(col.steps, col.protocol): col.tag for col in table.columns}
    values["column_tag"] = [
        tag.get((s, p), "") for s, p in zip(values["steps"], values["protocol"], strict=True)
    ]
    grids = fetch_grids(c, client, out) if cfg.grids else {}
    fig_dir = out / "figures"
    lower = tables.lower_is_better(metric)
    made = {
        f"{metric} vs NFE": figures.metric_vs_nfe(values, metric, fig_dir / "metric_vs_nfe.png"),
        f"{metric} vs training compute": figures.metric_vs_compute(
            values, metric, fig_dir / "metric_vs_compute.png", lower
        ),
        "samples at 1 / 4 / 128 steps": figures.samples_side_by_side(
            grids_per_row(values, grids), fig_dir / "samples.png"
        ),
        f"{metric} vs model size": figures.metric_vs_size(
            values, metric, fig_dir / "metric_vs_size.png"
        ),
        "k-ratio ablation": figures.k_ratio_ablation(values, metric, fig_dir / "k_ratio.png"),
        "training loss": figures.loss_curves(loss_history(c, client), fig_dir / "loss.png"),
        f"{metric} during training": figures.eval_curves(
            curves := eval_history(client, values, metric), metric, fig_dir / "eval_curves.png"
        ),
    }
    if not curves.empty:
        curves.to_csv(out / "eval_curves.csv", index=False)
    figs = {k: v for k, v in made.items() if isinstance(v, Path)}
    skipped = {k: v for k, v in made.items() if isinstance(v, str)}
    labels = {r["run_id"]: run_label(r) for _, r in c.runs.iterrows()}
    run_grids = {labels[rid]: g for rid, g in grids.items() if rid in labels}

    bad = c.runs[c.runs["status"] != "FINISHED"]
    notes = list(c.notes) + [
        f"{r['run_name']}: {r['status']}" + (f" ({r['reason']})" if r["reason"] else "")
        for _, r in bad.iterrows()
    ]
    title = cfg.title
    md = [f"# {title}", "", f"_{protocol}_", ""]
    md += [f"**{x}**" if i == 0 else f"- {x}" for i, x in enumerate(table.legend)]
    md += ["", tables.to_markdown(table), "", tables.LEGEND, ""]
    md += [f"- {s}" for s in significance]
    if paired is not None:
        md += ["", f"## Paired differences vs {paired.baseline}", ""]
        md += [
            tables.paired_frame(paired, lambda x: f"**{x}**").to_markdown(disable_numparse=True),
            "",
        ]
        md += [tables.PAIRED_LEGEND]
    estimates = timing.estimate_frame(c.runs)
    timing_lines = timing.summary(estimates, c.runs)
    if timing_lines:
        md += ["", "## Estimated vs measured time", ""] + [f"- {x}" for x in timing_lines]
    if not estimates.empty:
        shown = timing.table(estimates)
        md += ["", shown.to_markdown(index=False, disable_numparse=True)]
        estimates.to_csv(out / "timing.csv", index=False)
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    md += ["", "## Figures", ""] + [
        f"![{k}]({v.relative_to(out).as_posix()})" for k, v in figs.items()
    ]
    md += [f"- not shown: {k} ({v})" for k, v in skipped.items()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    paired_html = (
        tables.paired_frame(paired, lambda x: f"<b>{x}</b>").to_html(
            escape=False, classes="comparison", border=0
        )
        if paired is not None
        else ""
    )
    (out / "report.html").write_text(
        render_html(
            title,
            protocol,
            tables.to_html(table),
            figs,
            skipped,
            run_grids,
            out,
            notes,
            significance,
            table.legend,
            paired_html,
            "".join(f"<p class='note'>{html.escape(x)}</p>" for x in timing_lines)
            + (
                timing.table(estimates).to_html(index=False, classes="comparison", border=0)
                if not estimates.empty
                else ""
            ),
        )
    )
    tex = [f"% {protocol}"] + [f"% {x}" for x in table.legend] + [f"% {s}" for s in significance]
    tex.append(tables.to_latex(table))
    if paired is not None:
        frame = tables.paired_frame(paired, lambda x: "\\textbf{" + x + "}")
        frame = frame.map(tables._tex_escape)
        frame.index = [tables._tex_escape(i) for i in frame.index]
        frame.index.name = None
        tex.append(
            frame.to_latex(
                escape=False,
                caption=f"paired difference vs {tables._tex_escape(paired.baseline)}",
                label="tab:paired",
            )
        )
    (out / "table.tex").write_text("\n".join(tex))
    (out / "figures.tex").write_text(figures_tex(figs, out))
    c.tidy.to_csv(out / "tidy.csv", index=False)
    tables.summary(table).to_csv(out / "cells.csv", index=False)
    print(f"report: {out.resolve()}/report.html ({len(c.runs)} runs; {protocol})")
    return out


@hydra.main(config_path=".", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        build(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
