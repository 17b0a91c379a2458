"""Datasets: upstream readers (``sources/``, one file per dataset), the prepared cache (``prepare``) and the
loaders that feed training (``loader`` for in-memory data; ``streaming`` for image files, whose evaluation
views ``eval_cache`` decodes once)."""

from __future__ import annotations


def dataset_names() -> list[str]:
    """The registered dataset names, sorted; cheap (imports no torch), for validating ``dataset.name``."""
    from reproduce.data.sources import SOURCES

    return SOURCES.names()
