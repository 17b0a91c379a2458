"""The report page: analysis/templates/report.html.j2 (its layout, its CSS and its prose) rendered with jinja2.

The page is self-contained: inline CSS, images as base64 data URIs, no script, no web font, no external
resource, so it opens the same offline, from an e-mail attachment or a CI artefact. Autoescaping is on:
notes and warnings quote file names and messages verbatim.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).with_name("templates")
PAGE_TEMPLATE = "report.html.j2"
# The width of the page's content (the CSS main max-width; padding comes on top): what a table may take.
CONTENT_WIDTH_PX = 1180
WRAP_AFTER_CHARACTERS = 40  # table cells longer than this (notes, citations) may wrap; numbers never do


@dataclass
class FigureEntry:
    stem: str
    title: str
    caption: str
    png: Path
    wide: bool  # two-column figure: full width instead of a card

    @property
    def has_pdf(self) -> bool:
        return self.png.with_suffix(".pdf").exists()


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["data_uri"] = png_data_uri
    environment.globals.update(content_width=CONTENT_WIDTH_PX, wrap_after=WRAP_AFTER_CHARACTERS)
    return environment


def render_page(**context: Any) -> str:
    """The page from the template; every name the template uses must be given (StrictUndefined). The
    template's macro definitions leave blank lines before the doctype: stripped."""
    return _environment().get_template(PAGE_TEMPLATE).render(**context).strip() + "\n"
