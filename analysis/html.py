"""The self-contained report page: inline CSS, images as base64 data URIs, no script, no web font, no
external resource, so it opens the same offline, from an e-mail attachment or a CI artefact."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from analysis.tables import Table

STYLE = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d1d1f; margin: 0;
       background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-top: 8px; border-top: 1px solid #e3e5e8; }
h3 { font-size: 16px; margin: 22px 0 6px; }
p.lead { color: #4a4f57; margin: 0 0 12px; }
nav { margin: 12px 0 4px; }
nav a { margin-right: 14px; color: #0b5cad; text-decoration: none; }
.notes { background: #fff7e6; border: 1px solid #f0c36d; padding: 8px 14px; border-radius: 4px; }
.ok { background: #eef8ee; border: 1px solid #9fd19f; padding: 8px 14px; border-radius: 4px; }
.statement { background: #eef3fb; border-left: 4px solid #0b5cad; padding: 8px 12px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0 14px; }
caption { caption-side: bottom; text-align: left; color: #5a606a; font-size: 12px; padding-top: 6px;
          max-width: 1100px; }
th, td { padding: 4px 6px; border-bottom: 1px solid #e3e5e8; white-space: nowrap; vertical-align: top; }
th { border-bottom: 2px solid #9aa0a8; background: #fafbfc; }
.l { text-align: left; }
.r { text-align: right; }
td.wrap { white-space: normal; min-width: 220px; }
figure { margin: 10px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eceef1; }
figcaption { color: #5a606a; font-size: 12.5px; margin-top: 4px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 6px 18px; }
pre { background: #f4f5f7; padding: 10px 12px; overflow-x: auto; font-size: 12px; border-radius: 4px; }
details summary { cursor: pointer; color: #0b5cad; margin: 6px 0; }
"""


@dataclass
class FigureEntry:
    stem: str
    title: str
    caption: str
    png: Path
    wide: bool  # two-column figure: full width instead of a card


@dataclass
class Section:
    anchor: str
    title: str
    parts: list[str] = field(default_factory=list)  # HTML fragments, in order

    def paragraph(self, text: str, css_class: str = "") -> None:
        attribute = f' class="{css_class}"' if css_class else ""
        self.parts.append(f"<p{attribute}>{html.escape(text)}</p>")

    def heading(self, text: str) -> None:
        self.parts.append(f"<h3>{html.escape(text)}</h3>")

    def table(self, table: Table) -> None:
        self.parts.append(f'<div class="scroll">{table.to_html()}</div>')

    def figures(self, entries: list[FigureEntry]) -> None:
        wide = [entry for entry in entries if entry.wide]
        narrow = [entry for entry in entries if not entry.wide]
        self.parts.extend(_figure(entry) for entry in wide)
        if narrow:
            self.parts.append('<div class="cards">' + "".join(_figure(entry) for entry in narrow) + "</div>")

    def items(self, lines: list[str], css_class: str) -> None:
        self.parts.append(f'<ul class="{css_class}">' + "".join(f"<li>{html.escape(line)}</li>" for line in lines)
                          + "</ul>")

    def preformatted(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def collapsed(self, summary: str, fragment: str) -> None:
        self.parts.append(f"<details><summary>{html.escape(summary)}</summary>{fragment}</details>")


def _figure(entry: FigureEntry) -> str:
    data = base64.b64encode(entry.png.read_bytes()).decode("ascii")
    return (f'<figure id="fig-{html.escape(entry.stem)}"><img alt="{html.escape(entry.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption><strong>{html.escape(entry.title)}.</strong> '
            f"{html.escape(entry.caption)} (figures/{html.escape(entry.stem)}.png"
            f"{', .pdf' if entry.png.with_suffix('.pdf').exists() else ''})</figcaption></figure>")


def render_page(title: str, lead: str, sections: list[Section]) -> str:
    navigation = "".join(f'<a href="#{section.anchor}">{html.escape(section.title)}</a>' for section in sections)
    body = "".join(f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>{"".join(section.parts)}'
                   f"</section>" for section in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body><main>"
            f"<h1>{html.escape(title)}</h1><p class=\"lead\">{html.escape(lead)}</p><nav>{navigation}</nav>"
            f"{body}</main></body></html>\n")
