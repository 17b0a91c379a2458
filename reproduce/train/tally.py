"""An epoch's numbers kept on the device: the running sums of every loss term and signal, and every loss
term of every step, so that a step never waits for the device (no ``.item()``, no ``bool(...)``).

``result()`` copies it all to the host at once, at the end of the epoch (one sync per epoch): the epoch's
means, and the first step, role and term that went NaN or infinite, if any.

Sums accumulate step after step in float32 (float64 for a float64 signal), as a Python loop of ``+=`` does;
a role that a step gates off (``Step.gates``) adds nothing and counts nothing, as if it were absent. A
signal given as a Python float is summed on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from reproduce.methods.base import Step


@dataclass
class Divergence:
    """The first loss term of an epoch that was not finite."""

    step: int  # within the epoch, counted from 1
    role: str
    term: str
    value: float


@dataclass
class EpochResult:
    means: dict[str, float]  # "train/<role>/loss_<term>", "train/<role>/loss", "signal/<name>"
    divergence: Divergence | None


def _signature(step: Step) -> tuple:
    return (tuple((role, tuple(losses)) for role, losses in step.losses.items()), tuple(sorted(step.gates)),
            tuple((name, _kind(value)) for name, value in step.signals.items()))


def _kind(value: Tensor | float) -> str:
    if not torch.is_tensor(value):
        return "host"
    return "wide" if value.dtype == torch.float64 else "narrow"


class _Layout:
    """The sums and records of the steps that produce one set of roles, terms, gates and signals."""

    def __init__(self, step: Step, steps: int, device: torch.device) -> None:
        self.signature = _signature(step)
        self.terms = [(role, term) for role, losses in step.losses.items() for term in losses]
        signals = {kind: [name for name, value in step.signals.items() if _kind(value) == kind]
                   for kind in ("narrow", "wide", "host")}
        self.signals = signals
        # The float32 vector: every term, every role's total, the float32 signals; its keys in the row's order.
        self.roles = list(step.losses)
        self.narrow_keys = ([f"train/{role}/loss_{term}" for role, term in self.terms]
                            + [f"train/{role}/loss" for role in self.roles]
                            + [f"signal/{name}" for name in signals["narrow"]])
        self.order = [key for role in self.roles
                      for key in [*(f"train/{role}/loss_{term}" for term in step.losses[role]), f"train/{role}/loss"]]
        self.order += [f"signal/{name}" for name in step.signals]
        self.sums = torch.zeros(len(self.narrow_keys), device=device)
        self.wide_sums = torch.zeros(len(signals["wide"]), dtype=torch.float64, device=device)
        self.host_sums = [0.0] * len(signals["host"])
        self.steps = 0
        # A gated role counts only the steps it is updated in, so its counts are on the device.
        self.gated = bool(step.gates)
        self.counts = torch.zeros(len(self.narrow_keys), device=device)
        self.always = torch.ones((), dtype=torch.bool, device=device)
        self.values = torch.full((steps, len(self.terms)), float("nan"), device=device)  # every term of every step
        self.live = torch.zeros((steps, len(self.terms)), dtype=torch.bool, device=device)  # ... that counted

    def add(self, step: Step, index: int) -> None:
        terms = [step.losses[role][term].detach().float() for role, term in self.terms]
        totals = [sum(value.detach() for value in step.losses[role].values()).float() for role in self.roles]
        values = torch.stack(terms + totals + [step.signals[name].detach().float() for name in self.signals["narrow"]])
        if self.gated:
            on = torch.stack([step.gates.get(role, self.always) for role, _ in self.terms]
                             + [step.gates.get(role, self.always) for role in self.roles]
                             + [self.always] * len(self.signals["narrow"]))
            self.sums += torch.where(on, values, 0.0)
            self.counts += on
            self.live[index] = on[:len(self.terms)]
        else:
            self.sums += values
            self.live[index] = True
        self.values[index] = values[:len(self.terms)]
        if self.signals["wide"]:
            self.wide_sums += torch.stack([step.signals[name].detach() for name in self.signals["wide"]])
        for k, name in enumerate(self.signals["host"]):
            self.host_sums[k] += step.signals[name]
        self.steps += 1

    def on_device(self) -> Tensor:
        """What the host needs, as one float64 vector: sums, counts, wide sums, then the first non-finite
        term's (any, flat index, value), in step-major order: the earliest step, then the terms' order."""
        bad = (~self.values.isfinite() & self.live).flatten()
        first = bad.to(torch.uint8).argmax().reshape(1)  # a 1-element index: a 0-d one would be read on the host
        counts = self.counts if self.gated else torch.full_like(self.sums, float(self.steps))
        return torch.cat([self.sums.double(), counts.double(), self.wide_sums, bad.any().double().reshape(1),
                          first.double(), self.values.flatten()[first].double()])

    def read(self, numbers: list[float]) -> tuple[dict[str, tuple[float, float]], Divergence | None]:
        """``(sum, count)`` per key and the divergence from ``on_device()``'s numbers, in the row's order."""
        narrow = len(self.narrow_keys)
        totals = dict(zip(self.narrow_keys, zip(numbers[:narrow], numbers[narrow:2 * narrow])))
        wide = numbers[2 * narrow:2 * narrow + len(self.signals["wide"])]
        steps = float(self.steps)
        totals.update({f"signal/{name}": (total, steps) for name, total in zip(self.signals["wide"], wide)})
        totals.update({f"signal/{name}": (total, steps) for name, total in zip(self.signals["host"], self.host_sums)})
        diverged, first, value = numbers[-3:]
        divergence = None
        if diverged:
            step, term = divmod(int(first), len(self.terms))
            divergence = Divergence(step + 1, *self.terms[term], value)
        return {key: totals[key] for key in self.order}, divergence

    def size(self) -> int:
        return 2 * len(self.narrow_keys) + len(self.signals["wide"]) + 3


class EpochTally:
    """What ``train_epoch`` accumulates: ``add`` every step (device work only), ``result`` once."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps = steps
        self.device = device
        self.layouts: dict[tuple, _Layout] = {}
        self.images = 0  # trained on by this process (the loop counts them)
        self.seconds = 0.0  # the epoch's training time (the loop measures it)

    def add(self, step: Step, index: int) -> None:
        signature = _signature(step)
        if signature not in self.layouts:
            self.layouts[signature] = _Layout(step, self.steps, self.device)
        self.layouts[signature].add(step, index)

    def result(self) -> EpochResult:
        layouts = list(self.layouts.values())
        numbers = torch.cat([layout.on_device() for layout in layouts]).tolist() if layouts else []
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        divergence: Divergence | None = None
        offset = 0
        for layout in layouts:
            totals, diverged = layout.read(numbers[offset:offset + layout.size()])
            offset += layout.size()
            for key, (total, count) in totals.items():
                sums[key], counts[key] = sums.get(key, 0.0) + total, counts.get(key, 0.0) + count
            if diverged is not None and (divergence is None or diverged.step < divergence.step):
                divergence = diverged
        return EpochResult({key: total / counts[key] for key, total in sums.items() if counts[key] > 0}, divergence)
