// Home: search for an author or a distribution; the latest reports streaming in.

import { Series, sparkline } from "../charts.js";
import { ReportFeed, encodeSegment, normalizeReport, publicClient, tickTimes } from "../ui.js";

const NAME = /^[A-Za-z0-9\-_.:@+~]{1,128}$/;

/** Where a search goes: "Data::Printer" → /dist/Data-Printer, "PREACTION" → /author/PREACTION. */
export function searchTarget(raw, kind = "auto") {
  let q = String(raw || "").trim();
  if (!q) return { error: "Type an author ID or a distribution name." };
  if (q.includes("::")) {
    q = q.replaceAll("::", "-");
    if (kind === "auto") kind = "dist";
  }
  if (!NAME.test(q)) return { error: "Names are letters, digits and - _ . : @ + ~ only." };
  if (kind === "auto") kind = /^[A-Z][A-Z0-9]*$/.test(q) && !q.includes("-") ? "author" : "dist";
  if (kind === "author") return { url: `/author/${encodeSegment(q.toUpperCase())}` };
  return { url: `/dist/${encodeSegment(q)}` };
}

function setupSearch() {
  const form = document.getElementById("search");
  const input = document.getElementById("q");
  const error = document.getElementById("search-error");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const kind = event.submitter && event.submitter.value ? event.submitter.value : "auto";
    const target = searchTarget(input.value, kind);
    if (target.error) {
      error.textContent = target.error;
      input.setAttribute("aria-invalid", "true");
      return;
    }
    error.textContent = "";
    window.location.assign(target.url);
  });
  // Enter in the field: guess from the name's shape.
  input.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    event.preventDefault();
    const target = searchTarget(input.value, "auto");
    if (target.error) {
      error.textContent = target.error;
      return;
    }
    window.location.assign(target.url);
  });
}

function main() {
  setupSearch();
  const feed = new ReportFeed(document.getElementById("feed"), {
    limit: 50,
    empty: "Waiting for reports… new ones appear here as testers send them.",
  });
  const perMinute = new Series(30);
  const chart = document.getElementById("rate-chart");
  const rate = document.getElementById("rate");
  const arrivals = [];
  const client = publicClient();
  client.subscribe(
    "reports/new",
    (message) => {
      const report = normalizeReport(message.data, message.ts);
      feed.add(report, { fresh: !message.replayed, ts: message.ts });
      if (!message.replayed) {
        arrivals.push(Date.now());
        rate.textContent = String(arrivals.length);
      }
    },
    { backfill: 25 },
  );
  // Reports per minute over the last minute, sampled every 2 s.
  setInterval(() => {
    const cutoff = Date.now() - 60000;
    while (arrivals.length && arrivals[0] < cutoff) arrivals.shift();
    perMinute.push(arrivals.length);
    rate.textContent = String(arrivals.length);
    sparkline(chart, perMinute, { label: "reports per minute" });
  }, 2000);
  tickTimes();
}

main();
