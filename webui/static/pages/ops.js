// Operations: workers, queues with live charts, failed jobs with retry and cancel, connection and
// subscription counts, latency charts and a topic tail. Needs an admin token, kept in this tab's
// sessionStorage only.

import { Series, lineChart, sparkline } from "../charts.js";
import { Client } from "../quicksilver.js";
import { bindConnection, el, fetchJSON, fmt, fmtSeconds, svg, tickTimes, timeEl, toDate } from "../ui.js";

const TOKEN_KEY = "quicksilver.ops.token";
const SAMPLE_MS = 2000; // chart resolution
const POINTS = 90; // three minutes of samples
const JOB_STATES = ["queued", "active", "retrying", "failed", "done", "cancelled"];
const STATE_TEXT = {
  queued: "◷ queued",
  active: "▶ active",
  retrying: "↻ retrying",
  failed: "✘ failed",
  done: "✔ done",
  cancelled: "⊘ cancelled",
};

let token = null;
let client = null;

function api(path, options = {}) {
  return fetchJSON(path, { ...options, token });
}

function stateBadge(state) {
  return el("span", { class: `state state-${state}` }, STATE_TEXT[state] || state);
}

// --- cards: connection and subscription counts, message rates -----------------------------------

const CARDS = [
  { key: "connections", label: "Connections", from: (o) => o.gauges.connections },
  { key: "subscriptions", label: "Subscriptions", from: (o) => o.gauges.subscriptions },
  { key: "workers", label: "Workers", from: (o) => o.gauges.workers },
  { key: "topics", label: "Topics in memory", from: (o) => o.gauges.topics },
  { key: "in", label: "Frames in / s", rate: "messages_in" },
  { key: "out", label: "Frames out / s", rate: "messages_out" },
  { key: "published", label: "Published / s", rate: "published" },
  { key: "jobs", label: "Jobs done / s", rate: "jobs_done" },
];

class Cards {
  constructor(container) {
    this.items = CARDS.map((card) => {
      const value = el("span", { class: "card-value", "data-card": card.key }, "–");
      const chart = svg("svg", { class: "spark", viewBox: "0 0 120 24", role: "img", "aria-label": card.label });
      container.append(el("div", { class: "card" }, el("span", { class: "card-label" }, card.label), value, chart));
      return { ...card, value, chart, series: new Series(POINTS) };
    });
    this.prev = null;
  }

  update(overview) {
    const prev = this.prev;
    const dt = prev ? overview.time - prev.time : 0;
    for (const item of this.items) {
      let v = null;
      if (item.from) v = item.from(overview);
      else if (prev && dt > 0) v = Math.max(0, (overview.counters[item.rate] - prev.counters[item.rate]) / dt);
      item.series.push(v);
      item.value.textContent = fmt(v);
      sparkline(item.chart, item.series, { label: item.label, format: fmt });
    }
    this.prev = overview;
  }
}

// --- latency: windowed quantiles from histogram snapshots --------------------------------------

function quantile(bounds, counts, q) {
  const n = counts.reduce((a, b) => a + b, 0);
  if (n <= 0) return null;
  let seen = 0;
  for (let i = 0; i < counts.length; i++) {
    seen += counts[i];
    if (seen >= q * n) return i < bounds.length ? bounds[i] : Infinity;
  }
  return Infinity;
}

const LATENCY_TITLE = {
  job_pickup_seconds: "Job pickup: ready → pushed to a worker",
};

function latencyTitle(name) {
  if (LATENCY_TITLE[name]) return LATENCY_TITLE[name];
  if (name.includes("pipeline")) return "Report pipeline: received → published";
  return name.replaceAll("_", " ");
}

class Latency {
  constructor(container) {
    this.container = container;
    this.charts = new Map();
    this.prev = null;
    this.placeholder = el("p", { class: "muted chart-note" }, "No report pipeline measurements yet: the chart appears with the first report.");
    container.append(this.placeholder);
  }

  chart(name) {
    let chart = this.charts.get(name);
    if (!chart) {
      const node = svg("svg", { class: "chart", viewBox: "0 0 320 90", role: "img", "data-histogram": name });
      const figure = el("figure", { class: "chart-box" }, el("figcaption", {}, latencyTitle(name)), node);
      if (name.includes("pipeline")) {
        this.placeholder.remove();
        this.container.prepend(figure);
      } else {
        this.container.append(figure);
      }
      chart = { node, p50: new Series(POINTS), p99: new Series(POINTS), title: latencyTitle(name) };
      this.charts.set(name, chart);
    }
    return chart;
  }

