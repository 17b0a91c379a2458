"""Evaluation of every network a method reports, on every held-out split."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from reproduce.data.loader import Batches
from reproduce.methods.base import Method
from reproduce.metrics import classification_metrics
from reproduce.runtime import Runtime


@torch.no_grad()
def predict(networks: dict[str, nn.Module], batches: Batches, amp_dtype: torch.dtype | None,
            device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    """Logits of every network on one split (one pass over the data), and the labels."""
    outputs: dict[str, list[Tensor]] = defaultdict(list)
    labels = []
    for x, y in batches.epoch(0):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            for name, network in networks.items():
                outputs[name].append(network(x).float().cpu())
        labels.append(y.cpu())
    return {name: torch.cat(chunks) for name, chunks in outputs.items()}, torch.cat(labels)


def evaluate(method: Method, splits: dict[str, Batches], runtime: Runtime,
             fixed_logits: dict[str, dict[str, Tensor]] | None = None,
             ) -> tuple[dict[str, float], dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Metrics ``{split}/{network}/{metric}`` for every evaluated network, plus the raw logits.

    ``fixed_logits``, kept by the caller between epochs, holds the logits of the networks that cannot
    change (frozen and without a trainable parameter, like a pre-trained teacher): those are computed
    on the first call only."""
    method.eval()
    networks = method.eval_networks()
    frozen = {id(module) for module in method.frozen()}
    fixed = [name for name, network in networks.items()
             if id(network) in frozen and not any(p.requires_grad for p in network.parameters())]
    metrics: dict[str, float] = {}
    logits: dict[str, dict[str, Tensor]] = {}
    labels: dict[str, Tensor] = {}
    for split, batches in splits.items():
        known = fixed_logits.get(split, {}) if fixed_logits is not None else {}
        computed, labels[split] = predict({name: network for name, network in networks.items() if name not in known},
                                          batches, runtime.amp_dtype, runtime.device)
        logits[split] = {name: known[name] if name in known else computed[name] for name in networks}
        if fixed_logits is not None:
            fixed_logits[split] = {name: logits[split][name] for name in fixed}
        for network, values in logits[split].items():
            for metric, value in classification_metrics(values, labels[split]).items():
                metrics[f"{split}/{network}/{metric}"] = value
    return metrics, logits, labels
