"""Evaluation of every network a method reports, on every held-out split.

Logits stay on the device and the metrics are computed there; the host receives all of an epoch's
numbers in one copy (a GPU is waited for once per evaluation, not once per batch or metric)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from reproduce.data.loader import Batches
from reproduce.methods.base import Method
from reproduce.metrics import classification_metric_tensors
from reproduce.runtime import Runtime

Logits = dict[str, dict[str, Tensor]]  # split -> network -> [N, C] float32, on the device


@torch.no_grad()
def predict(networks: dict[str, nn.Module], batches: Batches, amp_dtype: torch.dtype | None,
            device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    """Logits of every network on one split (one pass over the data), and the labels, on the device."""
    outputs: dict[str, list[Tensor]] = defaultdict(list)
    labels = []
    for x, y in batches.epoch(0):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            for name, network in networks.items():
                outputs[name].append(network(x).float())
        labels.append(y)
    return {name: torch.cat(chunks) for name, chunks in outputs.items()}, torch.cat(labels)


def evaluate(method: Method, splits: dict[str, Batches], runtime: Runtime, fixed_logits: Logits | None = None,
             networks: dict[str, nn.Module] | None = None) -> tuple[dict[str, float], Logits, dict[str, Tensor]]:
    """Metrics ``{split}/{network}/{metric}`` for every evaluated network, plus the logits and labels (on
    the device).

    ``networks``: what runs each evaluated network (a compiled copy; default ``method.eval_networks()``).
    ``fixed_logits``, kept by the caller between epochs, holds the logits of the networks that cannot
    change (frozen and without a trainable parameter, like a pre-trained teacher): those are computed
    on the first call only."""
    method.eval()
    evaluated = method.eval_networks()
    runners = networks or evaluated
    frozen = {id(module) for module in method.frozen()}
    fixed = [name for name, network in evaluated.items()
             if id(network) in frozen and not any(p.requires_grad for p in network.parameters())]
    values: dict[str, Tensor] = {}
    logits: Logits = {}
    labels: dict[str, Tensor] = {}
    for split, batches in splits.items():
        known = fixed_logits.get(split, {}) if fixed_logits is not None else {}
        computed, labels[split] = predict({name: runners[name] for name in evaluated if name not in known},
                                          batches, runtime.amp_dtype, runtime.device)
        logits[split] = {name: known[name] if name in known else computed[name] for name in evaluated}
        if fixed_logits is not None:
            fixed_logits[split] = {name: logits[split][name] for name in fixed}
        for network, scores in logits[split].items():
            for metric, value in classification_metric_tensors(scores, labels[split]).items():
                values[f"{split}/{network}/{metric}"] = value
    numbers = torch.stack([value.double() for value in values.values()]).tolist() if values else []
    return dict(zip(values, numbers)), logits, labels


def to_host(logits: Logits) -> Logits:
    return {split: {name: values.cpu() for name, values in by_network.items()} for split, by_network in logits.items()}
