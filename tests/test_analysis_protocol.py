"""The analysis on runs written by hand in the engine's metrics.json / predictions.pt schema, both selections
("val": best epoch on validation; "test": the papers' protocol, best epoch on test), with numbers chosen so
that every expected value is computed by hand: epoch kinds never mixed, paper rows like with like, the
frozen teacher shown once, the Welch interval of the difference to vanilla, bounded temperatures, ECE in
percent, the curated TSVs, a small summary.json, and predictions.pt loaded with weights_only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import analysis.report
from analysis.aggregate import Aggregate, welch_difference
from analysis.calibration import T_MAX, T_MIN, calibrate_run
from analysis.published import NOT_COMPARABLE, load_published, paper_vs_reproduced
from analysis.report import run_analysis
from analysis.runs import Setup, load_runs
from analysis.registry import display_name, ordered
from analysis.tables import FROZEN, NO_TS
from reproduce.config import AnalysisConfig
from reproduce.metrics import calibration_metrics, negative_log_likelihood
from conftest import PROJECT

SETUP = Setup("cifar100", "resnet32x4", "resnet8x4")
METRIC_DEFAULTS = {"top5": 95.0, "nll": 1.0, "ece": 0.05, "mce": 0.1, "brier": 0.4}


def write_run(root: Path, label: str, seed: int, selection: str, numbers: dict[str, dict[str, dict[str, float]]],
              *, predictions: dict | None = None, history: pd.DataFrame | None = None, setup: Setup = SETUP,
              legacy: bool = False) -> Path:
    """runs/<label>/seed<seed>/ as reproduce/train/ writes it. ``numbers[network][kind]``: test metrics at
    "best" (the run's best epoch, whatever its selection) and "last"; missing metrics take METRIC_DEFAULTS.
    ``legacy``: a metrics.json from before the selection key (selection "val" implied)."""
    run_dir = root / label / f"seed{seed}"
    run_dir.mkdir(parents=True)
    best_key = "best" if selection == "val" else "best_test_selected"

    def block(kind: str) -> dict:
        test = {network: {**METRIC_DEFAULTS, **values[kind]} for network, values in numbers.items()}
        if predictions is not None and kind == "best":  # metrics.json and predictions.pt agree, as the engine's
            for network in numbers:
                test[network]["ece"] = calibration_metrics(predictions["best"]["test"][network],
                                                           predictions["labels"]["test"])["ece"]
        part = {"epoch": 2 if kind == "best" else 3, "test": test}
        if selection == "val":
            part["val"] = test
        return part

    metrics = {"method": label, "seed": seed, "dataset": setup.dataset, "teacher": setup.teacher,
               "student": setup.student, "primary": "teacher" if label == "teacher" else "student",
               "networks": sorted(numbers), "epochs": 3, best_key: block("best"), "last": block("last"),
               "signals": {}, "time": {"train_s": 1.0, "images_per_s": 100.0},
               "environment": {"torch": torch.__version__, "python": "3.11", "device": "cpu", "commit": "abc"}}
    if not legacy:
        metrics["selection"] = selection
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if predictions is not None:
        torch.save(predictions, run_dir / "predictions.pt")
    if history is not None:
        history.to_csv(run_dir / "history.tsv", sep="\t", index=False)
    return run_dir


def random_predictions(networks: list[str], selection: str, seed: int, n: int = 200, classes: int = 5) -> dict:
    generator = torch.Generator().manual_seed(seed)
    splits = ["val", "test"] if selection == "val" else ["test"]
    labels = {split: torch.randint(0, classes, (n,), generator=generator) for split in splits}
    logits = {split: {network: torch.randn(n, classes, generator=generator) * 3
                      + 2 * torch.nn.functional.one_hot(labels[split], classes) for network in networks}
              for split in splits}
    return {"labels": labels, "best": logits, "last": logits, "best_epoch": 2, "last_epoch": 3, "selection": selection}


def write_params(path: Path, val_fraction: float = 0.15, **analysis: object) -> Path:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["dataset"]["name"] = SETUP.dataset
    params["dataset"]["val_fraction"] = val_fraction
    params["models"] = {"teacher": SETUP.teacher, "student": SETUP.student}
    params["tracking"]["wandb"]["enabled"] = False
    params["analysis"] = {**params.get("analysis", {}), "png_dpi": 60,
                          "published_results": str(PROJECT / "analysis" / "published_results.yaml"), **analysis}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def history(student_top1: list[float] | None, student_ece: list[float] | None, loss: list[float],
            teacher_top1: list[float] | None = None) -> pd.DataFrame:
    """history.tsv columns as the engine names them; without a student, the loss is the teacher's."""
    frame = pd.DataFrame({"epoch": range(1, len(loss) + 1)})
    if student_top1 is not None:
        frame["test/student/top1"], frame["test/student/ece"] = student_top1, student_ece
    frame["train/student/loss" if student_top1 is not None else "train/teacher/loss"] = loss
    if teacher_top1 is not None:
        frame["test/teacher/top1"] = teacher_top1
    return frame


def top1(best: float, last: float) -> dict[str, dict[str, float]]:
    return {"best": {"top1": best}, "last": {"top1": last}}


# Student top-1 at the best epoch: kd 74, 75, 76 and vanilla 72, 73 (the Welch example below).
STUDENT_BEST = {"vanilla": [72.0, 73.0], "kd": [74.0, 75.0, 76.0], "dml": [71.0, 71.5]}
TEACHER = {"best": {"top1": 79.5}, "last": {"top1": 79.0}}


def write_suite(root: Path, selection: str) -> None:
    """teacher (2 seeds), vanilla (2), kd (3, offline: its teacher is the frozen pre-trained one, which scores
    the teacher run's seed0 last epoch exactly), dml (2, online: its teacher trains)."""
    for seed in (0, 1):
        write_run(root, "teacher", seed, selection, {"teacher": TEACHER},
                  predictions=random_predictions(["teacher"], selection, 10 + seed),
                  history=history(None, None, [2, 1.5, 1], teacher_top1=[60, 70, 79]))
    for label in ("vanilla", "kd", "dml"):
        for seed, best in enumerate(STUDENT_BEST[label]):
            numbers = {"student": {"best": {"top1": best, "ece": 0.0312}, "last": {"top1": best - 1}}}
            if label == "kd":
                numbers["teacher"] = TEACHER
            if label == "dml":
                numbers["teacher"] = {"best": {"top1": 78.0}, "last": {"top1": 77.0}}
            # kd seed 2 has no predictions: its ECE stays metrics.json's hand-set 3.12 %.
            predictions = None if (label == "kd" and seed == 2) or label == "vanilla" else \
                random_predictions(sorted(numbers), selection, 20 + seed)
            student_top1 = [40 + 10 * seed, 50 + 10 * seed, 60 + 10 * seed]
            write_run(root, label, seed, selection, numbers, predictions=predictions,
                      history=history(student_top1, [0.2, 0.1 + 0.02 * seed, 0.05], [3, 2, 1 + seed],
                                      teacher_top1=[55, 65, 75] if label != "vanilla" else None))


@pytest.fixture(scope="module", params=["val", "test"])
def suite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """run_analysis on the hand-written suite, once per selection. The training-curve figures do not depend
    on the selection: drawn in the "val" suite only (a third of the fast tier's time otherwise)."""
    selection = request.param
    tmp = tmp_path_factory.mktemp(f"suite-{selection}")
    write_suite(tmp / "runs", selection)
    params = write_params(tmp / "params.yaml", val_fraction=0.15 if selection == "val" else 0.0)
    with pytest.MonkeyPatch.context() as patch:
        if selection == "test":
            patch.setattr(analysis.report, "curve_figures", lambda *args: [])
        report = run_analysis(tmp / "runs", tmp / "sweeps", tmp / "reports", params, track=False)
    if selection == "val":
        assert {"curves_overview.png", "curves_kd.png"} <= {path.name for path in (tmp / "reports" / "figures").iterdir()}
    return selection, report, tmp / "reports"


def best_kind(selection: str) -> str:
    return "best" if selection == "val" else "best_test_selected"


# ----------------------------------------------------------------------------------------------
# Epoch kinds and labels


def test_tables_name_their_epoch_kind_and_never_mix_kinds(suite) -> None:
    selection, report, reports = suite
    kind = best_kind(selection)
    other = best_kind("test" if selection == "val" else "val")
    comparison = pd.read_csv(reports / "tables" / "comparison.csv")
    assert f"student_top1_{kind}_mean" in comparison.columns
    for network in ("student", "teacher"):
        assert not {f"{network}_top1_{other}_{suffix}" for suffix in ("mean", "std", "n")} & set(comparison.columns)
    kd = comparison.set_index("label").loc["kd"]
    assert kd[f"student_top1_{kind}_mean"] == pytest.approx(75.0) and kd["student_top1_last_mean"] == 74.0
    label = ("best epoch, selected on validation" if selection == "val"
             else "best epoch, selected on test (paper protocol)")
    for text in ((reports / "tables" / "comparison.md").read_text(), (reports / "tables" / "calibration.md").read_text(),
                 (reports / "index.html").read_text()):
        assert label in text
    header = "Student top-1, best (val-selected)" if selection == "val" else "Student top-1, best (test-selected)"
    assert header in (reports / "tables" / "comparison.md").read_text()
    runs = pd.read_csv(reports / "tables" / "runs.csv")
    assert set(runs["selection"]) == {selection} and set(runs["best_epoch"]) == {2}


def test_temperature_scaling_is_not_available_without_a_validation_split(suite) -> None:
    selection, report, reports = suite
    calibration = pd.read_csv(reports / "tables" / "calibration.csv").set_index(["label", "network"])
    markdown = (reports / "tables" / "calibration.md").read_text()
    page = (reports / "index.html").read_text()
    if selection == "val":
        assert calibration.loc[("dml", "student"), "temperature_n"] == 2
        assert (reports / "figures" / "reliability_students_ts.png").exists()
        assert NO_TS not in markdown
    else:
        assert (calibration["temperature_n"] == 0).all() and calibration["ece_ts_pct_mean"].isna().all()
        assert NO_TS in markdown and NO_TS in (reports / "tables" / "comparison.md").read_text()
        assert "Temperature scaling: not available" in page and "never fitted on the test set" in page
        assert not (reports / "figures" / "reliability_students_ts.png").exists()
        assert (reports / "figures" / "reliability_students.png").exists()  # the diagrams need no validation


def test_mixed_selections_keep_one_and_old_metrics_mean_val(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root, "vanilla", 0, "val", {"student": top1(70, 69)}, legacy=True)  # no selection key: "val"
    write_run(root, "vanilla", 1, "val", {"student": top1(71, 70)})
    write_run(root, "kd", 0, "test", {"student": top1(75, 74)})
    runset = load_runs(root)
    assert runset.selection == "val" and {(run.label, run.seed) for run in runset.runs} == {("vanilla", 0),
                                                                                           ("vanilla", 1)}
    assert any("kd/seed0: selection 'test'" in note and "left out" in note for note in runset.notes)
    # A tie goes to the configured selection.
    write_run(root, "kd", 1, "test", {"student": top1(75, 74)})
    assert load_runs(root, preferred_selection="test").selection == "test"


def test_contradictory_metrics_are_left_out(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root, "vanilla", 0, "test", {"student": top1(70, 69)})
    run_dir = write_run(root, "vanilla", 1, "test", {"student": top1(71, 70)})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["best"] = metrics["best_test_selected"]  # a test-selected number under the validation name
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    runset = load_runs(root)
    assert [run.seed for run in runset.runs] == [0]
    assert any("vanilla/seed1: metrics.json has selection 'test' but also a 'best' entry" in note
               for note in runset.notes)


# ----------------------------------------------------------------------------------------------
# Paper vs reproduced: like with like


def records_for(selection: str) -> pd.DataFrame:
    """kd (2 seeds) and dkd (1) of CIFAR-100 resnet32x4 -> resnet8x4, and the teacher; ``best`` numbers under
    the selection's own name."""
    kind = best_kind(selection)
    return pd.DataFrame([
        {"label": "kd", "seed": 0, "network": "student", f"top1_{kind}": 74.0, "top1_last": 73.0},
        {"label": "kd", "seed": 1, "network": "student", f"top1_{kind}": 75.0, "top1_last": 72.0},
        {"label": "dkd", "seed": 0, "network": "student", f"top1_{kind}": 76.5, "top1_last": 76.0},
        {"label": "teacher", "seed": 0, "network": "teacher", f"top1_{kind}": 80.0, "top1_last": 79.0},
    ])


def test_a_published_best_epoch_matches_only_a_test_selected_run() -> None:
    settings = AnalysisConfig()
    published = load_published(PROJECT / "analysis" / "published_results.yaml")
    labels = ["teacher", "kd", "dkd"]

    tested = paper_vs_reproduced(published, Aggregate(records_for("test")), SETUP, "test", labels, settings)
    table = tested.table.numeric.set_index(["label", "network", "status"])
    dkd = table.loc[("dkd", "student", "compared")]  # DKD: best epoch, mean of 5 runs
    assert dkd["published_top1"] == 76.32 and dkd["reproduced_top1"] == 76.5
    assert dkd["our_epoch_kind"] == "best_test_selected" and dkd["difference"] == pytest.approx(0.18)
    assert dkd["our_convention"] == "best epoch, selected on test (paper protocol), one seed"
    kd = table.loc[("kd", "student", "compared")]  # CRD: last epoch of one run
    assert kd["published_top1"] == 73.33 and kd["reproduced_top1"] == 72.5 and kd["our_epoch_kind"] == "last"
    assert kd["our_convention"] == "last epoch, mean ± std over 2 seeds"

    validated = paper_vs_reproduced(published, Aggregate(records_for("val")), SETUP, "val", labels, settings)
    table = validated.table.numeric
    dkd = table[(table["label"] == "dkd") & (table["published_top1"] == 76.32)].iloc[0]
    assert dkd["status"] == NOT_COMPARABLE and pd.isna(dkd["reproduced_top1"]) and pd.isna(dkd["difference"])
    row = next(row for row in validated.table.rows if row[0].text == "DKD" and row[5].text.startswith("76.32"))
    assert "not comparable" in row[7].text and "dataset.val_fraction=0" in row[7].text
    assert "76.50" not in " ".join(cell.text for cell in row)  # our val-selected number is never beside it
    kd = table[(table["label"] == "kd") & (table["status"] == "compared")].iloc[0]
    assert kd["reproduced_top1"] == 72.5 and "validation split" in kd["source"]  # last beside last
    teacher = table[(table["label"] == "teacher") & (table["status"] == "compared")].iloc[0]
    assert teacher["published_top1"] == 79.42 and teacher["reproduced_top1"] == 79.0
    assert "1 not comparable" in validated.statement


def test_kdcl_rows_compare_on_the_switokd_setup() -> None:
    settings = AnalysisConfig()
    published = load_published(PROJECT / "analysis" / "published_results.yaml")
    setup = Setup("cifar100", "switokd_wrn_16_2", "mobilenetv2_0.5")  # the recipe's pair: SwitOKD's own WRN
    records = pd.DataFrame([{"label": "kdcl", "seed": seed, "network": network,
                             "top1_best_test_selected": value, "top1_last": value - 1}
                            for seed, (student, teacher) in enumerate([(66.0, 73.0), (67.0, 74.0), (68.0, 75.0)])
                            for network, value in (("student", student), ("teacher", teacher))])
    table = paper_vs_reproduced(published, Aggregate(records), setup, "test", ["kdcl"], settings).table.numeric
    compared = table[table["status"] == "compared"].set_index("network")
    assert compared.loc["student", "published_top1"] == 66.83 and compared.loc["student", "reproduced_top1"] == 67.0
    assert compared.loc["teacher", "published_top1"] == 73.75 and compared.loc["teacher", "reproduced_top1"] == 74.0
    assert compared.loc["student", "reproduced_std"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# The frozen teacher, the difference to vanilla, ECE in percent


def test_the_frozen_teacher_is_shown_once_and_never_bold(suite) -> None:
    selection, report, reports = suite
    kind = best_kind(selection)
    comparison = report.tables["comparison"]
    by_method = {row[0].text: row for row in comparison.rows}
    teacher_columns = [index for index, column in enumerate(comparison.columns) if column.startswith("Teacher top-1")]
    for index in teacher_columns:
        assert by_method["KD"][index].text == FROZEN and not by_method["KD"][index].bold
        assert by_method["Teacher (vanilla)"][index].bold  # 79.5 / 79.0 beat DML's teacher; KD's equal copy is not bold
        assert not by_method["DML"][index].bold
    numeric = pd.read_csv(reports / "tables" / "comparison.csv").set_index("label")
    assert numeric[f"teacher_top1_{kind}_is_best"].to_dict() == {"teacher": True, "vanilla": False, "kd": False,
                                                                "dml": False}
    assert bool(numeric.loc["kd", f"teacher_top1_{kind}_frozen"]) and pd.isna(numeric.loc["kd", f"teacher_top1_{kind}_mean"])
    calibration = pd.read_csv(reports / "tables" / "calibration.csv")
    assert sorted(calibration.loc[calibration["network"] == "teacher", "label"]) == ["dml", "teacher"]
    assert not (reports / "figures" / "reliability_kd_teacher.png").exists()
    assert (reports / "figures" / "reliability_teacher_teacher.png").exists()
    assert not any("teacher network scores" in note for note in report.notes)  # it is the teacher run's


def test_a_teacher_that_differs_from_the_teacher_run_is_a_note_and_its_own_row(tmp_path: Path) -> None:
    """An offline method's teacher network that does not score what the teacher run scored (here SOKD, whose
    teacher's BatchNorm statistics follow training by default) is not the frozen teacher: it gets its own
    numbers, and a note; KD's, equal to the teacher run's, stays "frozen"."""
    root = tmp_path / "runs"
    write_run(root, "teacher", 0, "val", {"teacher": TEACHER})
    write_run(root, "kd", 0, "val", {"student": top1(74, 73), "teacher": TEACHER})
    write_run(root, "sokd", 0, "val", {"student": top1(74, 73), "teacher": top1(70, 70)})
    report = run_analysis(root, tmp_path / "sweeps", tmp_path / "reports", write_params(tmp_path / "params.yaml"),
                          track=False)
    assert [note for note in report.notes if "teacher network scores" in note] == [
        next(note for note in report.notes if "sokd/seed0: its teacher network scores 70.00 % test top-1" in note
             and "79.00 %" in note)]
    rows = {row[0].text: row for row in report.tables["comparison"].rows}
    assert rows["KD"][2].text == FROZEN and rows["SOKD"][2].text == "70.00"
    calibration = report.tables["calibration"].numeric
    assert sorted(calibration.loc[calibration["network"] == "teacher", "label"]) == ["sokd", "teacher"]


def test_welch_interval_of_a_hand_computed_difference() -> None:
    """kd 74, 75, 76 against vanilla 72, 73: difference 2.5; s² = 1 and 0.5; se² = 1/3 + 0.5/2 = 7/12;
    Welch df = (7/12)² / ((1/3)²/2 + (1/4)²/1) = 2.8824; t(0.975, 2.8824) = 3.2572 (between the tables'
    4.303 at df 2 and 3.182 at df 3); half width 3.2572 · √(7/12) = 2.4877."""
    difference = welch_difference([74.0, 75.0, 76.0], [72.0, 73.0])
    assert difference.estimate == pytest.approx(2.5)
    assert difference.df == pytest.approx(2.882353, rel=1e-5)
    assert difference.low == pytest.approx(2.5 - 2.4877, abs=1e-3)
    assert difference.high == pytest.approx(2.5 + 2.4877, abs=1e-3)
    assert difference.text() == "+2.50 [+0.01, +4.99]"
    single = welch_difference([74.0], [72.0, 73.0])
    assert single.estimate == pytest.approx(1.5) and single.low is None and "n/a" in single.text()


def test_difference_to_vanilla_column(suite) -> None:
    selection, report, reports = suite
    key = f"student_top1_{best_kind(selection)}_vs_vanilla"
    numeric = pd.read_csv(reports / "tables" / "comparison.csv").set_index("label")
    assert numeric.loc["kd", key] == pytest.approx(2.5)
    assert numeric.loc["kd", f"{key}_ci_low"] == pytest.approx(0.0123, abs=1e-3)
    assert numeric.loc["kd", f"{key}_ci_high"] == pytest.approx(4.9877, abs=1e-3)
    # dml 71, 71.5 against 72, 73: -1.25; se² = 0.125/2 + 0.5/2 = 0.3125; df = 0.3125² / (0.0625² + 0.25²) = 1.47
    assert numeric.loc["dml", key] == pytest.approx(-1.25)
    assert numeric.loc["dml", f"{key}_df"] == pytest.approx(0.3125 ** 2 / (0.0625 ** 2 + 0.25 ** 2), rel=1e-6)
    by_method = {row[0].text: row for row in report.tables["comparison"].rows}
    column = next(index for index, header in enumerate(report.tables["comparison"].columns) if header.startswith("Δ"))
    assert by_method["KD"][column].text == "+2.50 [+0.01, +4.99]"
    assert by_method["Vanilla student"][column].text == "reference"
    assert by_method["Teacher (vanilla)"][column].text == "—"
    assert "95 % Welch t interval" in report.tables["comparison"].caption or \
        "95% Welch t interval" in report.tables["comparison"].caption


def test_ece_is_in_percent_in_every_table_and_the_summary(suite) -> None:
    selection, report, reports = suite
    kind = best_kind(selection)
    # vanilla has no predictions: its ECE is metrics.json's 0.0312 in every seed -> 3.12 %.
    comparison = pd.read_csv(reports / "tables" / "comparison.csv").set_index("label")
    assert comparison.loc["vanilla", f"student_ece_{kind}_pct_mean"] == pytest.approx(3.12)
    calibration = pd.read_csv(reports / "tables" / "calibration.csv").set_index(["label", "network"])
    assert calibration.loc[("vanilla", "student"), f"ece_{kind}_pct_mean"] == pytest.approx(3.12)
    row = next(row for row in report.tables["comparison"].rows if row[0].text == "Vanilla student")
    ece_column = report.tables["comparison"].columns.index("Student ECE (%)")
    assert row[ece_column].text == "3.12 ± 0.00"
    for table in ("comparison", "calibration"):
        headers = report.tables[table].columns
        assert all("(%)" in header for header in headers if "ECE" in header), headers
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["methods"]["vanilla"][f"student_ece_pct_{kind}"] == pytest.approx(3.12)


def test_reliability_diagrams_print_the_mean_over_seeds_ece(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two seeds' predictions with different ECEs: the diagrams print their mean (the tables' convention),
    not the pooled bins' ECE."""
    from matplotlib.text import Text

    import analysis.report_figures
    from analysis.calibration import pool_bins
    from analysis.figures import reliability_figure

    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, "vanilla", seed, "test", {"student": top1(70, 69)},
                  predictions=random_predictions(["student"], "test", seed, n=50 + 150 * seed))
    runset = load_runs(root)
    calibrations = [c for run in runset.runs for c in calibrate_run(run, 15, [], [])]
    per_seed = [c.test["ece"] for c in calibrations]
    pooled = pool_bins([c.bins for c in calibrations]).expected_error()
    assert abs(pooled - sum(per_seed) / 2) > 1e-3  # the two conventions differ here
    label = f"ECE (%) {100 * sum(per_seed) / 2:.2f}, mean of 2 seed(s)"

    printed: list[str | None] = []
    original_figure, original_grid = analysis.report_figures.reliability_figure, analysis.report_figures.reliability_grid

    def spy_figure(bins, title, ece_text=None):
        printed.append(ece_text)
        return original_figure(bins, title, ece_text)

    def spy_grid(panels, columns):
        printed.extend(panel[2] for panel in panels)
        return original_grid(panels, columns)

    monkeypatch.setattr(analysis.report_figures, "reliability_figure", spy_figure)
    monkeypatch.setattr(analysis.report_figures, "reliability_grid", spy_grid)
    run_analysis(root, tmp_path / "sweeps", tmp_path / "reports", write_params(tmp_path / "params.yaml", 0.0),
                 track=False)
    assert printed == [label, label]  # the students' grid and the vanilla student's own diagram
    table = pd.read_csv(tmp_path / "reports" / "tables" / "comparison.csv").set_index("label")
    comparison_ece = table.loc["vanilla", "student_ece_best_test_selected_pct_mean"]
    assert f"ECE (%) {comparison_ece:.2f}, mean of 2 seed(s)" == label  # the table's number
    figure = reliability_figure(pool_bins([c.bins for c in calibrations]), "Vanilla", label)
    texts = [text.get_text() for text in figure.findobj(Text)]
    assert label in texts and f"ECE (%) {100 * pooled:.2f}" not in texts


# ----------------------------------------------------------------------------------------------
# Bounded temperature scaling


def calibrate_one(tmp_path: Path, val_logits: list[list[float]], val_labels: list[int],
                  test_logits: list[list[float]], test_labels: list[int]):
    predictions = {"labels": {"val": torch.tensor(val_labels), "test": torch.tensor(test_labels)},
                   "best": {"val": {"student": torch.tensor(val_logits)},
                            "test": {"student": torch.tensor(test_logits)}},
                   "selection": "val"}
    predictions["last"] = predictions["best"]
    write_run(tmp_path / "runs", "vanilla", 0, "val", {"student": top1(70, 69)}, predictions=predictions)
    [run] = load_runs(tmp_path / "runs").runs
    notes: list[str] = []
    warnings: list[str] = []
    [calibration] = calibrate_run(run, 15, notes, warnings)
    return calibration, notes, warnings


def test_a_validation_split_without_errors_gives_the_lower_bound_and_a_warning(tmp_path: Path) -> None:
    """Every validation image right: the NLL falls as T falls, so T is the lower bound 0.1 (unbounded it
    collapsed to ~0.02). Test: [2, 0] right, [0, 1] wrong; with T = 0.1 their NLLs are log(1 + e^-20) and
    log(1 + e^10), mean 5.0000227."""
    calibration, notes, warnings = calibrate_one(
        tmp_path, [[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]], [0, 1, 0], [[2.0, 0.0], [0.0, 1.0]], [0, 0])
    assert calibration.temperature == T_MIN == 0.1 and calibration.at_bound and calibration.val_errors == 0
    expected = (math.log1p(math.exp(-20)) + math.log1p(math.exp(10))) / 2
    assert calibration.test_scaled["nll"] == pytest.approx(expected, rel=1e-5)
    assert len(warnings) == 1 and "no errors" in warnings[0] and "vanilla/seed0 student" in warnings[0]
    assert not notes


def test_an_interior_temperature_is_not_clamped(tmp_path: Path) -> None:
    """Three right with margin 1, one wrong with margin 1: d/dβ NLL = −3σ(−β) + σ(β) = 0 at β = ln 3, so
    T = 1/ln 3 = 0.9102."""
    calibration, _, warnings = calibrate_one(
        tmp_path, [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0, 0, 0, 0], [[1.0, 0.0]], [0])
    assert calibration.temperature == pytest.approx(1 / math.log(3), rel=1e-6)
    assert not calibration.at_bound and not warnings


def test_a_fit_beyond_the_upper_bound_is_clamped_and_warned(tmp_path: Path) -> None:
    """The same logits, one label right and one wrong: the NLL is smallest at β = 0 (T = ∞), hence T_MAX, and
    the NLL still falls beyond it."""
    val_logits, val_labels = [[1.0, 0.0], [1.0, 0.0]], [0, 1]
    calibration, _, warnings = calibrate_one(tmp_path, val_logits, val_labels, [[1.0, 0.0]], [0])
    assert calibration.temperature == T_MAX and calibration.at_bound
    nll = [negative_log_likelihood(torch.tensor(val_logits) / t, torch.tensor(val_labels)) for t in (T_MAX, 2 * T_MAX)]
    assert nll[1] < nll[0]
    assert len(warnings) == 1 and "reached the bound T = 10" in warnings[0] and "larger T" in warnings[0]


def test_temperature_at_bound_is_marked_in_the_calibration_table(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed in (0, 1):
        predictions = random_predictions(["student"], "val", seed)
        if seed == 0:  # a validation split without errors
            labels = predictions["labels"]["val"]
            predictions["best"]["val"]["student"] = 5 * torch.nn.functional.one_hot(labels, 5).float()
        write_run(root, "vanilla", seed, "val", {"student": top1(70, 69)}, predictions=predictions)
    report = run_analysis(root, tmp_path / "sweeps", tmp_path / "reports", write_params(tmp_path / "params.yaml"),
                          track=False)
    row = next(row for row in report.tables["calibration"].rows if row[0].text == "Vanilla student")
    # Seed 0's bound is counted, not averaged: T is seed 1's fit alone.
    [seed1] = calibrate_run(load_runs(root).of("vanilla")[1], 15, [], [])
    assert not seed1.at_bound
    assert row[3].text == f"{seed1.temperature:.2f} (1 of 2 at a bound, excluded)"
    numeric = report.tables["calibration"].numeric.iloc[0]
    assert numeric["temperature_mean"] == pytest.approx(seed1.temperature) and numeric["temperature_n"] == 1
    assert numeric["temperature_at_bound_n"] == 1
    assert len(report.warnings) == 1 and "no errors" in report.warnings[0]
    page = (tmp_path / "reports" / "index.html").read_text()
    assert "1 temperature fit(s) to read with care" in page and "no errors" in page


# ----------------------------------------------------------------------------------------------
# predictions.pt with weights_only


def test_a_crafted_predictions_file_is_refused_and_becomes_a_note(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Crafted:
        def __reduce__(self):
            return open, (str(marker), "w")  # would create the file if the pickle were executed

    root = tmp_path / "runs"
    write_run(root, "vanilla", 0, "val", {"student": top1(70, 69)})
    torch.save({"labels": {}, "best": {}, "payload": Crafted()}, root / "vanilla" / "seed0" / "predictions.pt")
    write_run(root, "vanilla", 1, "val", {"student": top1(71, 70)})
    (root / "vanilla" / "seed1" / "predictions.pt").write_bytes(b"\x00not a torch file")
    report = run_analysis(root, tmp_path / "sweeps", tmp_path / "reports", write_params(tmp_path / "params.yaml"),
                          track=False)
    assert not marker.exists()
    for seed in (0, 1):
        path = root / "vanilla" / f"seed{seed}" / "predictions.pt"
        assert any(note.startswith(f"{path} is unreadable") for note in report.notes), report.notes
    comparison = pd.read_csv(tmp_path / "reports" / "tables" / "comparison.csv").set_index("label")
    assert comparison.loc["vanilla", "student_top1_best_mean"] == 70.5  # metrics.json is still used


# ----------------------------------------------------------------------------------------------
# Names and order from the registry, curated TSVs, summary.json


def test_names_and_order_come_from_the_registry_with_optional_overrides() -> None:
    from reproduce.methods import METHODS

    settings = AnalysisConfig()
    labels = {"r2kd", "kd", "teacher", "kdcl", "vanilla", "dml", "dkd", "unknown_method"}
    assert ordered(labels, settings) == ["teacher", "vanilla", "kd", "dkd", "dml", "kdcl", "r2kd", "unknown_method"]
    assert display_name("kdcl", settings) == METHODS.get("kdcl").display_name == "KDCL"
    assert display_name("teacher", settings) == "Teacher (vanilla)" and display_name("unknown_method", settings) == \
        "unknown_method"
    custom = AnalysisConfig.model_validate({"order": ["dml", "kd"], "names": {"kd": "Hinton KD"}})
    assert ordered(labels, custom)[:4] == ["dml", "kd", "teacher", "vanilla"]
    assert display_name("kd", custom) == "Hinton KD" and display_name("dml", custom) == "DML"


def test_curated_tsvs_hold_the_mean_over_seeds_per_epoch(suite) -> None:
    selection, report, reports = suite
    top1_table = pd.read_csv(reports / "plots" / "student_test_top1.tsv", sep="\t")
    assert list(top1_table.columns) == ["epoch", "vanilla", "kd", "dml"]
    # kd's seeds 0, 1, 2: 40/50/60 + 10·seed -> the means 50, 60, 70
    assert top1_table["kd"].tolist() == [50.0, 60.0, 70.0] and top1_table["epoch"].tolist() == [1, 2, 3]
    assert top1_table["vanilla"].tolist() == [45.0, 55.0, 65.0]
    ece = pd.read_csv(reports / "plots" / "student_test_ece.tsv", sep="\t")
    # epoch 2: 0.10, 0.12, 0.14 -> 12 % mean
    assert ece["kd"].tolist() == pytest.approx([20.0, 12.0, 5.0])
    loss = pd.read_csv(reports / "plots" / "student_train_loss.tsv", sep="\t")
    assert loss["kd"].tolist() == pytest.approx([3.0, 2.0, 2.0])
    teacher = pd.read_csv(reports / "plots" / "teacher_test_top1.tsv", sep="\t")
    assert list(teacher.columns) == ["epoch", "teacher", "dml"]  # kd's frozen teacher is the teacher method's
    assert teacher["teacher"].tolist() == [60.0, 70.0, 79.0]
    assert "plots/student_test_top1.tsv" in (reports / "index.html").read_text()


def test_summary_json_is_small_and_named_by_epoch_kind(suite) -> None:
    selection, report, reports = suite
    kind = best_kind(selection)
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["selection"] == selection and list(summary["methods"]) == ["teacher", "vanilla", "kd", "dml"]
    ts = {"student_ece_pct_ts"} if selection == "val" else set()
    assert set(summary["methods"]["kd"]) == {"seeds", f"student_top1_{kind}", "student_top1_last",
                                             f"student_ece_pct_{kind}", f"student_top1_{kind}_vs_vanilla", *ts}
    assert set(summary["methods"]["dml"]) == set(summary["methods"]["kd"]) | {f"teacher_top1_{kind}",
                                                                              "teacher_top1_last"}
    assert set(summary["methods"]["teacher"]) == {"seeds", f"teacher_top1_{kind}", "teacher_top1_last"}
    assert summary["methods"]["kd"][f"student_top1_{kind}"] == 75.0
    assert summary["methods"]["kd"][f"student_top1_{kind}_vs_vanilla"] == 2.5
    assert summary["methods"]["teacher"]["teacher_top1_last"] == 79.0
    assert len(json.dumps(summary)) < 3000
