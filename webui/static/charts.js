// Small live charts drawn as inline SVG: a ring buffer of samples, sparklines and line charts.
// Every chart has a fixed viewBox, so redrawing never changes the layout, and an aria-label with
// the latest figures, so it reads without sight or colour.

import { svg } from "./ui.js";

/** A bounded series of samples; the oldest falls off beyond `size`. */
export class Series {
  constructor(size = 60) {
    this.size = size;
    this.values = [];
  }

  push(value) {
    this.values.push(value === null || value === undefined || Number.isNaN(value) ? null : value);
    if (this.values.length > this.size) this.values.shift();
  }

  get last() {
    for (let i = this.values.length - 1; i >= 0; i--) if (this.values[i] !== null) return this.values[i];
    return null;
  }

  max() {
    let m = 0;
    for (const v of this.values) if (v !== null && Number.isFinite(v) && v > m) m = v;
    return m;
  }
}

function points(values, size, width, height, max, pad = 1) {
  const step = size > 1 ? width / (size - 1) : width;
  const offset = size - values.length;
  const out = [];
  let run = [];
  values.forEach((v, i) => {
    if (v === null || !Number.isFinite(v)) {
      if (run.length) out.push(run);
      run = [];
      return;
    }
    const x = (offset + i) * step;
    const y = height - pad - (max > 0 ? (v / max) * (height - 2 * pad) : 0);
    run.push(`${x.toFixed(1)},${y.toFixed(1)}`);
  });
  if (run.length) out.push(run);
  return out;
}

/** Redraw `node` (an <svg> with a viewBox) as a sparkline of `series`. */
export function sparkline(node, series, { label = "", format = String } = {}) {
  const [, , width, height] = (node.getAttribute("viewBox") || "0 0 120 24").split(/\s+/).map(Number);
  const max = series.max();
  const parts = [svg("title", {}, `${label} ${format(series.last)} (max ${format(max)})`.trim())];
  parts.push(svg("line", { x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5, class: "axis" }));
  for (const run of points(series.values, series.size, width, height, max)) {
    if (run.length === 1) {
      const [x, y] = run[0].split(",");
      parts.push(svg("circle", { cx: x, cy: y, r: 1.5, class: "spark-dot" }));
    } else {
      parts.push(svg("polyline", { points: run.join(" "), class: "spark-line" }));
    }
  }
  node.setAttribute("aria-label", `${label}: ${format(series.last)}`);
  node.replaceChildren(...parts);
}

/**
 * Redraw `node` as a line chart of several series [{label, series, cls}] sharing one scale,
 * with the top of the scale written in the corner and a legend that names each line in text
 * (lines also differ by dash pattern, not only by colour).
 */
export function lineChart(node, lines, { format = String, title = "" } = {}) {
  const [, , width, height] = (node.getAttribute("viewBox") || "0 0 300 80").split(/\s+/).map(Number);
  const top = 14;
  const plotH = height - top;
  const max = Math.max(0, ...lines.map((l) => l.series.max()));
  const parts = [svg("title", {}, title)];
  parts.push(svg("line", { x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5, class: "axis" }));
  parts.push(svg("line", { x1: 0, y1: top, x2: width, y2: top, class: "grid" }));
  parts.push(svg("text", { x: width - 2, y: top - 3, class: "chart-max", "text-anchor": "end" }, max > 0 ? format(max) : ""));
  let legendX = 2;
  lines.forEach((line, i) => {
    const g = svg("g", { transform: `translate(0 ${top})` });
    for (const run of points(line.series.values, line.series.size, width, plotH, max)) {
      g.append(svg("polyline", { points: run.join(" "), class: `chart-line ${line.cls || `line-${i}`}` }));
    }
    parts.push(g);
    const text = `${line.label} ${format(line.series.last)}`;
    parts.push(svg("text", { x: legendX, y: top - 3, class: `chart-legend ${line.cls || `line-${i}`}` }, text));
    legendX += text.length * 6 + 10;
  });
  node.setAttribute("aria-label", `${title}: ${lines.map((l) => `${l.label} ${format(l.series.last)}`).join(", ")}`);
  node.replaceChildren(...parts);
}
