"""The last pipeline stage: tables, reliability diagrams, curves, paper vs reproduced, and one HTML report.

``python -m analysis`` reads ``runs/`` (and ``sweep-results/`` when present) and writes ``reports/``;
``analysis.report.run_analysis`` is the same from Python. Nothing is imported here, so that a submodule
(or ``--help``) does not load torch and matplotlib.
"""
