"""The analysis stage on real runs written by reproduce/train/: the teacher method, the vanilla student, KD
and DML, two seeds each, trained once for the module on digits with a validation split (selection "val"),
and a smaller set trained with the paper protocol (no validation split, selection "test"). Numbers in the
tables are checked against the runs' own files. tests/test_analysis_protocol.py checks the conventions
on hand-written runs with hand-computed numbers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from markupsafe import escape

from analysis.__main__ import main
from analysis.calibration import T_MAX, T_MIN
from analysis.report import run_analysis
from analysis.tables import FROZEN, NO_TS, latex_escape
from reproduce.config import load_config
from reproduce.data.prepare import prepare
from reproduce.train import RunSpec, train
from reproduce.metrics import expected_calibration_error, fit_temperature, temperature_scaled
from conftest import PROJECT, tiny_config
from sweeps.report import write_results

pytestmark = pytest.mark.slow  # every test here reads runs trained for the module (about a minute on 2 cores)

LABELS = ("teacher", "vanilla", "kd", "dml")
SEEDS = (0, 1)
UNPUBLISHED = ("bdkd", "aekt", "sokd", "r2kd")


@pytest.fixture(scope="module")
def runs_root(prepared_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/<label>/seed<k>/ as the pipeline lays them out; KD distils from runs/teacher/seed0."""
    tmp = tmp_path_factory.mktemp("analysis-runs")
    root = tmp / "runs"
    train_suite(prepared_root, tmp, root, {"teacher": SEEDS, "vanilla": SEEDS, "kd": SEEDS, "dml": SEEDS})
    return root


def train_suite(prepared_root: Path, tmp: Path, root: Path, seeds: dict[str, tuple[int, ...]]) -> None:
    teacher = {"seed": 0, "runs_root": str(root / "teacher")}
    for method, method_seeds in seeds.items():
        sections = {"recipe": {"epochs": 3}} if method == "teacher" else {}
        for seed in method_seeds:
            config = tiny_config(prepared_root, tmp, teacher=teacher, **sections)
            run = f"{method}/seed{seed}"
            train(config, RunSpec(method, seed, root / run, tmp / "checkpoints" / run), track=False)


