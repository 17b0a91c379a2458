"""DDP for real: ``torchrun --standalone --nproc_per_node 2`` on CPU (gloo), compared with one process.

Each run goes through tests/ddp_driver.py, which is ``python -m reproduce train`` plus a record of what every
rank did (its batches, its file writes, its tracker, its updates and parameter digests after every step).

What "matches" means here. A run on 2 ranks of b images is the one-process run with a batch of 2b: the same
images and augmentations in every step (checked exactly), the same roles updated in every step (checked
exactly), and with ``runtime.sync_batchnorm`` the same BatchNorm statistics, hence the same gradients up to
float32 rounding: the sums are taken in another order (per rank, then across ranks; BatchNorm's in float64).
So the first step's update of every role must agree within FIRST_STEP_TOLERANCE of its size (measured:
1e-5, i.e. ~1e-7 absolute; without SyncBatchNorm it is off by 12 % to 21 %). Training
then amplifies rounding as it amplifies any perturbation (reordering the images inside each batch of one
process moves its parameters by up to ~2e-4 within 8 steps; SwitOKD's student here has a learning rate of 4),
so the end of the runs is compared with the looser FINAL_TOLERANCE on the test logits and the same predicted
class for at least 98 % of the test images (measured: 6e-4 relative for DML, 2e-3 for SwitOKD's teacher; all
predictions agree). SwitOKD's student at a learning rate of 4 explodes (logits of 1e4) and amplifies rounding
about a thousandfold in 8 steps: EXPLODING_TOLERANCE (measured 1.2e-3 before the CPU numerics were pinned to
AVX2, 1.3e-2 since, the same with the engine's old and new DDP and SwitOKD code, bit for bit). Without
sync_batchnorm each rank normalises with its own shard's statistics, a different computation: the control
test checks that this comparison catches it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from reproduce.config import deep_merge

DRIVER = Path(__file__).resolve().parent / "ddp_driver.py"
WORLD = 2
PER_RANK = 128  # the one-process runs use WORLD x PER_RANK; digits then has 4 training steps per epoch
# Relative to the first update's largest change (rounding: <1e-5; rank-local BatchNorm statistics: 0.1 to 0.2).
FIRST_STEP_TOLERANCE = 1e-3
# Relative to the largest test logit of the one-process run, after 8 steps (rounding, amplified: <= ~1e-3).
FINAL_TOLERANCE = 1e-2
EXPLODING_TOLERANCE = 5e-2  # SwitOKD's student at lr 4, see the module docstring
SWITOKD = {"recipe": {"roles": {"student": {"lr": 4.0}}}}  # a student so bad that the teacher pauses (expert mode)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _params(prepared_root: Path, tmp: Path, batch_size: int, sync_batchnorm: bool, **sections: dict) -> Path:
    raw = {"recipe": {"epochs": 2, "batch_size": batch_size},
           "runtime": {"device": "cpu", "sync_batchnorm": sync_batchnorm, "threads": 1, "quiet": True}}
    raw = deep_merge(raw, sections)
    path = tmp / f"params-b{batch_size}-{'sync' if sync_batchnorm else 'local'}-{len(list(tmp.glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(prepared_root, tmp, **raw).to_dict()))
    return path


def _launch(cwd: Path, name: str, method: str, params: Path, world: int, *extra: str,
            env: dict[str, str] | None = None, timeout: float = 120) -> dict:
    """One run (under torchrun when ``world`` > 1); its outputs, records and console."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
                if world > 1 else [sys.executable])
    command = [*launcher, str(DRIVER), f"records/{name}", "train", "--params", str(params), "--method", method,
               "--seed", "0", "--out", f"runs/{name}", *extra]
    started = time.perf_counter()
    # A session of its own, so that a hung run's ranks (torchrun's children) can be ended with it.
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{name} did not finish within {timeout} s:\n{output[-4000:]}")
    records = {int(path.stem[4:]): json.loads(path.read_text()) for path in (cwd / "records" / name).glob("rank?.json")}
    return {"rc": process.returncode, "output": output, "seconds": time.perf_counter() - started,
            "records": records, "run_dir": cwd / "runs" / name, "cwd": cwd, "name": name}


