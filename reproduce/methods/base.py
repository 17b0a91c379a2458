"""The method contract: a method owns its networks and computes their losses; the engine owns the rest.

A training step (reproduce/train/step.py) is::

    step = method.step(x, y, epoch)            # named losses per role, detached peer targets
    sum(losses of the updated roles).backward()
    optimizer[role].step() for every updated role (kept only where step.gates[role] is on, if gated)

Because every peer target is detached inside the losses, the loss of role ``r`` has gradients only
in role ``r``'s parameters, so one backward of the sum is exact. A role left out of ``step.update``, or
gated off by ``step.gates`` (SwitOKD's paused teacher), gets no update, no momentum and no weight decay.

A step never reads a value back from the device (no ``.item()``, ``float(tensor)``, ``if tensor``): a
decision that depends on the data is a 0-d bool tensor in ``step.gates``, a coefficient that depends on it
is a tensor (``ramp``), and signals are tensors the engine averages over the epoch. ``epoch`` is a 0-d
float tensor in training (so that a compiled step is not recompiled every epoch); do arithmetic on it.

Adding a method is one file in this package: a ``Method`` subclass decorated with ``@register``
(the ``METHODS`` registry, reproduce/registry.py), declaring its ``kind`` (``MethodKind``),
with its coefficients as a ``Params`` dataclass whose defaults are the paper's (params.yaml
``methods.<name>`` overrides them), its display name, its table row and its Optuna search space.
Everything else (the DVC stages, the sweeps, the tables) is derived from the registry:
``python -m pipeline sync`` writes the lists DVC reads (registry.yaml).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from reproduce.config import Config, ConfigError, build_dataclass, check_choice  # noqa: F401  (re-exported for methods)
from reproduce.losses import cross_entropy
from reproduce.registry import Registry


class MethodKind(enum.Enum):
    """What a method trains, and so what it needs before it runs."""

    STANDALONE = "standalone"  # one network from scratch with its own loss (the teacher, the vanilla student)
    OFFLINE = "offline"  # a fresh student distils from the `teacher` method's trained, frozen weights
    ONLINE = "online"  # every network trains from scratch together, each learning from the others


# Every method by name; ``@register`` (bare: the class's ``name``) adds one. Importing the package
# ``reproduce.methods`` (which the registry does on its first lookup) registers every method file.
METHODS: Registry[type["Method"]] = Registry("method", "reproduce.methods")
register = METHODS.register


@dataclass
class Step:
    """What one training step of a method produced."""

    losses: dict[str, dict[str, Tensor]]  # role -> named loss terms (summed by the engine)
    update: frozenset[str] | None = None  # roles whose optimisers step, decided in Python; None = every role
    # role -> 0-d bool tensor: the role's update is kept only where True (a decision taken on the device).
    # Its losses count in the epoch's means only in the steps it is on.
    gates: dict[str, Tensor] = field(default_factory=dict)
    signals: dict[str, Tensor | float] = field(default_factory=dict)  # logged as per-epoch means


@dataclass
class Networks:
    """How a method gets its networks: fresh ones by architecture, and the pre-trained teacher."""

    teacher_arch: str
    student_arch: str
    num_classes: int
    in_channels: int
    create: Callable[[str], nn.Module]  # fresh, randomly initialised network of an architecture
    load_teacher: Callable[[], nn.Module]  # the trained teacher (offline methods), clear error if missing

    def student(self) -> nn.Module:
        return self.create(self.student_arch)

    def fresh_teacher(self) -> nn.Module:
        return self.create(self.teacher_arch)


class Method(nn.Module, abc.ABC):
    name: ClassVar[str]  # registry key and run label: runs/<name>/seed<k>/
    display_name: ClassVar[str]  # in tables, figures and the report
    kind: ClassVar[MethodKind]
    primary: ClassVar[str] = "student"  # the evaluated network whose top-1 picks the best epoch
    row_order: ClassVar[int] = 100  # position in tables (teacher 0, vanilla 1, baselines, then the papers)
    # The Optuna space over the Params fields (sweeps/space.py's format); {} = nothing to tune, no sweep.
    # params.yaml sweep.spaces.<name> replaces it when given.
    search_space: ClassVar[dict[str, dict[str, Any]]] = {}

    @dataclass
    class Params:
        """The method's coefficients, with the paper's defaults (a method without any keeps this)."""

    def __init__(self, networks: Networks, params: Any) -> None:
        super().__init__()
        self.params = params

    # -- the contract -------------------------------------------------------------------------

    @abc.abstractmethod
    def roles(self) -> dict[str, nn.Module]:
        """Trainable modules by role; each role gets its own optimiser and schedule."""

    @abc.abstractmethod
    def step(self, x: Tensor, y: Tensor, epoch: int | Tensor) -> Step:
        """Losses of one mini-batch. ``epoch`` counts from 1 (DKD's warm-up uses it through ``ramp``)."""

    def eval_networks(self) -> dict[str, nn.Module]:
        """Networks evaluated every epoch (top-1, ECE, ...), by name. Defaults to the roles."""
        return self.roles()

    def frozen(self) -> list[nn.Module]:
        """Modules kept in eval() mode while the method trains (a pre-trained teacher)."""
        return []

    def end_of_training(self, run_dir: Path) -> dict[str, Path]:
        """Write method-specific artefacts (figures) into ``run_dir``; returns name -> file."""
        return {}

    # -- shared machinery ---------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        for module in self.frozen():
            module.eval()
        return self

    @classmethod
    def parse_params(cls, raw: dict[str, Any] | None) -> Any:
        """The method's coefficients with ``raw`` (params.yaml ``methods.<name>``) over the defaults,
        validated: the method's own ``validate``, plus ranges every method shares by name (a temperature
        is positive, a loss weight is not negative)."""
        params = build_dataclass(cls.Params, raw or {}, f"methods.{cls.name}")
        for key, value in dataclasses.asdict(params).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key == "temperature" and not value > 0:
                raise ConfigError(f"methods.{cls.name}.temperature: must be > 0, got {value}")
            if key.endswith("_weight") and not value >= 0:
                raise ConfigError(f"methods.{cls.name}.{key}: a loss weight must be >= 0, got {value}")
        return params

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return dataclasses.asdict(cls.Params())


def registered() -> list[type[Method]]:
    """Every registered method in table order."""
    return sorted((cls for _, cls in METHODS.items()), key=lambda cls: (cls.row_order, cls.name))


class TeacherStudentMethod(Method):
    """Offline distillation: a fresh student learns from the frozen, pre-trained teacher.

    The teacher is evaluated every epoch too (a check that the loaded weights are the trained ones)."""

    kind = MethodKind.OFFLINE

    def __init__(self, networks: Networks, params: Any) -> None:
        super().__init__(networks, params)
        self.student = networks.student()
        self.teacher = networks.load_teacher()

    def roles(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def eval_networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher}

    def frozen(self) -> list[nn.Module]:
        return [self.teacher]


class SingleNetwork(Method):
    """Cross-entropy training of the network of params.yaml ``models.<role>``, from scratch."""

    role: ClassVar[str]  # "teacher" | "student": the architecture, the role and the evaluated network
    kind = MethodKind.STANDALONE
    search_space: ClassVar[dict[str, dict[str, Any]]] = {}  # nothing to tune

    def __init__(self, networks: Networks, params: Any) -> None:
        super().__init__(networks, params)
        self.network = networks.fresh_teacher() if self.role == "teacher" else networks.student()

    def roles(self) -> dict[str, nn.Module]:
        return {self.role: self.network}

    def step(self, x: Tensor, y: Tensor, epoch: int | Tensor) -> Step:
        return Step(losses={self.role: {"ce": cross_entropy(self.network(x), y)}})


class OnlinePairMethod(Method):
    """Online distillation of a pair: teacher and student both train from scratch, each a role."""

    kind = MethodKind.ONLINE

    def __init__(self, networks: Networks, params: Any) -> None:
        super().__init__(networks, params)
        self.teacher = networks.fresh_teacher()
        self.student = networks.student()

    def roles(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "student": self.student}


class PeerGroupMethod(Method):
    """Online distillation of K >= 2 peers trained from scratch together: the pair of params.yaml
    ``models`` (``teacher`` is simply the larger peer) plus ``params.extra_students`` more copies of
    the student architecture, each its own role. Subclasses compute every peer's losses from one
    forward per peer (O(K), not O(K²))."""

    kind = MethodKind.ONLINE

    @classmethod
    def parse_params(cls, raw: dict[str, Any] | None) -> Any:
        params = super().parse_params(raw)
        if params.extra_students < 0:
            raise ConfigError(f"methods.{cls.name}.extra_students: must be >= 0, got {params.extra_students}")
        return params

    def __init__(self, networks: Networks, params: Any) -> None:
        super().__init__(networks, params)
        peers = {"teacher": networks.fresh_teacher(), "student": networks.student()}
        peers.update({f"student{k + 2}": networks.student() for k in range(params.extra_students)})
        self.peers = nn.ModuleDict(peers)

    def roles(self) -> dict[str, nn.Module]:
        return dict(self.peers.items())


def get_method(name: str, where: str | None = None) -> type[Method]:
    """The registered method called ``name`` (a ConfigError with the choices, prefixed by ``where``, if none)."""
    return METHODS.get(name, where)


def build_method(config: Config, name: str, networks: Networks) -> Method:
    cls = get_method(name)
    return cls(networks, cls.parse_params(config.methods.get(name)))


def ramp(epoch: int | Tensor, epochs: int) -> float | Tensor:
    """``min(epoch / epochs, 1)``: a linear warm-up over ``epochs`` epochs (a tensor for a tensor epoch)."""
    return (epoch / epochs).clamp(max=1.0) if torch.is_tensor(epoch) else min(epoch / epochs, 1.0)


def mean_of(values: Tensor) -> Tensor:
    """Batch mean of a per-sample signal, detached (signals are logged, never back-propagated)."""
    return values.detach().float().mean()
