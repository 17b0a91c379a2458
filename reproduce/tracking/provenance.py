"""Where a run comes from: the commit and whether the code differed from it, the config's fingerprint,
the DVC experiment, the user and the command; and the parameters a training run records."""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# Files the pipeline itself rewrites although git tracks them: `python -m pipeline sync` writes
# registry.yaml and params.yaml's method entries, `dvc exp run -S` writes params.yaml (the resolved config
# is logged in full and fingerprinted anyway), DVC writes dvc.lock. dvc.yaml's outs, metrics and plots
# are added to these when the dirty flag is computed.
PIPELINE_WRITES = ("dvc.lock", "params.yaml", "registry.yaml", "dvclive")


def git_commit(root: Path | None = None) -> dict[str, Any]:
    """The commit the code ran at, and whether the work tree differed from it in anything but what the
    pipeline writes (dvc.yaml's outputs, dvc.lock, dvclive/, paths .gitignore lists): a fresh clone
    that ran `dvc repro` is clean."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        top = Path(git("rev-parse", "--show-toplevel"))
        excluded = [f":(top,exclude,glob){pattern}" for pattern in pipeline_outputs(top)]
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", *excluded))
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def pipeline_outputs(root: Path) -> list[str]:
    """Glob patterns (from the repository root) of what the pipeline writes: PIPELINE_WRITES, every
    out/metric/plot path of dvc.yaml (a templated path up to its first ``${``), and .gitignore's patterns."""
    paths = list(PIPELINE_WRITES)
    if (root / "dvc.yaml").is_file():
        import yaml

        pipeline = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
        paths += [name for name in _entries(pipeline.get("plots"))]
        for stage in (pipeline.get("stages") or {}).values():
            body = stage.get("do", stage) if isinstance(stage, dict) else {}
            for section in ("outs", "metrics", "plots"):
                paths += _entries(body.get(section))
    if (root / ".gitignore").is_file():
        paths += [line.strip() for line in (root / ".gitignore").read_text().splitlines()
                  if line.strip() and not line.startswith(("#", "!"))]
    patterns: list[str] = []
    for path in paths:
        path = path.split("${", 1)[0]
        anchored = path.startswith("/") or "/" in path.rstrip("/")  # git's rule: a slash inside anchors a pattern
        path = path.strip("/")
        if path:
            base = path if anchored else f"**/{path}"
            patterns += [base, f"{base}/**"]
    return patterns


def _entries(section: Any) -> list[str]:
    """The file names of a dvc.yaml outs/metrics/plots list (entries are names or {name: options})."""
    items = section if isinstance(section, list) else [section] if section else []
    return [name for item in items for name in ([item] if isinstance(item, str) else item if isinstance(item, dict) else [])]


def fingerprint(tree: Any) -> str:
    """A short hash of a JSON-able tree (the config that defines a run): equal configs, equal hashes."""
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_params(config: Any, method: str, run: dict[str, Any]) -> dict[str, Any]:
    """What a training run logs as parameters: the resolved config, the method's effective coefficients
    (its Params defaults with params.yaml's overrides, under ``method_params``) and ``run`` (its tags)
    with the commit."""
    from reproduce.methods.base import get_method

    coefficients = get_method(method).parse_params(config.methods.get(method))
    return {**config.to_dict(), "method_params": dataclasses.asdict(coefficients), "run": {**run, **git_commit()}}


def context_tags() -> dict[str, str]:
    """Tags that say which experiment, user and command a run belongs to."""
    tags = {"dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),  # set by `dvc exp run`
            "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
            "command": " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])[:500]}
    try:
        tags["user"] = getpass.getuser()
    except (OSError, KeyError):  # no login name (some containers)
        pass
    return {key: value for key, value in tags.items() if value}


def source_name() -> str:
    """The program that ran, as a person would start it again (``python -m reproduce train``)."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if program.name == "__main__.py":
        return " ".join(["python -m", program.parent.name, *sys.argv[1:2]])
    return " ".join([program.name, *sys.argv[1:2]])