def _finished(run: dict) -> None:
    assert run["rc"] == 0, run["output"][-4000:]
    assert (run["run_dir"] / "metrics.json").is_file()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def dml(prepared_root: Path, workdir: Path) -> tuple[dict, dict]:
    single = _launch(workdir, "dml-single", "dml", _params(prepared_root, workdir, WORLD * PER_RANK, True), 1)
    ddp = _launch(workdir, "dml-ddp", "dml", _params(prepared_root, workdir, PER_RANK, True), WORLD)
    return single, ddp


@pytest.fixture(scope="module")
def switokd(prepared_root: Path, workdir: Path) -> tuple[dict, dict]:
    single = _launch(workdir, "switokd-single", "switokd",
                     _params(prepared_root, workdir, WORLD * PER_RANK, True, **SWITOKD), 1)
    ddp = _launch(workdir, "switokd-ddp", "switokd", _params(prepared_root, workdir, PER_RANK, True, **SWITOKD), WORLD)
    return single, ddp


def _check_shards(single: dict, ddp: dict) -> None:
    """Disjoint shards, reshuffled every epoch, whose k-th batches together are the one-process k-th batch."""
    whole, ranks = single["records"][0]["batches"], [ddp["records"][rank]["batches"] for rank in range(WORLD)]
    assert sorted(whole) == ["1", "2"] and all(sorted(shards) == ["1", "2"] for shards in ranks)
    for epoch in whole:
        assert all(len(shards[epoch]) == len(whole[epoch]) for shards in ranks)
        for k, batch in enumerate(whole[epoch]):
            parts = [shards[epoch][k] for shards in ranks]
            assert all(len(part) == PER_RANK for part in parts)
            assert Counter(sum(parts, [])) == Counter(batch), f"epoch {epoch}, batch {k}"
        seen = [Counter(sum(shards[epoch], [])) for shards in ranks]
        assert not seen[0] & seen[1], f"epoch {epoch}: the ranks share samples"
    assert whole["1"][0] != whole["2"][0]  # reshuffled


def _check_rank_zero_alone_writes(ddp: dict) -> None:
    writes = {rank: ddp["records"][rank]["writes"] for rank in range(WORLD)}
    assert writes[1] == [], writes[1][:10]
    name = ddp["name"]
    for expected in (f"runs/{name}/metrics.json", f"runs/{name}/final.pt", f"runs/{name}/history.tsv",
                     f"checkpoints/adhoc/{name}/last.pt"):
        assert any(path == expected or Path(path).name.startswith(f".{Path(expected).name}") for path in writes[0]), expected
    assert ddp["records"][0]["tracker_enabled"] is True and ddp["records"][1]["tracker_enabled"] is False


def _check_replicas_agree(ddp: dict) -> None:
    """Every step leaves every rank with the same parameters, bit for bit, and the same updated roles."""
    first, second = (ddp["records"][rank] for rank in range(WORLD))
    assert first["ddp_roles"] == second["ddp_roles"]
    assert first["updates"] == second["updates"]
    assert first["digests"] == second["digests"]


def _check_matches_single(single: dict, ddp: dict, tolerances: dict[str, float]) -> None:
    _check_first_step_matches(single, ddp)
    logits = [torch.load(run["run_dir"] / "predictions.pt", weights_only=True)["last"]["test"] for run in (single, ddp)]
    for network, tolerance in tolerances.items():
        difference = (logits[0][network] - logits[1][network]).abs().max()
        assert difference <= tolerance * logits[0][network].abs().max(), (network, float(difference))
        assert (logits[0][network].argmax(1) == logits[1][network].argmax(1)).float().mean() >= 0.98, network


def _check_first_step_matches(single: dict, ddp: dict) -> None:
    records = [single["cwd"] / "records" / run["name"] / "rank0_step1.pt" for run in (single, ddp)]
    one, many = (torch.load(path, weights_only=True) for path in records)
    for role in one["before"]:
        assert torch.equal(one["before"][role], many["before"][role]), role  # the same initial weights
        update = one["after"][role] - one["before"][role]
        difference = (many["after"][role] - many["before"][role] - update).abs().max()
        assert difference <= FIRST_STEP_TOLERANCE * update.abs().max(), (role, float(difference))


