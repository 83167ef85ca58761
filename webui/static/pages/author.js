// Author: the author's releases with live grade counts, and their incoming reports.

import { ReleaseTable } from "../releases.js";
import {
  GRADES,
  ReportFeed,
  encodeSegment,
  fetchJSON,
  normalizeCounts,
  normalizeReport,
  pageData,
  publicClient,
  tickTimes,
  total,
} from "../ui.js";

const { author } = pageData();

function main() {
  const client = publicClient();
  const summary = document.getElementById("summary");
  const feed = new ReportFeed(document.getElementById("feed"), {
    limit: 50,
    empty: "No reports since the server started; new ones appear here as they arrive.",
  });
  const showSummary = () => {
    const counts = releases.totals();
    const n = releases.rows.size;
    if (!n) return;
    summary.textContent =
      `${n} release${n === 1 ? "" : "s"} · ${total(counts)} reports: ` +
      GRADES.map((g) => `${counts[g]} ${g}`).join(", ");
  };
  const releases = new ReleaseTable(document.getElementById("releases"), client, {
    showDist: true,
    onChange: showSummary,
  });

  const load = async () => {
    const res = await fetchJSON(`/v3/release/author/${encodeSegment(author)}`);
    if (res.ok && Array.isArray(res.data)) {
      for (const release of res.data) {
        releases.upsert({
          dist: release.dist,
          version: release.version,
          author: release.author || author,
          counts: normalizeCounts(release),
        });
      }
    }
    if (releases.rows.size) {
      showSummary();
    } else if (res.ok || res.status === 404) {
      summary.textContent = `No releases by ${author} are known yet.`;
      releases.setEmptyText("No releases yet; they appear here when uploaded or tested.");
    } else {
      summary.textContent = `Releases could not be loaded (${res.error}); live updates continue.`;
    }
    // Counts that changed while we were away: reload the releases behind them.
    return res.ok;
  };

  client.subscribe(
    `reports/author/${author}`,
    (message) => {
      const report = normalizeReport(message.data, message.ts);
      feed.add(report, { fresh: !message.replayed, ts: message.ts });
      if (report.dist && report.version) {
        const known = releases.rows.has(releases.key(report.dist, report.version));
        const row = releases.upsert({ dist: report.dist, version: report.version, author });
        if (!known && row) releases.refresh(row);
      }
    },
    { backfill: 25, onGap: () => load() },
  );
  client.subscribe(`uploads/author/${author}`, (message) => {
    const upload = message.data || {};
    releases.upsert({ dist: upload.dist, version: upload.version, author });
    showSummary();
  });
  load();
  tickTimes();
}

main();
