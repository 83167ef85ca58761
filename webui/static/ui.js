// Shared pieces of the pages: DOM helpers, grades, HTTP, the connection badge, live tables.

import { Client } from "./quicksilver.js";

export const GRADES = ["pass", "fail", "na", "unknown"];
const SYMBOL = { pass: "✔", fail: "✘", na: "⊘", unknown: "?" };

/** Build an element: el("a", {href: "/x", class: "y"}, "text", child, ...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function pageData() {
  const node = document.getElementById("page-data");
  try {
    return JSON.parse(node ? node.textContent : "{}");
  } catch (_) {
    return {};
  }
}

/** A grade as text with a symbol, so it reads without colour: "✘ fail". */
export function gradeBadge(grade) {
  const g = GRADES.includes(grade) ? grade : "unknown";
  return el("span", { class: `grade grade-${g}` }, el("span", { "aria-hidden": "true" }, SYMBOL[g]), ` ${g}`);
}

export function encodeSegment(text) {
  return encodeURIComponent(text);
}

/**
 * GET/POST JSON. Never throws for HTTP errors: resolves with {ok, status, data, error}, where
 * `error` is the first message of the API's `{"errors": [...]}` body or a network error text.
 */
export async function fetchJSON(url, { method = "GET", token = null, body, signal } = {}) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (err) {
    return { ok: false, status: 0, data: null, error: `network error: ${err.message || err}` };
  }
  let data = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) {
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
  }
  let error = null;
  if (!response.ok) {
    error = (data && Array.isArray(data.errors) && data.errors[0] && data.errors[0].message) || `HTTP ${response.status}`;
  }
  return { ok: response.ok, status: response.status, data, error };
}

// --- time and numbers ---------------------------------------------------------------------------

export function toDate(value) {
  if (value === null || value === undefined || value === "") return null;
  const d = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return Number.isNaN(d.getTime()) ? null : d;
}

export function relTime(date, now = Date.now()) {
  if (!date) return "";
  const s = Math.round((now - date.getTime()) / 1000);
  if (s < 5) return "just now";
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return date.toISOString().slice(0, 10);
}

export function timeEl(date) {
  if (!date) return el("span", { class: "muted" }, "–");
  return el("time", { datetime: date.toISOString(), title: date.toISOString().replace("T", " ").slice(0, 19) + " UTC" }, relTime(date));
}

/** Keep relative times fresh without touching layout (same width text). */
export function tickTimes(root = document) {
  setInterval(() => {
    const now = Date.now();
    for (const node of root.querySelectorAll("time[datetime]")) {
      const text = relTime(new Date(node.getAttribute("datetime")), now);
      if (node.textContent !== text) node.textContent = text;
    }
  }, 5000);
}

