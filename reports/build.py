"""``python -m reports.build``: read runs from MLflow, write one self-contained report folder.

    python -m reports.build                                   # every run in ./mlflow.db -> report/
    python -m reports.build experiments=[fewstep-bench] metric=fd/train out=report
    python -m reports.build tracking.uri=http://127.0.0.1:5055 "filter=tags.data = 'digits16'"
    python -m reports.build group_by=[method.k_ratio] since=2026-11-01

The folder holds ``report.md`` (for a README), ``report.html`` (tables and figures; opens in a
browser with no server and references only files inside the folder), ``table.tex``, ``tidy.csv``
(the data frame every table and figure is made from), ``figures/`` and ``grids/``. The builder
never trains or samples; a missing, failed or running run shows up as such.
"""

from __future__ import annotations

import html
import os
import shutil
import sys
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig

from bench.errors import UserError
from reports import figures, tables
from reports.collect import Collected, collect, search


def loss_history(c: Collected, client) -> pd.DataFrame:
    rows = []
    for _, run in c.runs.iterrows():
        label = f"{run['method']} {run['size']} seed {run['seed']}"
        for m in client.get_metric_history(run["run_id"], "train/loss"):
            rows.append({"label": label, "step": m.step, "loss": m.value})
    return pd.DataFrame(rows, columns=["label", "step", "loss"])


def fetch_grids(c: Collected, client, out: Path) -> dict[str, dict[str, Path]]:
    """Sample grids of every run, copied into ``out/grids/<run>/``: {run label: {name: path}}."""
    grids: dict[str, dict[str, Path]] = {}
    for _, run in c.runs.iterrows():
        try:
            names = [a.path for a in client.list_artifacts(run["run_id"], "grids")]
        except Exception:
            continue
        label = f"{run['data']} / {run['size']} / {run['method']} (seed {run['seed']})"
        dest = out / "grids" / str(run["run_id"])
        for name in names:
            local = Path(client.download_artifacts(run["run_id"], name, str(dest.parent / "_dl")))
            target = dest / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(local), target)
            grids.setdefault(label, {})[target.stem] = target
        shutil.rmtree(dest.parent / "_dl", ignore_errors=True)
    return grids


def render_html(
    title: str,
    protocol: str,
    table: tables.Table,
    figs: dict,
    skipped: dict,
    grids: dict,
    out: Path,
    notes: list[str],
) -> str:
    rel = lambda p: p.relative_to(out).as_posix()  # noqa: E731
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table.comparison{border-collapse:collapse;font-size:13px}"
        "table.comparison td,table.comparison th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "img{max-width:560px;margin:6px}.grid img{width:180px;image-rendering:pixelated}"
        ".note{color:#555}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{html.escape(protocol)}</p>",
        tables.to_html(table),
        "<p class='note'>Bold: best mean per column. Cells: mean ± sample std over seeds; "
        "empty cells say why (failed with its reason, running, not measured).</p>",
    ]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Figures</h2>")
    for name, path in figs.items():
        parts.append(
            f"<figure><img src='{rel(path)}' alt='{html.escape(name)}'>"
            f"<figcaption>{html.escape(name)}</figcaption></figure>"
        )
    if skipped:
        parts.append(
            "<p class='note'>Not shown: "
            + "; ".join(f"{html.escape(k)} ({html.escape(v)})" for k, v in skipped.items())
            + "</p>"
        )
    if grids:
        parts.append("<h2>Samples</h2>")
        for label, named in grids.items():
            cells = "".join(
                f"<figure><img src='{rel(p)}' alt='{html.escape(n)}'>"
                f"<figcaption>{html.escape(n)}</figcaption></figure>"
                for n, p in sorted(named.items(), key=lambda kv: _grid_order(kv[0]))
            )
            parts.append(
                f"<h3>{html.escape(label)}</h3><div class='grid' style='display:flex;flex-wrap:wrap'>{cells}</div>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def _grid_order(name: str) -> tuple[int, str]:
    return (int(name.split("_")[1]), name) if name.startswith("steps_") else (10**6, name)


def build(cfg: DictConfig) -> Path:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    df = search(cfg.tracking.uri, list(cfg.experiments) or None, cfg.filter or "", cfg.since)
    c = collect(df, list(cfg.group_by))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metric = cfg.metric
    if metric not in set(c.tidy["metric"]):
        known = ", ".join(sorted(set(c.tidy["metric"]))) or "none"
        raise UserError(f"metric {metric!r} was not logged by these runs; logged: {known}")
    row_keys = tables.ROW_KEYS + tuple(cfg.group_by)
    table = tables.comparison(c, metric, row_keys)
    protocol = tables.protocol_line(c, metric)

    client = mlflow.tracking.MlflowClient()
    fig_dir = out / "figures"
    made = {
        f"{metric} vs NFE": figures.metric_vs_nfe(c.tidy, metric, fig_dir / "metric_vs_nfe.png"),
        f"{metric} vs model size": figures.metric_vs_size(
            c.tidy, metric, fig_dir / "metric_vs_size.png"
        ),
        "k-ratio ablation": figures.k_ratio_ablation(c.tidy, metric, fig_dir / "k_ratio.png"),
        f"{metric} vs training compute": figures.metric_vs_compute(
            c.tidy, metric, fig_dir / "metric_vs_compute.png"
        ),
        "training loss": figures.loss_curves(loss_history(c, client), fig_dir / "loss.png"),
    }
    figs = {k: v for k, v in made.items() if isinstance(v, Path)}
    skipped = {k: v for k, v in made.items() if isinstance(v, str)}
    grids = fetch_grids(c, client, out) if cfg.grids else {}

    bad = c.runs[c.runs["status"] != "FINISHED"]
    notes = [
        f"{r['run_name']}: {r['status']}" + (f" ({r['reason']})" if r["reason"] else "")
        for _, r in bad.iterrows()
    ]
    title = cfg.title
    md = [
        f"# {title}",
        "",
        f"_{protocol}_",
        "",
        tables.to_markdown(table),
        "",
        "Bold: best mean per column; mean ± sample std over seeds.",
        "",
    ]
    md += [f"- {n}" for n in notes]
    md += ["", "## Figures", ""] + [
        f"![{k}]({v.relative_to(out).as_posix()})" for k, v in figs.items()
    ]
    md += [f"- not shown: {k} ({v})" for k, v in skipped.items()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(
        render_html(title, protocol, table, figs, skipped, grids, out, notes)
    )
    (out / "table.tex").write_text(f"% {protocol}\n" + tables.to_latex(table))
    c.tidy.to_csv(out / "tidy.csv", index=False)
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
