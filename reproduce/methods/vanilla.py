"""Vanilla [standard]: ``models.student`` trained alone with cross-entropy, the "vanilla student" row
of every table.

The training is ``base.SingleNetwork``, shared with the ``teacher`` method: only the role, and so
the architecture and the evaluated network, differs."""

from __future__ import annotations

from reproduce.methods.base import SingleNetwork, register


@register
class Vanilla(SingleNetwork):
    name = "vanilla"
    display_name = "Vanilla student"
    role = "student"
    primary = "student"
    row_order = 1
