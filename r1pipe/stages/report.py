"""Stage `report`: a pipeline's evaluations and training curves in one markdown page with plots.

Reads each listed evaluation run (its `summary.json`) and each training run (its
`metrics.jsonl`), and writes into the run directory:

    report.md                  accuracy table, comparisons between models, training summary
    plots/accuracy.png         held-out accuracy per model and benchmark
    plots/training.png         the chosen training curves, one panel per run
    report.json                the same numbers, for scripts
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from r1pipe.config import RecipeError, Section, StageConfig, register_stage


class ModelEntry(Section):
    label: str = Field(description="Name of the model in the report (e.g. base, cold-start, rl, student).")
    eval: Path = Field(description="Evaluation run directory (or its summary.json) of this model.")


class CurveEntry(Section):
    label: str = Field(description="Name of the training run in the report.")
    run: Path = Field(description="Training run directory (or any path inside it, e.g. its checkpoint).")
    metrics: list[str] = Field(description="metrics.jsonl keys to plot (keys never logged are skipped).")


class Comparison(Section):
    model: str = Field(description="Label of the model to compare.")
    against: str = Field(description="Label of the model it is compared with.")


class ReportSection(Section):
    title: str = Field("r1pipe report", description="Title of report.md.")
    metric: str = Field("pass@1", description="Summary metric plotted and compared (e.g. pass@1, maj@k).")
    models: list[ModelEntry] = Field(min_length=1, description="Evaluated models, in the order to show them.")
    training: list[CurveEntry] = Field(default_factory=list, description="Training runs whose curves to plot.")
    compare: list[Comparison] = Field(
        default_factory=list, description="Pairs reported as a difference in points and a ratio."
    )
    notes: str = Field("", description="Free text placed under the title (setup, seeds, hardware).")


class ReportConfig(StageConfig):
    report: ReportSection = Field(description="What the report collects.")


def read_summary(path: Path) -> dict[str, dict[str, float]]:
    """{benchmark: {metric: value}} from an evaluation run's summary.json."""
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise RecipeError(f"report.models: {path}: no summary.json (is it an eval run directory?)")
    data = json.loads(file.read_text())
    benchmarks = data.get("benchmarks", data)
    if not isinstance(benchmarks, dict) or not all(isinstance(v, dict) for v in benchmarks.values()):
        raise RecipeError(f"report.models: {file}: expected {{benchmark: {{metric: value}}}}")
    return {
        name: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, metrics in benchmarks.items()
    }


def find_run_dir(path: Path) -> Path:
    """The run directory containing ``path`` (the nearest ancestor holding config.yaml)."""
    for candidate in (path, *path.parents):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RecipeError(f"report.training: {path} is not inside an r1pipe run directory")


def read_metrics(run_dir: Path) -> list[dict]:
    file = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.is_file() else []


