"""Fan-out: every run of a recipe or a DVC stage in a process of its own, pinned to a device, several at
once on one machine (a pool of workers) or as SLURM job arrays through submitit.

- ``devices``: which device a worker computes on and with how many threads (also sweeps' workers).
- ``runs``: a run, the run it waits for (an offline method's teacher), what a worker process does.
- ``fanout``: ``launch_runs``, where the runs train (here, the pool or the cluster).
- ``pool``: the local pool; ``cluster``: submitit; ``board``: one progress line per run; ``report``: how
  each run ended.

Nothing here imports torch at module level: the launching process stays light, and a worker pins the
CPU numerics before torch loads, as every command line does.
"""

from reproduce.launch.fanout import Launch, launch_runs, plan_slots
from reproduce.launch.report import Outcome, Report, RunsFailedError
from reproduce.launch.runs import RunJob, runs_for, with_teacher_dependencies

__all__ = ["Launch", "Outcome", "Report", "RunJob", "RunsFailedError", "launch_runs", "plan_slots", "runs_for",
           "with_teacher_dependencies"]
