"""Vanilla: one network, cross-entropy [standard]. Trains the teachers and the "vanilla student" row."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from reproduce.losses import cross_entropy
from reproduce.methods.base import Method, Networks, Step, check_choice, register


@register
class Vanilla(Method):
    name = "vanilla"
    online = False

    @dataclass
    class Params:
        network: str = "student"  # which architecture of params.yaml `models` to train: student | teacher

        def validate(self) -> None:
            check_choice(self.network, ("student", "teacher"), "methods.vanilla.network")

    def __init__(self, networks: Networks, params: Params) -> None:
        super().__init__(networks, params)
        self.primary = params.network
        self.network = networks.fresh_teacher() if params.network == "teacher" else networks.student()

    def roles(self) -> dict[str, nn.Module]:
        return {self.params.network: self.network}

    def step(self, x: Tensor, y: Tensor, epoch: int) -> Step:
        return Step(losses={self.params.network: {"ce": cross_entropy(self.network(x), y)}})
