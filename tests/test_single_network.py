"""The teacher and vanilla methods (base.SingleNetwork): one network of their role, cross-entropy."""

from __future__ import annotations

import pytest
import torch

from method_kit import CHANNELS, CLASSES, batch, networks
from reproduce import models
from reproduce.config import ConfigError
from reproduce.methods import MethodKind, get_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_declarations() -> None:
    method_cls = get_method("teacher")
    assert method_cls.display_name == 'Teacher (vanilla)' and method_cls.row_order == 0
    assert method_cls.search_space == get_method("vanilla").search_space == {}
    assert get_method("vanilla").display_name == "Vanilla student" and get_method("vanilla").row_order == 1


@pytest.mark.parametrize("name, role, arch", [("teacher", "teacher", "resnet14"), ("vanilla", "student", "resnet8")])
def test_teacher_and_vanilla_train_one_network_of_their_role(name: str, role: str, arch: str) -> None:
    torch.manual_seed(0)
    method_cls = get_method(name)
    method = method_cls(networks(teacher="resnet14", student="resnet8"), method_cls.parse_params({})).train()
    assert method_cls.primary == role and set(method.roles()) == {role} == set(method.eval_networks())
    assert method_cls.kind is MethodKind.STANDALONE
    reference = models.create(arch, CLASSES, in_channels=CHANNELS)
    assert [p.shape for p in method.roles()[role].parameters()] == [p.shape for p in reference.parameters()]
    x, y = batch()
    step = method.step(x, y, 1)
    assert set(step.losses) == {role} and step.update is None
    expected = torch.nn.functional.cross_entropy(method.roles()[role](x), y)
    assert step.losses[role]["ce"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_vanilla_has_no_network_option() -> None:
    with pytest.raises(ConfigError, match="methods.vanilla.network"):
        get_method("vanilla").parse_params({"network": "teacher"})
