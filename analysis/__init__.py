"""The last pipeline stage: tables, reliability diagrams, curves, paper vs reproduced, and one HTML report.

``python -m analysis`` reads ``runs/`` (and ``sweeps/results/`` when present) and writes ``reports/``;
``run_analysis`` is the same from Python.
"""

from analysis.report import Report, run_analysis
from analysis.runs import AnalysisError

__all__ = ["AnalysisError", "Report", "run_analysis"]
