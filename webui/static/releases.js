// A live table of releases and their grade counts, shared by the author and distribution pages.
// Counts come from the v3 API and from `summary/dist/<dist>/<version>` messages; they only grow,
// so every update merges by taking the larger figure and a late HTTP answer never undoes a live
// one.

import {
  GRADES,
  compareVersions,
  el,
  emptyCounts,
  encodeSegment,
  fetchJSON,
  flash,
  gradeBar,
  mergeCounts,
  normalizeCounts,
  total,
} from "./ui.js";

const MAX_LIVE = 300; // summary subscriptions per page; the connection allows 1000

const HEAD = { pass: "✔ pass", fail: "✘ fail", na: "⊘ na", unknown: "? unknown" };

export class ReleaseTable {
  /**
   * container: where the table goes; client: a connected Client; showDist: a column with the
   * distribution name (author page); current: "dist/version" to mark; onChange(): after any
   * count changed.
   */
  constructor(container, client, { showDist = true, current = null, onChange = () => {}, empty = "No releases known yet." } = {}) {
    this.client = client;
    this.showDist = showDist;
    this.current = current;
    this.onChange = onChange;
    this.rows = new Map(); // "dist/version" -> {dist, version, author, counts, tr, cells, sub}
    this.table = el("table", { class: "release-table" });
    this.table.append(
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          el("th", { scope: "col", class: "c-release" }, showDist ? "Release" : "Version"),
          ...GRADES.map((g) => el("th", { scope: "col", class: `num c-${g}` }, HEAD[g])),
          el("th", { scope: "col", class: "num c-total" }, "Total"),
          el("th", { scope: "col", class: "c-bar opt" }, "Split"),
        ),
      ),
    );
    this.body = el("tbody");
    this.emptyRow = el("tr", { class: "empty" }, el("td", { colspan: 7 }, empty));
    this.body.append(this.emptyRow);
    this.table.append(this.body);
    container.replaceChildren(this.table);
  }

  key(dist, version) {
    return `${dist}/${version}`;
  }

  totals() {
    let counts = emptyCounts();
    for (const row of this.rows.values()) for (const g of GRADES) counts[g] += row.counts[g];
    return counts;
  }

  /** Add a release (or update its counts and author); subscribes to its live summary. */
  upsert({ dist, version, author = "", counts = null }) {
    if (!dist || !version) return null;
    const key = this.key(dist, version);
    let row = this.rows.get(key);
    if (!row) {
      row = this._addRow(dist, version);
    }
    if (author && !row.author) row.author = author;
    if (counts) this._setCounts(row, counts);
    return row;
  }

  _addRow(dist, version) {
    const cells = {};
    for (const g of GRADES) cells[g] = el("td", { class: `num c-${g}`, "data-grade": g }, "0");
    cells.total = el("td", { class: "num c-total" }, "0");
    cells.bar = el("td", { class: "c-bar opt" }, gradeBar(emptyCounts()));
    const href = `/dist/${encodeSegment(dist)}/${encodeSegment(version)}`;
    const label = this.showDist ? `${dist} ${version}` : version;
    const tr = el(
      "tr",
      { "data-release": this.key(dist, version), class: this.current === this.key(dist, version) ? "current" : "" },
      el("th", { scope: "row", class: "c-release" }, el("a", { href }, label)),
      ...GRADES.map((g) => cells[g]),
      cells.total,
      cells.bar,
    );
    const row = { dist, version, author: "", counts: emptyCounts(), tr, cells, sub: null };
    this.rows.set(this.key(dist, version), row);
    this.emptyRow.remove();
    // Sorted by distribution, newest version first.
    let before = null;
    for (const other of this.rows.values()) {
      if (other === row || !other.tr.isConnected) continue;
      if (this._before(row, other) && (!before || this._before(other, before))) before = other;
    }
    this.body.insertBefore(tr, before ? before.tr : null);
    if (this.client && this.rows.size <= MAX_LIVE) {
      row.sub = this.client.subscribe(
        `summary/dist/${dist}/${version}`,
        (message) => {
          const counts = normalizeCounts(message.data);
          if (counts) this._setCounts(row, counts);
        },
        { onGap: () => this.refresh(row), onError: () => {} },
      );
    }
    return row;
  }

  _before(a, b) {
    const byDist = a.dist.localeCompare(b.dist);
    return byDist < 0 || (byDist === 0 && compareVersions(a.version, b.version) > 0);
  }

  _setCounts(row, counts) {
    const merged = mergeCounts(row.counts, counts);
    let changed = false;
    for (const g of GRADES) {
      if (merged[g] !== row.counts[g]) {
        changed = true;
        row.cells[g].textContent = String(merged[g]);
        flash(row.cells[g]);
      }
    }
    if (!changed) return;
    row.counts = merged;
    row.cells.total.textContent = String(total(merged));
    row.cells.bar.replaceChildren(gradeBar(merged));
    flash(row.tr);
    this.onChange();
  }

  /** Reload one release's counts from the v3 API (after a gap in its live summary). */
  async refresh(row) {
    const res = await fetchJSON(`/v3/release/dist/${encodeSegment(row.dist)}/${encodeSegment(row.version)}`);
    if (!res.ok || !res.data) return;
    const release = Array.isArray(res.data) ? res.data[0] : res.data;
    const counts = normalizeCounts(release);
    if (counts) this._setCounts(row, counts);
  }

  setEmptyText(text) {
    this.emptyRow.firstChild.textContent = text;
  }
}
