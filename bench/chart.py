"""PNG charts of benchmark results, drawn with matplotlib when it is installed.

matplotlib is optional (``pip install -e '.[bench]'``): without it every function here returns a
note saying the chart was skipped, and no benchmark fails for want of a chart. A chart that
matplotlib fails to draw is skipped the same way, with the reason.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

Panels = Mapping[str, Mapping[str, Mapping[str, float]]]
"""Panel title → bar label (a server) → series (a variant, a percentile) → value."""

MISSING = "chart skipped: matplotlib is not installed (pip install -e '.[bench]')"


def _pyplot() -> Any | None:
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        return importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return None


def available() -> bool:
    """True when matplotlib can be imported."""
    return _pyplot() is not None


def grouped_bars(
    path: Path, title: str, panels: Panels, unit: str, *, log_scale: bool = False
) -> str:
    """Write one horizontal grouped-bar panel per entry of ``panels`` into one PNG at ``path``.

    Returns a one-line note: where the chart went, or why it was skipped. Never raises for a
    missing or failing matplotlib.
    """
    plt = _pyplot()
    if plt is None:
        return MISSING
    if not panels:
        return "chart skipped: nothing to draw"
    try:
        heights = [len(labels) for labels in panels.values()]
        fig, axes = plt.subplots(
            len(panels),
            1,
            figsize=(9, sum(0.55 * max(h, 1) + 1.2 for h in heights)),
            squeeze=False,
            gridspec_kw={"height_ratios": [max(h, 1) for h in heights]},
        )
        for ax, (panel_title, labels) in zip(axes[:, 0], panels.items(), strict=True):
            _draw_panel(ax, panel_title, labels, unit, log_scale)
        fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as exc:  # a chart must never fail a benchmark run
        return f"chart skipped: matplotlib failed: {exc}"
    return f"chart written to {path}"


def _draw_panel(
    ax: Any, title: str, labels: Mapping[str, Mapping[str, float]], unit: str, log_scale: bool
) -> None:
    series: list[str] = []
    for values in labels.values():
        series.extend(name for name in values if name not in series)
    names = list(labels)
    height = 0.8 / max(len(series), 1)
    for j, name in enumerate(series):
        ys = [i + (j - (len(series) - 1) / 2) * height for i in range(len(names))]
        xs = [labels[label].get(name, 0.0) for label in names]
        bars = ax.barh(ys, xs, height=height, label=name)
        ax.bar_label(bars, labels=[_short(x) if x else "" for x in xs], fontsize=7, padding=2)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(unit)
    if log_scale:
        ax.set_xscale("log")
    ax.margins(x=0.15)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="best")


def _short(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.2f}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:.0f}k"
    if magnitude >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _numeric_leaves(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if math.isfinite(value):
            yield path, float(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _numeric_leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            label = item.get("name") or item.get("server") if isinstance(item, Mapping) else None
            yield from _numeric_leaves(item, f"{path}[{label or i}]")


_UNITS = (("_per_s", "per second"), ("_ms", "milliseconds"))


def chart_from_json(json_path: Path, png_path: Path | None = None) -> str:
    """A generic chart of a scenario's JSON document: every number under ``results`` whose key
    ends in ``_per_s`` (one panel) or ``_ms`` (another).

    For scenarios that do not draw their own chart. Returns a note like :func:`grouped_bars`;
    an unreadable document or one without such figures is a skip, not an error.
    """
    png_path = png_path or json_path.with_suffix(".png")
    try:
        document = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        return f"chart skipped: cannot read {json_path}: {exc}"
    if not isinstance(document, Mapping):
        return f"chart skipped: {json_path} does not hold an object"
    panels: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in _numeric_leaves(document.get("results", {})):
        for suffix, unit in _UNITS:
            if key.endswith(suffix):
                panels.setdefault(unit, {})[key] = {"value": value}
    if not panels:
        return "chart skipped: no figure ending in _per_s or _ms in the results"
    name = str(document.get("scenario") or json_path.stem)
    # Each unit gets its own panel, so figures of different units never share an axis.
    return grouped_bars(png_path, name, panels, "")
