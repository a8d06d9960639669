"""A self-contained HTML page of examples: images, generated vs reference report, findings, metrics.

Used by `ifnet evaluate` and `ifnet demo`. Images are embedded as base64 PNG thumbnails so the page
can be mailed or attached to a paper's supplement as one file. Every text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from ifnet.io_utils import atomic_write_text


@dataclass
class Example:
    """One study on the page. ``images`` are 2-D uint8 arrays (frontal, lateral, ...)."""

    study_id: str
    generated: str
    reference: str | None = None
    images: Sequence[np.ndarray] = ()
    enhanced: Sequence[np.ndarray] = ()
    findings: Mapping[str, float] = field(default_factory=dict)  # observation -> probability
    reference_findings: Sequence[str] = ()
    # the observations the report was decoded from (None: not known; highlighting then falls back to p >= 0.5)
    condition: Sequence[str] | None = None
    # what the report says against that condition (ifnet.metrics.consistency): "unsaid" and "unsupported" lists
    consistency: Mapping[str, Sequence[str]] = field(default_factory=dict)


def png_data_uri(img: np.ndarray, max_side: int = 256) -> str:
    pil = Image.fromarray(np.asarray(img))
    pil.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px}
table.metrics{border-collapse:collapse} table.metrics td,table.metrics th{border:1px solid #ccc;padding:4px 10px;text-align:right}
table.metrics th{background:#f3f3f3} table.metrics td:first-child{text-align:left}
.study{border:1px solid #ddd;border-radius:6px;padding:12px;margin:14px 0;display:flex;gap:16px;flex-wrap:wrap}
.imgs{display:flex;gap:6px;flex-wrap:wrap} .imgs figure{margin:0;text-align:center;font-size:12px;color:#666}
.imgs img{width:160px;height:160px;object-fit:contain;background:#000;border-radius:3px}
.texts{flex:1;min-width:320px} .label{font-size:12px;color:#666;text-transform:uppercase;letter-spacing:.04em}
.report{background:#f7f7f7;padding:8px;border-radius:4px;margin:2px 0 10px 0}
.gen{border-left:4px solid #2b7bd6} .ref{border-left:4px solid #3aa55d}
.finding{display:inline-block;border-radius:10px;padding:1px 8px;margin:2px;font-size:12px;background:#eef}
.finding.hi{background:#fbd} .note{color:#8a5a00;background:#fff6e0;padding:8px;border-radius:4px}
"""


def render_page(title: str, examples: Sequence[Example], *, metrics: Mapping[str, float] | None = None,
                curves_png: Path | None = None, notes: Sequence[str] = (), threshold: float = 0.5) -> str:
    e = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"]
    for note in notes:
        parts.append(f"<p class='note'>{e(note)}</p>")
    if metrics:
        parts.append("<h2>Metrics</h2><table class='metrics'><tr><th>metric</th><th>value</th></tr>")
        for k, v in metrics.items():
            value = f"{v:.4f}" if isinstance(v, float) else e(str(v))
            parts.append(f"<tr><td>{e(k)}</td><td>{value}</td></tr>")
        parts.append("</table>")
    if curves_png is not None and Path(curves_png).exists():
        data = base64.b64encode(Path(curves_png).read_bytes()).decode("ascii")
        parts.append(f"<h2>Training curves</h2><img alt='training curves' src='data:image/png;base64,{data}' "
                     "style='max-width:100%'>")
    parts.append(f"<h2>Examples ({len(examples)})</h2>")
    for ex in examples:
        parts.append(f"<div class='study' id='{e(ex.study_id)}'><div class='imgs'>")
        for i, img in enumerate(ex.images):
            view = ("frontal", "lateral")[i] if i < 2 else f"view {i}"
            parts.append(f"<figure><img alt='{view}' src='{png_data_uri(img)}'><figcaption>{view}</figcaption></figure>")
        for i, img in enumerate(ex.enhanced):
            view = ("frontal", "lateral")[i] if i < 2 else f"view {i}"
            parts.append(f"<figure><img alt='{view} enhanced' src='{png_data_uri(img)}'>"
                         f"<figcaption>{view}, enhanced (IEC)</figcaption></figure>")
        parts.append(f"</div><div class='texts'><div class='label'>study {e(ex.study_id)} &middot; generated</div>"
                     f"<div class='report gen'>{e(ex.generated) or '<i>(empty)</i>'}</div>")
        if ex.reference is not None:
            parts.append(f"<div class='label'>reference</div><div class='report ref'>{e(ex.reference)}</div>")
        if ex.findings:
            held = set(ex.condition) if ex.condition is not None else None
            what = ("highlighted: the condition the report was decoded from" if held is not None
                    else f"highlighted: p &ge; {threshold:g}")
            parts.append(f"<div class='label'>predicted findings (probability; {what})</div><div>")
            for name, p in sorted(ex.findings.items(), key=lambda kv: -kv[1]):
                hi = name in held if held is not None else p >= threshold
                parts.append(f"<span class='{'finding hi' if hi else 'finding'}'>{e(name)} {p:.2f}</span>")
            parts.append("</div>")
        for key, text in (("unsaid", "in the condition, not said by the report"),
                          ("unsupported", "said by the report, not in the condition")):
            if ex.consistency.get(key):
                parts.append(f"<div class='note'>{text}: {e(', '.join(ex.consistency[key]))}</div>")
        if ex.reference_findings:
            parts.append("<div class='label'>reference findings (labeler)</div><div>"
                         + "".join(f"<span class='finding'>{e(n)}</span>" for n in ex.reference_findings)
                         + "</div>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_page(path: Path, title: str, examples: Sequence[Example], **kwargs) -> None:
    atomic_write_text(path, render_page(title, examples, **kwargs))