  update(overview) {
    for (const [name, h] of Object.entries(overview.histograms || {})) {
      const chart = this.chart(name);
      const before = this.prev && this.prev.histograms[name];
      let p50 = null;
      let p99 = null;
      if (before) {
        const window = h.counts.map((c, i) => c - (before.counts[i] || 0));
        p50 = quantile(h.bounds, window, 0.5);
        p99 = quantile(h.bounds, window, 0.99);
      }
      const cap = h.bounds[h.bounds.length - 1];
      chart.p50.push(p50 === Infinity ? cap : p50);
      chart.p99.push(p99 === Infinity ? cap : p99);
      lineChart(chart.node, [
        { label: "p50", series: chart.p50, cls: "line-0" },
        { label: "p99", series: chart.p99, cls: "line-1" },
      ], { format: fmtSeconds, title: chart.title });
    }
    this.prev = overview;
  }
}

// --- workers --------------------------------------------------------------------------------

class Workers {
  constructor(container, counter) {
    this.counter = counter;
    this.rows = new Map(); // session -> {tr, cells, info, fetchedAt}
    this.body = el("tbody");
    this.emptyRow = el("tr", { class: "empty" }, el("td", { colspan: 6 }, "No worker is connected."));
    this.body.append(this.emptyRow);
    container.replaceChildren(
      el(
        "table",
        { class: "workers-table" },
        el("thead", {}, el("tr", {}, ...["Name", "Queues", "Slots", "Jobs held", "Connected", "Heartbeat"].map((h, i) => el("th", { scope: "col", class: i >= 2 && i !== 4 ? "num" : i === 4 ? "opt" : "" }, h)))),
        this.body,
      ),
    );
    setInterval(() => this.tick(), 1000);
  }

  set(list) {
    const live = new Set();
    for (const info of list) {
      live.add(info.session);
      this.upsert(info);
    }
    for (const session of [...this.rows.keys()]) if (!live.has(session)) this.remove(session);
  }

  upsert(info) {
    let row = this.rows.get(info.session);
    if (!row) {
      const cells = {
        name: el("th", { scope: "row" }),
        queues: el("td"),
        slots: el("td", { class: "num" }),
        jobs: el("td", { class: "num" }),
        since: el("td", { class: "opt" }),
        heartbeat: el("td", { class: "num" }),
      };
      const tr = el("tr", { class: "new", "data-session": info.session }, ...Object.values(cells));
      setTimeout(() => tr.classList.remove("new"), 6000);
      row = { tr, cells };
      this.rows.set(info.session, row);
      this.emptyRow.remove();
      this.body.prepend(tr);
    }
    row.info = info;
    row.fetchedAt = Date.now();
    row.tr.dataset.name = info.name || "";
    row.cells.name.textContent = info.name || info.session;
    row.cells.queues.textContent = (info.queues || []).join(", ");
    row.cells.slots.textContent = String(info.concurrency ?? "–");
    row.cells.jobs.textContent = String(Array.isArray(info.jobs) ? info.jobs.length : info.jobs ?? 0);
    row.cells.since.replaceChildren(timeEl(toDate(info.since)));
    this.tick();
  }

  remove(session) {
    const row = this.rows.get(session);
    if (!row) return;
    this.rows.delete(session);
    row.tr.remove();
    if (!this.rows.size) this.body.append(this.emptyRow);
    this.tick();
  }

  tick() {
    const now = Date.now();
    for (const row of this.rows.values()) {
      const age = (row.info.heartbeat_age || 0) + (now - row.fetchedAt) / 1000;
      row.cells.heartbeat.textContent = fmtSeconds(age);
      row.tr.classList.toggle("stale", age > 30);
    }
    const n = this.rows.size;
    this.counter.textContent = `${n} connected`;
  }
}

// --- queues ---------------------------------------------------------------------------------

