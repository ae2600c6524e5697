"""The report stage on crafted evaluation summaries and training metrics."""
import json

import pytest

from r1pipe.config import RecipeError, validate
from r1pipe.rundir import RunDir
from r1pipe.stages.report import ReportConfig, run


def _eval_run(path, accuracy):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("stage: eval\n")
    (path / "summary.json").write_text(json.dumps({"demo-test": {"pass@1": accuracy, "maj@4": accuracy, "n": 200}}))
    return path


def _train_run(path, losses):
    (path / "checkpoints" / "final").mkdir(parents=True)
    (path / "config.yaml").write_text("stage: sft\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses)))
    return path


def _config(tmp_path, **report):
    data = {"stage": "report", "run": {"name": "report", "output_dir": str(tmp_path / "runs")}, "report": report}
    return validate(ReportConfig, data, "report.yaml")


def test_report_tables_comparisons_and_plots(tmp_path):
    evals = {label: _eval_run(tmp_path / label, acc) for label, acc in
             [("base", 0.2), ("cold-start", 0.5), ("rl", 0.8), ("student", 0.76)]}
    sft = _train_run(tmp_path / "sft", [2.0, 1.0, 0.5])
    cfg = _config(
        tmp_path,
        title="R1 in miniature",
        models=[{"label": k, "eval": str(v)} for k, v in evals.items()],
        training=[{"label": "cold start", "run": str(sft / "checkpoints" / "final"), "metrics": ["loss", "missing"]}],
        compare=[{"model": "rl", "against": "cold-start"}, {"model": "student", "against": "rl"}],
    )
    run_dir = RunDir.open(cfg)
    outputs = run(cfg, run_dir)
    text = (run_dir.path / "report.md").read_text()
    assert "| rl | demo-test | 80.0% | 80.0% |" in text
    assert "rl 80.0% vs cold-start 50.0%: +30.0 points, ratio 1.60" in text
    assert "student 76.0% vs rl 80.0%: -4.0 points, ratio 0.95" in text
    assert "| cold start | 3 | loss 0.5 |" in text
    for key in ("plot_accuracy", "plot_training"):
        assert outputs[key].endswith(".png") and (run_dir.path / "plots").joinpath(outputs[key].rsplit("/", 1)[1]).stat().st_size > 1000
    numbers = json.loads((run_dir.path / "report.json").read_text())
    assert numbers["accuracy"]["student"]["demo-test"]["pass@1"] == 0.76


def test_report_errors_name_the_key(tmp_path):
    good = _eval_run(tmp_path / "base", 0.3)
    cfg = _config(tmp_path, models=[{"label": "base", "eval": str(tmp_path / "nowhere")}])
    with pytest.raises(RecipeError, match="report.models: .*nowhere: no summary.json"):
        run(cfg, RunDir.open(cfg))
    cfg = _config(tmp_path, models=[{"label": "base", "eval": str(good)}], metric="pass@8")
    with pytest.raises(RecipeError, match="report.metric: 'pass@8'"):
        run(cfg, RunDir.open(cfg, overwrite=True))
    cfg = _config(tmp_path, models=[{"label": "base", "eval": str(good)}], compare=[{"model": "rl", "against": "base"}])
    with pytest.raises(RecipeError, match="report.compare: 'rl'"):
        run(cfg, RunDir.open(cfg, overwrite=True))