@pytest.fixture(scope="module")
def paper_runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The paper protocol: digits prepared without a validation split; teacher, vanilla and KD."""
    tmp = tmp_path_factory.mktemp("analysis-paper-runs")
    prepared = tmp / "prepared"
    prepare("digits", tmp / "raw", prepared, val_fraction=0.0, split_seed=0, progress=False)
    root = tmp / "runs"
    train_suite(prepared, tmp, root, {"teacher": (0,), "vanilla": SEEDS, "kd": SEEDS})
    return root


def write_params(path: Path, val_fraction: float = 0.15, **analysis: object) -> Path:
    """The project's params.yaml, set to the runs' models, with small PNGs (fast) and the shipped
    published results."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["models"] = {"teacher": "resnet8", "student": "resnet8"}
    params["dataset"]["val_fraction"] = val_fraction
    params["tracking"]["wandb"]["enabled"] = False
    params["analysis"] = {**params.get("analysis", {}), "png_dpi": 80, "pdf": True,
                          "published_results": str(PROJECT / "analysis" / "published_results.yaml"), **analysis}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reports(runs_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m analysis` on the runs, with no sweep results."""
    tmp = tmp_path_factory.mktemp("analysis-out")
    params = write_params(tmp / "params.yaml")
    code = main(["--runs", str(runs_root), "--sweeps", str(tmp / "sweeps" / "results"), "--out", str(tmp / "reports"),
                 "--params", str(params), "--no-track"])
    assert code == 0
    return tmp / "reports"


def metrics_of(runs_root: Path, label: str) -> list[dict]:
    return [json.loads((runs_root / label / f"seed{seed}" / "metrics.json").read_text()) for seed in SEEDS]


def mean_std(values: list[float]) -> tuple[float, float]:
    series = pd.Series(values, dtype=float)
    return float(series.mean()), float(series.std(ddof=1))


# ----------------------------------------------------------------------------------------------
# Comparison table


@pytest.mark.parametrize(("network", "epoch", "metric", "scale"), [
    ("student", "best", "top1", 1), ("student", "last", "top1", 1), ("teacher", "best", "top1", 1),
    ("teacher", "last", "top1", 1), ("student", "best", "ece", 100), ("student", "best", "nll", 1)])
def test_comparison_numbers_are_mean_and_std_over_seeds_of_metrics_json(
        runs_root: Path, reports: Path, network: str, epoch: str, metric: str, scale: int) -> None:
    table = pd.read_csv(reports / "tables" / "comparison.csv").set_index("label")
    key = f"{network}_{metric}_{epoch}" + ("_pct" if scale == 100 else "")
    checked = 0
    for label in LABELS:
        runs = metrics_of(runs_root, label)
        assert {run["selection"] for run in runs} == {"val"}
        if network not in runs[0]["networks"] or (label == "kd" and network == "teacher"):  # kd's is frozen
            assert table.loc[label, f"{key}_n"] == 0 and pd.isna(table.loc[label, f"{key}_mean"])
            assert bool(table.loc[label, f"{key}_frozen"]) == (label == "kd")
            continue
        mean, std = mean_std([run[epoch]["test"][network][metric] * scale for run in runs])
        assert table.loc[label, f"{key}_mean"] == pytest.approx(mean, rel=1e-6)
        assert table.loc[label, f"{key}_std"] == pytest.approx(std, rel=1e-6, abs=1e-9)
        assert table.loc[label, f"{key}_n"] == len(SEEDS) == table.loc[label, "seeds"]
        checked += 1
    assert checked >= 2


def test_comparison_rows_follow_the_method_order(reports: Path) -> None:
    table = pd.read_csv(reports / "tables" / "comparison.csv")
    assert list(table["label"]) == list(LABELS)
    markdown = (reports / "tables" / "comparison.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["Teacher (vanilla)", "Vanilla student", "KD", "DML"]
    assert all(row.rstrip(" |").endswith("2") for row in rows)  # the seed count closes every row


@pytest.mark.parametrize(("key", "better"), [("student_top1_best", max), ("student_ece_best_pct", min),
                                               ("teacher_top1_last", max), ("student_brier_best", min)])
def test_best_value_per_column_is_bold_in_every_format(reports: Path, key: str, better) -> None:
    table = pd.read_csv(reports / "tables" / "comparison.csv").set_index("label")
    means = table[f"{key}_mean"].dropna()
    digits = 3 if "brier" in key else 2
    winner = means.round(digits).idxmax() if better is max else means.round(digits).idxmin()
    assert table.loc[winner, f"{key}_is_best"]
    assert table[f"{key}_is_best"].sum() == (means.round(digits) == means.round(digits)[winner]).sum()
    shown = f"{means[winner]:.{digits}f}"
    markdown = (reports / "tables" / "comparison.md").read_text()
    latex = (reports / "tables" / "comparison.tex").read_text()
    assert re.search(rf"\*\*{re.escape(shown)}( ± [0-9.]+)?\*\*", markdown)
    assert re.search(rf"\\textbf\{{{re.escape(shown)}( \$\\pm\$ [0-9.]+)?\}}", latex)


def test_latex_table_is_booktabs_and_escaped(reports: Path) -> None:
    latex = (reports / "tables" / "comparison.tex").read_text()
    for command in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lrrrrrrrrrr}"):
        assert command in latex
    assert "ECE (\\%)" in latex and "±" not in latex and "$\\pm$" in latex and "$\\Delta$" in latex
    assert latex_escape("a_b & 5% → c") == r"a\_b \& 5\% $\rightarrow$ c"


# ----------------------------------------------------------------------------------------------
# Calibration


def test_temperature_is_fitted_on_validation_and_applied_to_test(runs_root: Path, reports: Path) -> None:
    temperatures, scaled_eces, test_fitted = [], [], []
    for seed in SEEDS:
        predictions = torch.load(runs_root / "kd" / f"seed{seed}" / "predictions.pt", map_location="cpu",
                                 weights_only=True)
        val, test = predictions["best"]["val"]["student"], predictions["best"]["test"]["student"]
        temperature = fit_temperature(val, predictions["labels"]["val"], lowest=T_MIN, highest=T_MAX)
        temperatures.append(temperature)
        scaled_eces.append(100 * expected_calibration_error(temperature_scaled(test, temperature),
                                                            predictions["labels"]["test"]))
        test_fitted.append(fit_temperature(test, predictions["labels"]["test"], lowest=T_MIN, highest=T_MAX))
    table = pd.read_csv(reports / "tables" / "calibration.csv").set_index(["label", "network"])
    row = table.loc[("kd", "student")]
    interior = [temperature for temperature in temperatures if temperature not in (T_MIN, T_MAX)]
    assert row["temperature_at_bound_n"] == len(SEEDS) - len(interior) and row["temperature_n"] == len(interior)
    if interior:  # the mean temperature is that of the fits inside the bounds
        assert row["temperature_mean"] == pytest.approx(mean_std(interior)[0], abs=1e-6)
        # A fit on the test logits gives a different temperature: the table must hold the validation one.
        val_gap = abs(row["temperature_mean"] - mean_std(interior)[0])
        assert val_gap < abs(row["temperature_mean"] - mean_std(test_fitted)[0])
    assert row["ece_ts_pct_mean"] == pytest.approx(mean_std(scaled_eces)[0], abs=1e-3)  # every fit is applied
    comparison = pd.read_csv(reports / "tables" / "comparison.csv").set_index("label")
    assert comparison.loc["kd", "student_ece_ts_pct_mean"] == pytest.approx(row["ece_ts_pct_mean"])


def test_calibration_table_lists_every_network_of_every_run(runs_root: Path, reports: Path) -> None:
    table = pd.read_csv(reports / "tables" / "calibration.csv")
    expected = {(label, network) for label in LABELS for network in metrics_of(runs_root, label)[0]["networks"]}
    assert ("kd", "teacher") in expected  # evaluated in the run, but it is the teacher row's network
    assert set(zip(table["label"], table["network"])) == expected - {("kd", "teacher")}
    for column in ("top1_best", "ece_best_pct", "ece_ts_pct", "adaptive_ece_best_pct", "adaptive_ece_ts_pct",
                   "mce_supported_best_pct", "mce_supported_ts_pct", "nll_best", "nll_ts", "brier_best", "brier_ts"):
        assert table[f"{column}_mean"].notna().all() and (table[f"{column}_n"] == 2).all(), column
    # Every network has two fits: inside the bounds (averaged) or at one (counted only).
    assert (table["temperature_n"] + table["temperature_at_bound_n"] == 2).all()


# ----------------------------------------------------------------------------------------------
# Paper vs reproduced


def test_digits_runs_are_never_compared_with_published_numbers(reports: Path) -> None:
    table = pd.read_csv(reports / "tables" / "paper_vs_reproduced.csv")
    assert set(table["dataset"]) == {"digits"}
    assert table["published_top1"].isna().all()  # nothing published matches digits
    markdown = (reports / "tables" / "paper_vs_reproduced.md").read_text()
    assert "No published number exists for this dataset/pair (digits, resnet8→resnet8)" in markdown
    reference = pd.read_csv(reports / "tables" / "paper_reference.csv")
    assert set(reference["dataset"]) == {"cifar100"}
    assert not any(column.startswith("reproduced") for column in reference.columns)
    assert {"kd", "vanilla", "teacher", "dml"} <= set(reference["label"])
    kd = reference[(reference["label"] == "kd") & (reference["teacher"] == "resnet32x4")
                   & (reference["student"] == "resnet8x4")]
    assert kd["published_top1"].tolist() == [73.33]


def test_methods_without_published_numbers_say_not_published(reports: Path) -> None:
    table = pd.read_csv(reports / "tables" / "paper_vs_reproduced.csv").set_index("label")
    for label in UNPUBLISHED:
        assert table.loc[label, "status"] == "not published"
        assert pd.isna(table.loc[label, "published_top1"]) and table.loc[label, "reproduced_seeds"] == 0
    markdown = (reports / "tables" / "paper_vs_reproduced.md").read_text()
    for name in ("BD-KD", "AEKT", "SOKD", "R2KD"):
        assert re.search(rf"\| {name} \|.*not published", markdown)


# ----------------------------------------------------------------------------------------------
# Report page, summary, figures


def test_index_html_is_self_contained_and_holds_the_run_metadata(runs_root: Path, reports: Path) -> None:
    page = (reports / "index.html").read_text()
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert len(sources) == len(list((reports / "figures").glob("*.png"))) >= 10
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert all(link.startswith("#") for link in re.findall(r'\bhref="([^"]*)"', page))
    assert not re.search(r"<script|<link|@import|url\(", page)
    assert not re.search(r'(src|href)="(https?:)?//', page)
    metrics = metrics_of(runs_root, "kd")[0]
    for expected in ("digits", "resnet8", metrics["environment"]["torch"], metrics["environment"]["python"],
                     "Training commits:", "Seeds — teacher: 0, 1; vanilla: 0, 1; kd: 0, 1; dml: 0, 1",
                     "recipe:", "tracking:", "No published number exists", "not published"):
        assert expected in page, expected


def test_missing_sweeps_are_reported(reports: Path) -> None:
    page = (reports / "index.html").read_text()
    assert "No sweep was run" in page
    assert not list((reports / "figures").glob("sweep_*"))


def test_summary_json_holds_the_aggregated_numbers(runs_root: Path, reports: Path) -> None:
    summary = json.loads((reports / "summary.json").read_text())
    assert (summary["dataset"], summary["teacher"], summary["student"]) == ("digits", "resnet8", "resnet8")
    assert summary["selection"] == "val" and summary["best_epoch"] == "best epoch, selected on validation"
    assert list(summary["methods"]) == list(LABELS)
    kd = summary["methods"]["kd"]
    assert kd["seeds"] == 2 and not any(key.startswith("teacher_") for key in kd)  # its teacher is frozen
    mean, _ = mean_std([run["last"]["test"]["student"]["top1"] for run in metrics_of(runs_root, "kd")])
    assert kd["student_top1_last"] == pytest.approx(mean, abs=1e-4)
    ece, _ = mean_std([100 * run["best"]["test"]["student"]["ece"] for run in metrics_of(runs_root, "kd")])
    assert kd["student_ece_pct_best"] == pytest.approx(ece, abs=1e-4)
    teacher, _ = mean_std([run["best"]["test"]["teacher"]["top1"] for run in metrics_of(runs_root, "dml")])
    assert summary["methods"]["dml"]["teacher_top1_best"] == pytest.approx(teacher, abs=1e-4)


def test_figures_are_written_as_png_and_pdf(reports: Path) -> None:
    stems = {"reliability_students", "reliability_students_ts", "reliability_kd_student", "reliability_dml_teacher",
             "reliability_teacher_teacher", "curves_overview", *(f"curves_{label}" for label in LABELS)}
    for stem in stems:
        for suffix in (".png", ".pdf"):
            assert (reports / "figures" / f"{stem}{suffix}").stat().st_size > 1000, stem + suffix
    assert not (reports / "figures" / "reliability_kd_teacher.png").exists()  # the frozen teacher: drawn once
    assert not list((reports / "figures").glob("signals_*"))  # none of these methods logs a signal


def test_curated_tsvs_are_the_mean_of_the_histories(runs_root: Path, reports: Path) -> None:
    histories = {label: [pd.read_csv(runs_root / label / f"seed{seed}" / "history.tsv", sep="\t") for seed in SEEDS]
                 for label in LABELS}
    ece = pd.read_csv(reports / "plots" / "student_test_ece.tsv", sep="\t").set_index("epoch")
    assert list(ece.columns) == ["vanilla", "kd", "dml"]
    for label in ece.columns:
        expected = pd.concat(histories[label]).groupby("epoch")["test/student/ece"].mean() * 100
        assert ece[label].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    teacher = pd.read_csv(reports / "plots" / "teacher_test_top1.tsv", sep="\t")
    assert list(teacher.columns) == ["epoch", "teacher", "dml"] and teacher["epoch"].tolist() == [1, 2, 3]
    assert pd.isna(teacher.loc[2, "dml"])  # dml trained 2 epochs, the teacher 3
    for stem in ("student_test_top1", "student_train_loss"):
        table = pd.read_csv(reports / "plots" / f"{stem}.tsv", sep="\t")
        assert list(table.columns) == ["epoch", "vanilla", "kd", "dml"] and table.notna().all().all()


def test_paper_protocol_runs(paper_runs_root: Path, tmp_path: Path) -> None:
    """Runs without a validation split: every best number is the test-selected one, TS is not available,
    and the engine's files raise no note (the frozen teacher is the teacher run's, ECEs agree)."""
    params = write_params(tmp_path / "params.yaml", val_fraction=0.0)
    report = run_analysis(paper_runs_root, tmp_path / "sweeps", tmp_path / "reports", params, track=False)
    assert report.notes == [] and report.warnings == []
    runs = [json.loads((paper_runs_root / "kd" / f"seed{seed}" / "metrics.json").read_text()) for seed in SEEDS]
    assert all(run["selection"] == "test" and "best" not in run and "val" not in run["last"] for run in runs)
    comparison = pd.read_csv(tmp_path / "reports" / "tables" / "comparison.csv").set_index("label")
    mean, std = mean_std([run["best_test_selected"]["test"]["student"]["top1"] for run in runs])
    assert comparison.loc["kd", "student_top1_best_test_selected_mean"] == pytest.approx(mean)
    assert comparison.loc["kd", "student_top1_best_test_selected_std"] == pytest.approx(std, abs=1e-9)
    assert "student_top1_best_mean" not in comparison.columns
    calibration = pd.read_csv(tmp_path / "reports" / "tables" / "calibration.csv")
    assert (calibration["temperature_n"] == 0).all() and (calibration["ece_best_test_selected_pct_n"] > 0).all()
    assert NO_TS in (tmp_path / "reports" / "tables" / "calibration.md").read_text()
    kd_row = next(row for row in report.tables["comparison"].rows if row[0].text == "KD")
    assert kd_row[1].text == FROZEN
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert summary["selection"] == "test" and "student_ece_pct_ts" not in summary["methods"]["kd"]
    assert summary["methods"]["kd"]["student_top1_best_test_selected"] == pytest.approx(mean, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# Bad inputs, signals, sweeps, trackers


def write_real_sweep_results(root: Path, params: Path) -> None:
    """sweep-results/ as the sweeps write it (sweeps.report.write_results, Optuna's own figures) for two
    small real studies: kd with 12 complete trials (importances computed), dkd with 3 (a smoke test)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = load_config(params)
    for method, trials in (("kd", 12), ("dkd", 3)):
        study = optuna.create_study(study_name=f"{method}-test", direction="maximize",
                                    sampler=optuna.samplers.RandomSampler(seed=0))
        study.optimize(lambda trial: 60 - (trial.suggest_float("temperature", 1, 8) - 4) ** 2
                       + trial.suggest_float("weight", 0.1, 1), n_trials=trials)
        write_results(study, method, config, storage_url="sqlite:///:memory:", track=False, root=root)


def test_bad_inputs_become_notes_and_signals_sweeps_and_trackers_work(runs_root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed in SEEDS:
        shutil.copytree(runs_root / "vanilla" / f"seed{seed}", runs / "vanilla" / f"seed{seed}")
    (runs / "vanilla" / "seed1" / "predictions.pt").unlink()
    history = pd.read_csv(runs / "vanilla" / "seed0" / "history.tsv", sep="\t")
    history["signal/expert_fraction"] = [0.25, 0.5]  # any signal/* column is discovered
    history.to_csv(runs / "vanilla" / "seed0" / "history.tsv", sep="\t", index=False)
    (runs / "kd" / "seed0").mkdir(parents=True)  # an unfinished run: no metrics.json
    (runs / "dml" / "seed0").mkdir(parents=True)
    (runs / "dml" / "seed0" / "metrics.json").write_text("{ not json")
    params = write_params(tmp_path / "params.yaml")
    write_real_sweep_results(tmp_path / "sweeps", params)

    report = run_analysis(runs, tmp_path / "sweeps", tmp_path / "reports", params, track=True)

    notes = "\n".join(report.notes)
    assert "kd/seed0: no metrics.json" in notes and "dml/seed0: metrics.json is unreadable" in notes
    assert "vanilla/seed1: no predictions.pt" in notes
    calibration = pd.read_csv(tmp_path / "reports" / "tables" / "calibration.csv").iloc[0]
    assert calibration["seeds"] == 2 and calibration["ece_ts_pct_n"] == 1 and calibration["ece_best_pct_n"] == 2
    assert "(n=1)" in (tmp_path / "reports" / "tables" / "calibration.md").read_text()

    page = (tmp_path / "reports" / "index.html").read_text()
    assert "expert_fraction" in page and (tmp_path / "reports" / "figures" / "signals_vanilla.png").exists()
    assert "No sweep was run" not in page and "methods:\n  kd:" in page and "Best parameters" in page
    # The sweeps' own figures, embedded with their budget; importances only where 10 trials completed.
    kd, dkd = (json.loads((tmp_path / "sweeps" / method / "summary.json").read_text()) for method in ("kd", "dkd"))
    assert kd["importance"] and not kd["smoke"] and dkd["importance"] is None and dkd["smoke"]
    figures = {path.name for path in (tmp_path / "reports" / "figures").glob("sweep_*.png")}
    assert "sweep_kd_param_importances.png" in figures and "sweep_kd_optimization_history.png" in figures
    assert "sweep_dkd_optimization_history.png" in figures and "sweep_dkd_param_importances.png" not in figures
    sweeps = page[page.index('<section id="sweeps">'):page.index('<section id="metadata">')]
    assert escape(kd["budget"]["text"]) in sweeps and escape(dkd["budget"]["text"]) in sweeps  # as jinja2 escapes
    assert sweeps.count("<p class=\"notes\">A smoke test, not a tuning result") == 1 and "No parameter importance" in sweeps

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("kd-reproduce").experiment_id],
                               "tags.mlflow.runName = 'analysis'")
    logged = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "figures")}
    assert "figures/reliability_students.png" in logged and "figures/sweep_kd_optimization_history.png" in logged
    assert not (tmp_path / "reports" / "metrics.json").exists()


def test_runs_of_another_setup_are_left_out(runs_root: Path, tmp_path: Path) -> None:
    from analysis.runs import load_runs

    runs = tmp_path / "runs"
    for label in ("vanilla", "kd"):
        shutil.copytree(runs_root / label / "seed0", runs / label / "seed0")
    stray = json.loads((runs / "kd" / "seed0" / "metrics.json").read_text())
    stray["dataset"] = "cifar100"
    shutil.copytree(runs_root / "kd" / "seed1", runs / "kd" / "seed1")
    (runs / "kd" / "seed1" / "metrics.json").write_text(json.dumps({**stray, "seed": 1}))
    (runs / "kd" / "seed0" / "metrics.json").write_text(json.dumps(stray))
    runset = load_runs(runs)
    assert runset.setup.dataset == "cifar100" and {run.label for run in runset.runs} == {"kd"}
    assert any("vanilla/seed0: trained on digits" in note for note in runset.notes)