class Queues {
  constructor(container) {
    this.rows = new Map();
    this.body = el("tbody");
    this.emptyRow = el("tr", { class: "empty" }, el("td", { colspan: 9 }, "No queue has had a job yet."));
    this.body.append(this.emptyRow);
    this.onCounts = () => {};
    const heads = [
      ["Queue", ""],
      ["◷ queued", "num"],
      ["▶ active", "num"],
      ["↻ retrying", "num"],
      ["✘ failed", "num"],
      ["Done / min", "num"],
      ["Oldest wait", "num opt"],
      ["Depth", "c-chart"],
      ["Throughput", "c-chart opt"],
    ];
    container.replaceChildren(
      el("table", { class: "queues-table" }, el("thead", {}, el("tr", {}, heads.map(([h, c]) => el("th", { scope: "col", class: c }, h)))), this.body),
    );
  }

  update(name, figures) {
    let row = this.rows.get(name);
    if (!row) {
      const cells = {};
      for (const key of ["queued", "active", "retrying", "failed", "done", "wait"]) cells[key] = el("td", { class: key === "wait" ? "num opt" : "num" });
      const depthChart = svg("svg", { class: "spark", viewBox: "0 0 120 24", role: "img" });
      const rateChart = svg("svg", { class: "spark", viewBox: "0 0 120 24", role: "img" });
      const tr = el(
        "tr",
        { "data-queue": name },
        el("th", { scope: "row" }, name),
        cells.queued, cells.active, cells.retrying, cells.failed, cells.done, cells.wait,
        el("td", { class: "c-chart" }, depthChart),
        el("td", { class: "c-chart opt" }, rateChart),
      );
      row = { tr, cells, depthChart, rateChart, depth: new Series(POINTS), rate: new Series(POINTS), figures: null };
      this.rows.set(name, row);
      this.emptyRow.remove();
      let before = null;
      for (const other of this.body.children) {
        if (other.dataset.queue && other.dataset.queue.localeCompare(name) > 0) {
          before = other;
          break;
        }
      }
      this.body.insertBefore(row.tr, before);
    }
    const counts = figures.counts || {};
    const previous = row.figures ? row.figures.counts || {} : null;
    row.figures = figures;
    for (const state of ["queued", "active", "retrying", "failed"]) row.cells[state].textContent = String(counts[state] || 0);
    row.cells.done.textContent = String(figures.done_last_minute ?? 0);
    row.cells.wait.textContent = figures.oldest_ready_age ? fmtSeconds(figures.oldest_ready_age) : "–";
    if (!previous || previous.failed !== counts.failed || previous.retrying !== counts.retrying) this.onCounts(name);
  }

  sample() {
    for (const row of this.rows.values()) {
      const c = (row.figures && row.figures.counts) || {};
      row.depth.push((c.queued || 0) + (c.active || 0) + (c.retrying || 0));
      row.rate.push(row.figures ? row.figures.done_last_minute || 0 : 0);
      sparkline(row.depthChart, row.depth, { label: "jobs waiting or running" });
      sparkline(row.rateChart, row.rate, { label: "jobs done per minute" });
    }
  }
}

// --- failed and retrying jobs ------------------------------------------------------------------

// Is this view of a job at least as recent as the one shown? Attempts only grow; within one
// attempt the later update wins.
function newer(update, shown) {
  if ((update.attempt ?? 0) !== (shown.attempt ?? 0)) return (update.attempt ?? 0) > (shown.attempt ?? 0);
  return (update.updated_at ?? 0) >= (shown.updated_at ?? 0);
}

class Jobs {
  constructor(container) {
    this.rows = new Map();
    this.body = el("tbody");
    this.emptyRow = el("tr", { class: "empty" }, el("td", { colspan: 7 }, "No failed or retrying job."));
    this.body.append(this.emptyRow);
    container.replaceChildren(
      el(
        "table",
        { class: "jobs-table" },
        el("thead", {}, el("tr", {}, ["Job", "Queue", "State", "Attempt", "Error", "Updated", "Actions"].map((h, i) => el("th", { scope: "col", class: i === 3 ? "num" : i === 5 ? "opt" : "" }, h)))),
        this.body,
      ),
    );
    this.loading = null;
  }

  async load() {
    if (this.loading) return this.loading;
    this.loading = (async () => {
      const lists = await Promise.all(["failed", "retrying"].map((state) => api(`/api/v1/jobs?state=${state}&limit=25`)));
      const jobs = [];
      for (const res of lists) if (res.ok && res.data && Array.isArray(res.data.jobs)) jobs.push(...res.data.jobs);
      jobs.sort((a, b) => a.updated_at - b.updated_at);
      for (const job of jobs) this.upsert(job, { fresh: this.rows.size > 0 });
    })();
    try {
      await this.loading;
    } finally {
      this.loading = null;
    }
  }

