"""Teacher [standard]: ``models.teacher`` trained alone with cross-entropy. Its weights
(runs/teacher/seed<k>/final.pt) are what every offline method distils from, and its run is the
"Teacher (vanilla)" row of every table. The training is vanilla's (base.SingleNetwork)."""

from __future__ import annotations

from reproduce.methods.base import SingleNetwork, register


@register
class Teacher(SingleNetwork):
    name = "teacher"
    display_name = "Teacher (vanilla)"
    role = "teacher"
    primary = "teacher"
    row_order = 0