def test_the_ranks_batches_are_the_one_process_global_batch(prepared_root: Path) -> None:
    """In process: the ranks' k-th batches (with their augmentations) make up the one-process k-th batch."""
    from reproduce.config import AugmentConfig
    from reproduce.data.loader import DeviceLoader, Normalise
    from reproduce.data.prepare import load_prepared

    split = load_prepared(prepared_root / "digits").train
    normalise = Normalise([0.5], [0.25], torch.device("cpu"), channels_last=False)

    def loader(rank: int, world: int, batch: int) -> DeviceLoader:
        return DeviceLoader(split, batch_size=batch, normalise=normalise, device=torch.device("cpu"), seed=3,
                            train=True, augment=AugmentConfig(crop_padding=1, flip=True), rank=rank, world_size=world)

    for world in (2, 3):
        whole = list(loader(0, 1, world * 16).epoch(5))
        shards = [list(loader(rank, world, 16).epoch(5)) for rank in range(world)]
        assert all(len(shard) == len(whole) for shard in shards)
        for k, (x, y) in enumerate(whole):
            together_x = torch.cat([shard[k][0] for shard in shards])
            together_y = torch.cat([shard[k][1] for shard in shards])
            order = torch.cat([torch.arange(rank, world * 16, world) for rank in range(world)])
            assert torch.equal(together_x, x[order]) and torch.equal(together_y, y[order])


@pytest.mark.slow  # torchrun
def test_dml_on_two_ranks_matches_one_process_with_the_global_batch(dml: tuple[dict, dict]) -> None:
    single, ddp = dml
    _finished(single)
    _finished(ddp)
    _check_shards(single, ddp)
    _check_rank_zero_alone_writes(ddp)
    _check_replicas_agree(ddp)
    assert ddp["records"][0]["ddp_roles"] == ["student", "teacher"]  # every role's gradients averaged
    _check_matches_single(single, ddp, {"teacher": FINAL_TOLERANCE, "student": FINAL_TOLERANCE})
    print(f"dml: one process {single['seconds']:.1f} s, two ranks {ddp['seconds']:.1f} s")


@pytest.mark.slow  # torchrun
def test_switokd_pauses_its_teacher_on_every_rank_alike(switokd: tuple[dict, dict]) -> None:
    single, ddp = switokd
    _finished(single)
    _finished(ddp)
    _check_shards(single, ddp)
    _check_rank_zero_alone_writes(ddp)
    _check_replicas_agree(ddp)
    assert ddp["records"][0]["ddp_roles"] == ["student", "teacher"]
    updates = ddp["records"][0]["updates"]
    assert updates == single["records"][0]["updates"]  # the decisions use the global batch's statistics
    paused = [step for step, roles in enumerate(updates) if roles == ["student"]]
    assert paused, "no step in expert mode: the test would not exercise the paused teacher"
    for rank in range(WORLD):
        digests = ddp["records"][rank]["digests"]
        for step in paused:  # no update, no momentum, no weight decay: the teacher's parameters stay put
            assert step > 0 and digests[step]["teacher"] == digests[step - 1]["teacher"]
            assert digests[step]["student"] != digests[step - 1]["student"]
    _check_matches_single(single, ddp, {"teacher": FINAL_TOLERANCE, "student": EXPLODING_TOLERANCE})
    print(f"switokd: one process {single['seconds']:.1f} s, two ranks {ddp['seconds']:.1f} s; paused at {paused}")


@pytest.fixture(scope="module")
def stalled(prepared_root: Path, workdir: Path) -> dict:
    """Two ranks with rank-local BatchNorm statistics (the default) and a 5 s timeout; rank 1 stalls at step 3."""
    params = _params(prepared_root, workdir, PER_RANK, False, runtime={"ddp_timeout_s": 5})
    return _launch(workdir, "stalled", "dml", params, WORLD, env={"DDP_TEST_FAULT": "stall:1:3"}, timeout=100)