  upsert(job, { fresh = false } = {}) {
    let row = this.rows.get(job.job);
    if (!row) {
      const cells = {
        id: el("td", {}, el("code", {}, job.job)),
        queue: el("td", {}, job.queue),
        state: el("td"),
        attempt: el("td", { class: "num" }),
        error: el("td", { class: "error-text" }),
        updated: el("td", { class: "opt" }),
        actions: el("td", { class: "actions" }),
      };
      const retry = el("button", { type: "button", class: "retry", "data-action": "retry" }, "Retry");
      const cancel = el("button", { type: "button", class: "cancel", "data-action": "cancel" }, "Cancel");
      const note = el("span", { class: "action-note", role: "status" });
      cells.actions.append(retry, " ", cancel, note);
      const tr = el("tr", { "data-job": job.job, class: fresh ? "new" : "" }, ...Object.values(cells));
      if (fresh) setTimeout(() => tr.classList.remove("new"), 6000);
      row = { tr, cells, retry, cancel, note, job: { ...job }, sub: null };
      retry.addEventListener("click", () => this.act(row, "retry"));
      cancel.addEventListener("click", () => this.act(row, "cancel"));
      this.rows.set(job.job, row);
      this.emptyRow.remove();
      this.body.prepend(tr);
      if (client && this.rows.size <= 50) {
        row.sub = client.subscribe(`jobs/${job.job}`, (message) => this.upsert({ ...message.data, updated_at: message.ts }), { onError: () => {} });
      }
    } else if (!newer(job, row.job)) {
      return; // an HTTP answer that live messages have already overtaken
    }
    row.job = { ...row.job, ...job };
    const j = row.job;
    row.tr.dataset.state = j.state;
    row.cells.state.replaceChildren(stateBadge(j.state));
    row.cells.attempt.textContent = j.max_attempts ? `${j.attempt}/${Math.max(j.attempt, j.max_attempts)}` : String(j.attempt ?? "");
    row.cells.error.textContent = j.state === "done" ? "" : j.error || "";
    row.cells.error.title = j.error || "";
    if (j.updated_at) row.cells.updated.replaceChildren(timeEl(toDate(j.updated_at)));
    row.retry.disabled = !(j.state === "failed" || j.state === "cancelled");
    row.cancel.disabled = !(j.state === "queued" || j.state === "retrying" || j.state === "active");
  }

  async act(row, action) {
    row.retry.disabled = row.cancel.disabled = true;
    row.note.textContent = action === "retry" ? " retrying…" : " cancelling…";
    const res = await api(`/api/v1/jobs/${encodeURIComponent(row.job.job)}/${action}`, { method: "POST" });
    if (res.ok && res.data) {
      row.note.textContent = "";
      this.upsert(res.data);
    } else {
      row.note.textContent = ` ${res.error}`;
      this.upsert(row.job);
    }
  }
}

// --- topic tail ---------------------------------------------------------------------------------

function setupTail() {
  const form = document.getElementById("tail-form");
  const input = document.getElementById("tail-pattern");
  const stop = document.getElementById("tail-stop");
  const clear = document.getElementById("tail-clear");
  const status = document.getElementById("tail-status");
  const list = document.getElementById("tail");
  let sub = null;
  const LIMIT = 200;
  const end = () => {
    if (sub) sub.unsubscribe();
    sub = null;
    stop.disabled = true;
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const pattern = input.value.trim();
    end();
    if (!pattern) return;
    let count = 0;
    try {
      sub = client.subscribe(
        pattern,
        (message) => {
          count += 1;
          const data = JSON.stringify(message.data);
          const line = el(
            "li",
            { class: message.replayed ? "replayed" : "new" },
            el("span", { class: "tail-time" }, new Date(message.ts * 1000).toISOString().slice(11, 23)),
            " ",
            el("span", { class: "tail-topic" }, message.topic),
            " ",
            el("span", { class: "tail-offset" }, `#${message.offset}`),
            message.replayed ? el("span", { class: "tail-flag" }, " (caught up)") : null,
            " ",
            el("code", { class: "tail-data" }, data.length > 400 ? `${data.slice(0, 400)}…` : data),
          );
          list.prepend(line);
          while (list.children.length > LIMIT) list.lastElementChild.remove();
          status.textContent = `Tailing ${pattern}: ${count} message${count === 1 ? "" : "s"}.`;
        },
        {
          onError: (error) => {
            status.textContent = `Cannot tail ${pattern}: ${error.message} (${error.code}).`;
            end();
          },
          onGap: (info) => {
            if (info.reason !== "reconnect") status.textContent = `Tailing ${pattern}: some messages were missed (${info.reason}).`;
          },
        },
      );
    } catch (err) {
      status.textContent = err.message;
      return;
    }
    stop.disabled = false;
    status.textContent = `Tailing ${pattern}: waiting for messages…`;
    sub.ready.then(() => {
      if (sub && !count) status.textContent = `Tailing ${pattern}: subscribed, waiting for messages…`;
    });
  });
  stop.addEventListener("click", () => {
    end();
    status.textContent = "Stopped.";
  });
  clear.addEventListener("click", () => list.replaceChildren());
}