def plot_accuracy(table: dict[str, dict[str, dict[str, float]]], metric: str, out: Path) -> Path:
    """Grouped bars: one group per benchmark, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(table)
    benchmarks = sorted({b for per_model in table.values() for b in per_model})
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(benchmarks) * len(models) / 2), 3.4))
    for i, model in enumerate(models):
        values = [100 * table[model].get(b, {}).get(metric, float("nan")) for b in benchmarks]
        bars = ax.bar([j + i * width for j in range(len(benchmarks))], values, width, label=model)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(benchmarks))], benchmarks)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_training(curves: list[tuple[CurveEntry, list[dict]]], out: Path) -> Path | None:
    """One panel per training run with its chosen metrics against step."""
    panels = [(entry, records) for entry, records in curves if records]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (entry, records) in zip(axes.flat, panels, strict=False):
        for key in entry.metrics:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points, strict=True), lw=1.2, label=key)
        ax.set_title(entry.label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def render_markdown(cfg: ReportSection, table, comparisons, training_rows, plots) -> str:
    benchmarks = sorted({b for per_model in table.values() for b in per_model})
    metrics = sorted({m for per_model in table.values() for per_bench in per_model.values() for m in per_bench})
    shown = [m for m in metrics if m != "n"] or metrics
    lines = [f"# {cfg.title}", ""]
    if cfg.notes:
        lines += [cfg.notes.strip(), ""]
    lines += ["## Held-out accuracy", ""]
    header = ["model", "benchmark", *shown]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, per_model in table.items():
        for bench in benchmarks:
            values = per_model.get(bench, {})
            cells = [_fmt(values.get(m)) for m in shown]
            lines.append("| " + " | ".join([model, bench, *cells]) + " |")
    if comparisons:
        lines += ["", f"## Comparisons ({cfg.metric})", ""]
        lines += [f"- {c['benchmark']}: {c['model']} {c['value']:.1%} vs {c['against']} {c['reference']:.1%}: "
                  f"{c['points']:+.1f} points, ratio {c['ratio']:.2f}" for c in comparisons]
    if training_rows:
        lines += ["", "## Training runs", "", "| run | steps | final metrics |", "|---|---|---|"]
        lines += [f"| {label} | {steps} | {final} |" for label, steps, final in training_rows]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}](plots/{name}.png)" for name in plots]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if 0 <= value <= 1 else f"{value:g}"


def compare(table, metric: str, pairs: list[Comparison]) -> list[dict]:
    """Difference (points) and ratio of `metric` for each pair, on every benchmark both have."""
    rows = []
    for pair in pairs:
        for label in (pair.model, pair.against):
            if label not in table:
                raise RecipeError(f"report.compare: {label!r} is not a model label ({', '.join(table)})")
        for bench, values in table[pair.model].items():
            value, reference = values.get(metric), table[pair.against].get(bench, {}).get(metric)
            if value is None or reference is None:
                continue
            rows.append({
                "model": pair.model, "against": pair.against, "benchmark": bench, "value": value,
                "reference": reference, "points": 100 * (value - reference),
                "ratio": value / reference if reference else float("inf"),
            })
    return rows


@register_stage("report", ReportConfig,
                summary="collect a pipeline's evaluations into a markdown report with plots")
def run(cfg: ReportConfig, run_dir) -> dict:
    section = cfg.report
    labels = [m.label for m in section.models]
    if len(set(labels)) != len(labels):
        raise RecipeError("report.models: labels must be distinct")
    table = {m.label: read_summary(m.eval) for m in section.models}
    missing = [label for label, per_model in table.items() if not any(section.metric in v for v in per_model.values())]
    if missing:
        raise RecipeError(f"report.metric: {section.metric!r} is not in the summary of {', '.join(missing)}")
    comparisons = compare(table, section.metric, section.compare)
    curves = [(entry, read_metrics(find_run_dir(entry.run))) for entry in section.training]
    training_rows = []
    for entry, records in curves:
        last = {k: records[-1][k] for k in entry.metrics if records and k in records[-1]}
        final = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, (int, float))) or "-"
        training_rows.append((entry.label, records[-1]["step"] if records else 0, final))

    plots = {"accuracy": plot_accuracy(table, section.metric, run_dir.path / "plots" / "accuracy.png")}
    training_plot = plot_training(curves, run_dir.path / "plots" / "training.png")
    if training_plot is not None:
        plots["training"] = training_plot
    report = run_dir.path / "report.md"
    report.write_text(render_markdown(section, table, comparisons, training_rows, plots))
    (run_dir.path / "report.json").write_text(json.dumps({"accuracy": table, "comparisons": comparisons}, indent=2))
    for row in comparisons:
        run_dir.logger.info("%s vs %s on %s: %+.1f points (ratio %.2f)", row["model"], row["against"],
                            row["benchmark"], row["points"], row["ratio"])
    run_dir.logger.info("report written to %s", report)
    return {"report": str(report), **{f"plot_{k}": str(v) for k, v in plots.items()}}