@pytest.mark.slow  # torchrun
def test_a_rank_that_stops_answering_ends_the_job_with_a_timeout_error(stalled: dict) -> None:
    run = stalled
    assert run["rc"] != 0
    assert "rank 1 stops answering before step 3" in run["output"]
    assert "CollectiveTimeout: rank 0 of 2" in run["output"], run["output"][-3000:]
    assert "runtime.ddp_timeout_s = 5 s" in run["output"]
    assert run["seconds"] < 60  # startup (~7 s) + the 5 s timeout, not the stalled rank's 600 s
    assert not (run["run_dir"] / "metrics.json").exists()


@pytest.mark.slow  # torchrun
def test_without_sync_batchnorm_the_first_step_differs_and_the_check_sees_it(
        dml: tuple[dict, dict], stalled: dict) -> None:
    """The control: the same first step with each rank's own BatchNorm statistics fails the comparison."""
    single, _ = dml
    assert len(stalled["records"][0]["updates"]) == 2  # rank 0 ran two steps before the timeout
    with pytest.raises(AssertionError):
        _check_first_step_matches(single, stalled)


@pytest.mark.slow  # torchrun
def test_a_rank_that_exits_ends_the_job_at_once(prepared_root: Path, workdir: Path) -> None:
    params = _params(prepared_root, workdir, PER_RANK, False, runtime={"ddp_timeout_s": 60})
    run = _launch(workdir, "exited", "dml", params, WORLD, env={"DDP_TEST_FAULT": "exit:1:3"}, timeout=100)
    assert run["rc"] != 0
    assert "rank 1 leaves before step 3" in run["output"]
    assert "CollectiveError: rank 0 of 2: another rank left" in run["output"], run["output"][-3000:]
    assert run["seconds"] < 40  # well within the 60 s timeout: a closed connection is noticed at once


@pytest.mark.slow  # torchrun
def test_ranks_that_disagree_on_the_roles_to_update_fail_together_instead_of_hanging(
        prepared_root: Path, workdir: Path) -> None:
    params = _params(prepared_root, workdir, PER_RANK, False, runtime={"ddp_timeout_s": 60})
    run = _launch(workdir, "disagree", "dml", params, WORLD, env={"DDP_TEST_FAULT": "disagree:1:2"}, timeout=100)
    assert run["rc"] != 0
    assert "the ranks disagree on whether to update role(s) ['teacher']" in run["output"], run["output"][-3000:]
    assert "CollectiveTimeout" not in run["output"] and run["seconds"] < 40


@pytest.fixture(scope="module")
def teacher_runs(prepared_root: Path, workdir: Path) -> Path:
    """A teacher for the offline methods, trained through the CLI like every run here."""
    run = _launch(workdir, "teacher/seed0", "teacher", _params(prepared_root, workdir, 256, False), 1)
    _finished(run)
    return run["run_dir"].parent


@pytest.mark.slow  # torchrun
def test_a_role_that_bypasses_its_networks_forward_is_averaged_like_every_other(
        prepared_root: Path, teacher_runs: Path, workdir: Path) -> None:
    """SOKD calls ``self.aux.head(...)``, never ``self.aux(...)`` (and AEKT's role is a ModuleDict without a
    forward): the replicas average every role's gradients after the backward, whatever the method calls, so
    the replicas of both roles agree after every step."""
    params = _params(prepared_root, workdir, PER_RANK, False, recipe={"epochs": 1},
                     teacher={"runs_root": str(teacher_runs)}, runtime={"quiet": False})
    run = _launch(workdir, "sokd-ddp", "sokd", params, WORLD)
    _finished(run)
    _check_replicas_agree(run)
    assert len(run["records"][0]["digests"]) == 4
    assert run["records"][0]["ddp_roles"] == ["aux", "student"]
    assert "DDP: 2 ranks (gloo), roles aux, student" in run["output"]
    for rank in range(WORLD):  # both roles train: each step moves both
        digests = run["records"][rank]["digests"]
        assert all(digests[k][role] != digests[k - 1][role] for k in range(1, 4) for role in ("aux", "student"))