// --- wiring ---------------------------------------------------------------------------------

async function start(candidate) {
  const errorNode = document.getElementById("token-error");
  token = candidate;
  const first = await api("/api/v1/overview");
  if (!first.ok) {
    errorNode.textContent =
      first.status === 401
        ? `The token was refused: ${first.error}`
        : first.status === 403
          ? "This token does not have the admin role."
          : `The broker did not answer: ${first.error}`;
    token = null;
    return false;
  }
  errorNode.textContent = "";
  sessionStorage.setItem(TOKEN_KEY, candidate);
  document.getElementById("token").value = "";
  document.getElementById("token-form").classList.add("collapsed");
  document.getElementById("dashboard").hidden = false;

  client = new Client({ token });
  bindConnection(client);
  client.addEventListener("state", (event) => {
    if (event.detail.state === "unauthorized") errorNode.textContent = "The broker closed the connection: the token is no longer accepted.";
  });
  client.connect();

  const cards = new Cards(document.getElementById("cards"));
  const latency = new Latency(document.getElementById("latency"));
  const workers = new Workers(document.getElementById("workers"), document.getElementById("workers-count"));
  const queues = new Queues(document.getElementById("queues"));
  const jobs = new Jobs(document.getElementById("jobs"));
  document.getElementById("jobs-refresh").addEventListener("click", () => jobs.load());

  let jobsTimer = null;
  queues.onCounts = () => {
    clearTimeout(jobsTimer);
    jobsTimer = setTimeout(() => jobs.load(), 300);
  };

  const loadWorkers = async () => {
    const res = await api("/api/v1/workers");
    if (res.ok && res.data) workers.set(res.data.workers || []);
  };
  const loadQueues = async () => {
    const res = await api("/api/v1/queues");
    if (res.ok && res.data) for (const [name, figures] of Object.entries(res.data)) queues.update(name, figures);
  };

  client.subscribe(
    "workers/events",
    (message) => {
      const event = message.data || {};
      if (event.event === "join") workers.upsert(event);
      else if (event.event === "leave") workers.remove(event.session);
    },
    { onGap: loadWorkers },
  );
  client.subscribe("queues/*", (message) => queues.update(message.topic.slice("queues/".length), message.data || {}), {
    onGap: loadQueues,
  });

  cards.update(first.data);
  latency.update(first.data);
  await Promise.all([loadWorkers(), loadQueues(), jobs.load()]);
  queues.sample();
  setInterval(async () => {
    const res = await api("/api/v1/overview");
    if (res.ok && res.data) {
      cards.update(res.data);
      latency.update(res.data);
    }
    queues.sample();
  }, SAMPLE_MS);
  setInterval(loadWorkers, 5000);
  setInterval(loadQueues, 5000);
  setInterval(() => jobs.load(), 15000);
  setupTail();
  tickTimes();
  return true;
}

function main() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (!value) {
      document.getElementById("token-error").textContent = "Paste an admin token first.";
      return;
    }
    if (client) {
      // Already running: switch the token (the dashboard keeps its state).
      token = value;
      sessionStorage.setItem(TOKEN_KEY, value);
      client.setToken(value).catch((err) => {
        document.getElementById("token-error").textContent = err.message;
      });
      input.value = "";
      return;
    }
    await start(value);
  });
  document.getElementById("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    window.location.reload();
  });
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) start(saved);
}

main();
