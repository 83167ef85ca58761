// Distribution (or one release): live grade counts per release, the grade split by operating
// system and by Perl version, and the incoming reports.

import { ReleaseTable } from "../releases.js";
import {
  GRADES,
  ReportFeed,
  compareVersions,
  el,
  emptyCounts,
  encodeSegment,
  fetchJSON,
  flash,
  gradeBar,
  normalizeCounts,
  normalizeReport,
  pageData,
  publicClient,
  tickTimes,
  total,
} from "../ui.js";

const { dist, version } = pageData();

const HEAD = { pass: "✔", fail: "✘", na: "⊘", unknown: "?" };

/** A table of grade counts by one key (OS name, Perl version), rows added as keys appear. */
class SplitTable {
  constructor(container, label, { sort = (a, b) => a.localeCompare(b) } = {}) {
    this.rows = new Map();
    this.sort = sort;
    this.table = el("table", { class: "split-table" });
    this.table.append(
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          el("th", { scope: "col" }, label),
          ...GRADES.map((g) => el("th", { scope: "col", class: `num c-${g}`, title: g }, `${HEAD[g]} ${g}`)),
          el("th", { scope: "col", class: "c-bar opt" }, "Split"),
        ),
      ),
    );
    this.body = el("tbody");
    this.emptyRow = el("tr", { class: "empty" }, el("td", { colspan: 6 }, "No reports yet."));
    this.body.append(this.emptyRow);
    this.table.append(this.body);
    container.replaceChildren(this.table);
  }

  add(key, grade) {
    const name = key || "unknown";
    let row = this.rows.get(name);
    if (!row) {
      const cells = {};
      for (const g of GRADES) cells[g] = el("td", { class: `num c-${g}` }, "0");
      cells.bar = el("td", { class: "c-bar opt" });
      const tr = el("tr", { "data-key": name }, el("th", { scope: "row" }, name), ...GRADES.map((g) => cells[g]), cells.bar);
      row = { counts: emptyCounts(), cells, tr, name };
      this.rows.set(name, row);
      this.emptyRow.remove();
      let before = null;
      for (const other of this.body.children) {
        if (other.dataset.key && this.sort(name, other.dataset.key) < 0) {
          before = other;
          break;
        }
      }
      this.body.insertBefore(tr, before);
    }
    row.counts[grade] += 1;
    row.cells[grade].textContent = String(row.counts[grade]);
    row.cells.bar.replaceChildren(gradeBar(row.counts, 80, 10));
    flash(row.cells[grade]);
  }
}

function main() {
  const client = publicClient();
  const summary = document.getElementById("summary");
  const release = version ? `${dist}/${version}` : null;
  const feedTopic = version ? `reports/dist/${dist}/${version}` : `reports/dist/${dist}`;
  document.getElementById("feed-topic").textContent = `live for ${feedTopic}`;
  const feed = new ReportFeed(document.getElementById("feed"), {
    limit: 50,
    showDist: !version,
    empty: "No reports yet; new ones appear here as they arrive.",
  });
  const byOs = new SplitTable(document.getElementById("by-os"), "OS");
  const byPerl = new SplitTable(document.getElementById("by-perl"), "Perl", {
    sort: (a, b) => compareVersions(b, a),
  });
  const seen = new Set();
  let authorShown = false;

  const showSummary = () => {
    const counts = releases.totals();
    const n = releases.rows.size;
    if (!n) return;
    let author = "";
    for (const row of releases.rows.values()) author = author || row.author;
    const parts = [];
    if (!version) parts.push(`${n} release${n === 1 ? "" : "s"}`);
    parts.push(`${total(counts)} reports: ` + GRADES.map((g) => `${counts[g]} ${g}`).join(", "));
    summary.replaceChildren(parts.join(" · "));
    if (author) {
      summary.append(" · by ", el("a", { href: `/author/${encodeSegment(author)}`, class: "author" }, author));
      authorShown = true;
    }
  };
  const releases = new ReleaseTable(document.getElementById("releases"), client, {
    showDist: false,
    current: release,
    onChange: showSummary,
  });

  const count = (report, fresh, ts = null) => {
    if (report.id) {
      if (seen.has(report.id)) return;
      seen.add(report.id);
    }
    byOs.add(report.osname, report.grade);
    byPerl.add(report.perl, report.grade);
    feed.add(report, { fresh, ts });
  };

  const loadReleases = async () => {
    const url = version
      ? `/v3/release/dist/${encodeSegment(dist)}/${encodeSegment(version)}`
      : `/v3/release/dist/${encodeSegment(dist)}`;
    const res = await fetchJSON(url);
    const list = res.ok ? (Array.isArray(res.data) ? res.data : [res.data]) : [];
    for (const r of list) {
      if (r && r.version) {
        releases.upsert({ dist: r.dist || dist, version: r.version, author: r.author || "", counts: normalizeCounts(r) });
      }
    }
    if (version && !releases.rows.size) releases.upsert({ dist, version });
    if (list.length) {
      showSummary();
    } else {
      summary.textContent = res.ok || res.status === 404
        ? `No test reports for ${version ? `${dist} ${version}` : dist} yet.`
        : `Releases could not be loaded (${res.error}); live updates continue.`;
    }
  };

  const loadReports = async () => {
    const url = version
      ? `/v3/summary/${encodeSegment(dist)}/${encodeSegment(version)}`
      : `/v3/summary/${encodeSegment(dist)}`;
    const res = await fetchJSON(url);
    if (!res.ok || !Array.isArray(res.data)) return;
    const reports = res.data.map((d) => normalizeReport(d));
    reports.sort((a, b) => (a.date ? a.date.getTime() : 0) - (b.date ? b.date.getTime() : 0));
    for (const report of reports) count(report, false);
  };

  client.subscribe(
    feedTopic,
    (message) => {
      const report = normalizeReport(message.data, message.ts);
      count(report, !message.replayed, message.ts);
      if (report.version && (!version || report.version === version)) {
        const known = releases.rows.has(releases.key(dist, report.version));
        const row = releases.upsert({ dist, version: report.version, author: report.author });
        if (!known && row) releases.refresh(row);
        if (!authorShown && report.author) showSummary();
      }
    },
    {
      backfill: 25,
      onGap: () => {
        loadReleases();
        loadReports();
      },
    },
  );
  if (!version) {
    client.subscribe(`uploads/dist/${dist}`, (message) => {
      const upload = message.data || {};
      if (upload.version) releases.upsert({ dist, version: upload.version, author: upload.author || "" });
      showSummary();
    });
  }
  loadReleases();
  loadReports();
  tickTimes();
}

main();
