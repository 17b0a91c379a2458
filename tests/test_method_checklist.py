"""What every registered method must do, checked over the registry: a new method file is tested here
without editing any list. Its own behaviour (its maths, options and signals) goes in
tests/test_<method>.py, built from tests/method_kit.py.

The checklist:
- it declares a display name, a table row of its own and a valid Optuna search space;
- an unknown coefficient is an error naming ``methods.<name>.<key>``;
- each role's loss reaches only that role's parameters (peer targets are detached);
- an engine step gives finite losses and finite parameters, and moves every role it updates;
- a step never reads a value back from the device: zero host syncs per step through the engine's epoch;
- (slow) the compiled step gives the eager step's losses and parameters.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from benchmarks.counting import count_dispatch
from method_kit import CPU, FixedBatches, batch, build, optimizers_for, run_epoch, total_loss, trainable
from reproduce.methods.base import ConfigError, MethodKind, registered

METHODS = [cls.name for cls in registered()]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_method_declares_its_name_row_and_space() -> None:
    from sweeps.space import parse_space

    classes = registered()
    rows = [cls.row_order for cls in classes]
    assert len(set(rows)) == len(rows), "two methods share a table row"
    assert [cls.name for cls in classes[:2]] == ["teacher", "vanilla"]  # the reference rows come first
    for cls in classes:
        assert isinstance(cls.display_name, str) and cls.display_name, cls.name
        assert isinstance(cls.kind, MethodKind), cls.name
        assert set(parse_space(cls.search_space, cls.name, None)) == set(cls.search_space)  # a valid space


@pytest.mark.parametrize("name", METHODS)
def test_an_unknown_coefficient_names_its_key(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"methods\.{name}\.not_a_coefficient"):
        registered_class(name).parse_params({"not_a_coefficient": 1})


def registered_class(name: str) -> type:
    return next(cls for cls in registered() if cls.name == name)


@pytest.mark.parametrize("name", [name for name in METHODS if len(build(name).roles()) > 1])
def test_each_role_loss_reaches_only_its_own_network(name: str) -> None:
    roles = sorted(build(name).roles())
    for own in roles:
        method = build(name)
        step = method.step(*batch(), 1)
        total_loss(step, own).backward()
        for peer in roles:
            if peer != own:
                assert all(p.grad is None for p in trainable(method, peer)), f"{own}'s loss leaked into {peer}"
        assert any(p.grad is not None for p in trainable(method, own))


@pytest.mark.parametrize("name", METHODS)
def test_an_engine_step_is_finite_and_moves_the_updated_roles(name: str) -> None:
    method = build(name)
    optimizers = optimizers_for(method)
    before = {role: [p.detach().clone() for p in trainable(method, role)] for role in method.roles()}
    tally = run_epoch(method, optimizers, FixedBatches(batch()))
    result = tally.result()
    assert result.divergence is None and all(torch.isfinite(torch.tensor(v)) for v in result.means.values())
    for role in method.roles():
        after = trainable(method, role)
        assert all(torch.isfinite(p).all() for p in after), role
        assert any(not torch.equal(old, new) for old, new in zip(before[role], after)), f"{role} did not move"


@pytest.mark.parametrize("name", METHODS)
def test_a_step_never_waits_for_the_device(name: str) -> None:
    """Host syncs per step through the engine's epoch, counted by a TorchDispatchMode (benchmarks/counting.py):
    a read of a value computed from the batch or the weights (``.item()``, ``bool(t)``, ``.tolist()``, a
    copy to the host) would stall a GPU every step. The epoch's one read is ``tally.result()``, after it."""
    method = build(name)
    optimizers = optimizers_for(method)
    batches = FixedBatches(batch(1), batch(2), batch(3))
    run_epoch(method, optimizers, batches)  # the optimisers' state exists from here on
    with count_dispatch() as counts:
        tally = run_epoch(method, optimizers, batches, epoch=2)
    assert counts.syncs == 0, f"{name}: {counts.syncs} host syncs in {len(batches)} steps: {dict(counts.where)}"
    assert counts.ops > 0
    with count_dispatch() as counts:
        tally.result()
    assert counts.syncs == 1  # the epoch's numbers, read once


def test_the_sync_counter_sees_reads_of_the_training_state() -> None:
    """The control: a read of a value derived from the weights counts, one of a value drawn on the host
    from scratch (R2KD's CutMix box) does not."""
    method = build("vanilla")
    with count_dispatch() as counts:
        loss = method.network(batch()[0]).sum()
        float(loss)
        bool(loss > 0)
        loss.detach().reshape(1).tolist()
        int(torch.randint(5, ()))  # host data: no sync
        float(torch.distributions.Beta(1.0, 1.0).sample())
    assert counts.syncs == 3, dict(counts.where)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_the_compiled_step_matches_the_eager_step_and_compiles_once(name: str) -> None:
    """``runtime.compile``: the whole step (losses, backward, optimiser steps) compiled, every network the
    method calls inside it, against the eager step on the same batches: the same losses and parameters
    within float32 rounding, and no new graph in the second epoch (the epoch and the learning rates are
    tensors, not constants of the graph). Captured with the aot_eager backend (Dynamo and AOTAutograd, as
    Inductor sees it, without its C++ code generation, which takes minutes per graph on this CPU; the engine
    test compiles a real run with Inductor)."""
    from torch._dynamo.utils import counters

    from reproduce.train.compiled import CompiledStep

    torch._dynamo.reset()
    counters.clear()
    eager = build(name)
    compiled = copy.deepcopy(eager)
    runtime = dataclasses.replace(CPU, compile=True, compile_backend="aot_eager")
    eager_optimizers, compiled_optimizers = optimizers_for(eager), optimizers_for(compiled, runtime=runtime)
    assert torch.is_tensor(compiled_optimizers["student" if "student" in compiled_optimizers else "teacher"]
                           .param_groups[0]["lr"])
    batches = FixedBatches(batch(1), batch(2))
    step = CompiledStep(runtime)
    for epoch in (1, 2):  # the same random draws (R2KD's augmented view) in both
        torch.manual_seed(epoch)
        expected = run_epoch(eager, eager_optimizers, batches, epoch=epoch).result().means
        torch.manual_seed(epoch)
        actual = run_epoch(compiled, compiled_optimizers, batches, epoch=epoch, runtime=runtime, compiled=step
                           ).result().means
        if epoch == 1:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs > 0
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled in the second epoch"
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for (key, value), other in zip(eager.state_dict().items(), compiled.state_dict().values()):
        if value.is_floating_point():
            torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=key)