export function fmt(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  if (typeof n !== "number") return String(n);
  if (Math.abs(n) >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (Math.abs(n) >= 1e4) return `${(n / 1e3).toFixed(1)}k`;
  return Number.isInteger(n) ? String(n) : n.toFixed(n < 10 ? 2 : 1);
}

export function fmtSeconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "–";
  if (!Number.isFinite(s)) return "> max";
  if (s < 0.001) return `${(s * 1e6).toFixed(0)} µs`;
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms`;
  if (s < 120) return `${s.toFixed(1)} s`;
  return `${Math.round(s / 60)} min`;
}

/** Compare CPAN-ish versions ("0.39", "1.2_01", "v5.24.1") numerically, part by part. */
export function compareVersions(a, b) {
  const parts = (v) => String(v).replace(/^v/, "").split(/[._-]/).map((x) => (/^\d+$/.test(x) ? Number(x) : x));
  const pa = parts(a);
  const pb = parts(b);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const x = pa[i] ?? 0;
    const y = pb[i] ?? 0;
    if (x === y) continue;
    if (typeof x === "number" && typeof y === "number") return x - y;
    return String(x).localeCompare(String(y));
  }
  return 0;
}

// --- report and summary data --------------------------------------------------------------------

/**
 * One report as the pages show it, from a live `reports/...` message or a v3 ReportSummary or
 * Report. Unknown shapes give a record with empty fields rather than an exception.
 */
export function normalizeReport(data, ts = null) {
  const d = data && typeof data === "object" ? data : {};
  const env = d.environment || {};
  const lang = env.language || {};
  const sys = env.system || {};
  const distribution = d.distribution && typeof d.distribution === "object" ? d.distribution : {};
  const result = d.result && typeof d.result === "object" ? d.result : {};
  const reporter = d.reporter && typeof d.reporter === "object" ? d.reporter.name || d.reporter.email : d.reporter;
  const grade = String(d.grade || result.grade || "unknown").toLowerCase();
  const date = toDate(d.date || d.created || d.received || d.created_at) || toDate(ts);
  return {
    id: String(d.id || d.guid || d.report || ""),
    dist: String(d.dist || distribution.name || (typeof d.distribution === "string" ? d.distribution : "") || ""),
    version: String(d.version || distribution.version || ""),
    author: String(d.author || ""),
    grade: GRADES.includes(grade) ? grade : "unknown",
    perl: String(d.perl || d.perl_version || lang.version || ""),
    osname: String(d.osname || sys.osname || ""),
    osvers: String(d.osvers || d.osversion || sys.osversion || ""),
    platform: String(d.platform || d.archname || lang.archname || ""),
    reporter: String(reporter || ""),
    date,
  };
}

/** {pass, fail, na, unknown} from a v3 Release or a `summary/...` message; null when absent. */
export function normalizeCounts(data) {
  if (!data || typeof data !== "object") return null;
  for (const source of [data, data.counts, data.summary, data.grades]) {
    if (source && typeof source === "object" && GRADES.some((g) => typeof source[g] === "number")) {
      const out = {};
      for (const g of GRADES) out[g] = Number.isFinite(source[g]) ? source[g] : 0;
      return out;
    }
  }
  return null;
}

export function emptyCounts() {
  return { pass: 0, fail: 0, na: 0, unknown: 0 };
}

export function total(counts) {
  return GRADES.reduce((sum, g) => sum + (counts[g] || 0), 0);
}

/** Counts never go down (reports are not deleted), so merging two views takes the larger. */
export function mergeCounts(a, b) {
  const out = {};
  for (const g of GRADES) out[g] = Math.max(a ? a[g] || 0 : 0, b ? b[g] || 0 : 0);
  return out;
}

/** A stacked bar of grade counts as inline SVG, with the figures as its accessible name. */
export function gradeBar(counts, width = 120, height = 12) {
  const sum = total(counts);
  const label = GRADES.map((g) => `${counts[g] || 0} ${g}`).join(", ");
  const bar = svg("svg", { class: "bar", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": label });
  bar.append(svg("title", {}, label));
  if (!sum) {
    bar.append(svg("rect", { x: 0, y: 0, width, height, class: "bar-empty" }));
    return bar;
  }
  let x = 0;
  for (const g of GRADES) {
    const w = ((counts[g] || 0) / sum) * width;
    if (w > 0) bar.append(svg("rect", { x: x.toFixed(2), y: 0, width: w.toFixed(2), height, class: `bar-${g}` }));
    x += w;
  }
  return bar;
}

// --- the connection -----------------------------------------------------------------------------

const STATE_TEXT = {
  idle: "○ offline",
  connecting: "◌ connecting…",
  open: "● live",
  reconnecting: "↻ reconnecting…",
  unauthorized: "✕ token refused",
  closed: "○ offline",
};

/** Show a client's state in the header badge (text and symbol, not only colour). */
export function bindConnection(client, node = document.getElementById("conn")) {
  if (!node) return;
  node.hidden = false;
  const show = () => {
    node.dataset.state = client.state;
    node.dataset.reconnects = String(client.reconnects);
    let text = STATE_TEXT[client.state] || client.state;
    if (client.state === "reconnecting" && client.attempt > 1) text = `↻ reconnecting (try ${client.attempt})…`;
    node.textContent = text;
    node.title = client.lastClose ? `last close: ${client.lastClose.code} ${client.lastClose.reason || ""}` : "";
  };
  client.addEventListener("state", show);
  client.addEventListener("welcome", show);
  show();
}

/** A connected client for a public page (anonymous access). */
export function publicClient() {
  const client = new Client({ token: null });
  bindConnection(client);
  client.connect();
  return client;
}

// --- a feed of reports: fixed height, newest first, rows highlighted as they arrive --------------

/**
 * A table of reports in a fixed-height box: rows are kept sorted newest first, deduplicated by
 * report id, at most `limit` of them; new ones get the `new` class for a few seconds. The box's
 * height never changes, so nothing below it moves as rows arrive.
 */
export class ReportFeed {
  constructor(container, { limit = 50, showDist = true, empty = "Waiting for reports…" } = {}) {
    this.limit = limit;
    this.showDist = showDist;
    this.ids = new Map();
    this.table = el("table", { class: "feed-table" });
    const head = el(
      "tr",
      {},
      el("th", { scope: "col", class: "c-grade" }, "Grade"),
      showDist ? el("th", { scope: "col", class: "c-dist" }, "Release") : null,
      el("th", { scope: "col", class: "c-perl" }, "Perl"),
      el("th", { scope: "col", class: "c-os" }, "OS"),
      el("th", { scope: "col", class: "c-reporter opt" }, "Reporter"),
      el("th", { scope: "col", class: "c-when" }, "When"),
    );
    this.table.append(el("thead", {}, head));
    this.body = el("tbody", { "aria-live": "polite", "aria-relevant": "additions" });
    this.table.append(this.body);
    this.emptyRow = el("tr", { class: "empty" }, el("td", { colspan: showDist ? 6 : 5 }, empty));
    this.body.append(this.emptyRow);
    container.replaceChildren(this.table);
    container.classList.add("feed");
  }

  get size() {
    return this.ids.size;
  }

  setEmptyText(text) {
    this.emptyRow.firstChild.textContent = text;
  }

  /**
   * Add a report (normalized); `fresh` highlights it; `ts` (the message's, unix seconds) orders
   * it. Returns false for a duplicate.
   */
  add(report, { fresh = true, ts = null } = {}) {
    const key = report.id || `${report.dist}/${report.version}/${report.date && report.date.getTime()}/${this.ids.size}`;
    if (this.ids.has(key)) return false;
    // Live messages sort by the broker's clock (finer than the report's date).
    const when = ts ? ts * 1000 : report.date ? report.date.getTime() : Date.now();
    const row = el(
      "tr",
      { class: fresh ? "new" : "", "data-id": report.id || null, "data-grade": report.grade, "data-when": when },
      el("td", { class: "c-grade" }, report.id ? el("a", { href: `/report/${encodeSegment(report.id)}`, title: "open the report" }, gradeBadge(report.grade)) : gradeBadge(report.grade)),
      this.showDist
        ? el("td", { class: "c-dist" }, report.dist ? el("a", { href: `/dist/${encodeSegment(report.dist)}/${encodeSegment(report.version)}` }, `${report.dist} ${report.version}`) : "–")
        : null,
      el("td", { class: "c-perl" }, report.perl || "–"),
      el("td", { class: "c-os", title: report.osvers || "" }, report.osname || "–"),
      el("td", { class: "c-reporter opt" }, report.reporter || "–"),
      el("td", { class: "c-when" }, timeEl(report.date)),
    );
    this.ids.set(key, row);
    this.emptyRow.remove();
    // Newest first; replayed or fetched older reports slot in below newer ones.
    let before = null;
    for (const other of this.body.children) {
      if (Number(other.dataset.when) <= when) {
        before = other;
        break;
      }
    }
    this.body.insertBefore(row, before);
    while (this.body.children.length > this.limit) {
      const last = this.body.lastElementChild;
      for (const [k, r] of this.ids) if (r === last) this.ids.delete(k);
      last.remove();
    }
    if (fresh) setTimeout(() => row.classList.remove("new"), 6000);
    return true;
  }
}

/** Briefly mark a node as changed (a counter that just went up). */
export function flash(node) {
  node.classList.remove("changed");
  void node.offsetWidth; // restart the animation
  node.classList.add("changed");
}
