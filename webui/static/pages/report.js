// Report: one test report with its facts, output sections, prerequisites and environment.

import {
  el,
  encodeSegment,
  fetchJSON,
  gradeBadge,
  normalizeReport,
  pageData,
  timeEl,
} from "../ui.js";

const { report: reportId } = pageData();

const SECTIONS = ["configure", "build", "test", "install", "uncategorized"];
// Lines worth finding in a long test log.
const PROBLEM = /^\s*(not ok\b|#\s+Failed test|Dubious|Failed \d+\/\d+|Result: FAIL|FAIL\b|Test Summary Report|Can't locate|Error:|ERROR)/;

function outputBlock(text) {
  const pre = el("pre", { class: "output", tabindex: "0" });
  let problems = 0;
  for (const line of String(text).split("\n")) {
    if (PROBLEM.test(line)) {
      problems += 1;
      pre.append(el("mark", { class: "problem" }, el("span", { class: "visually-hidden" }, "problem: "), line), "\n");
    } else {
      pre.append(line, "\n");
    }
  }
  return { pre, problems };
}

function facts(pairs) {
  const dl = el("dl", { class: "facts" });
  for (const [key, value] of pairs) {
    if (value === null || value === undefined || value === "") continue;
    dl.append(el("dt", {}, key), el("dd", {}, value));
  }
  return dl;
}

function kvTable(caption, obj) {
  const entries = Object.entries(obj || {});
  if (!entries.length) return null;
  return el(
    "details",
    { class: "env" },
    el("summary", {}, `${caption} (${entries.length})`),
    el(
      "div",
      { class: "table-wrap" },
      el("table", { class: "kv" }, el("tbody", {}, entries.map(([k, v]) => el("tr", {}, el("th", { scope: "row" }, k), el("td", {}, typeof v === "string" ? v : JSON.stringify(v)))))),
    ),
  );
}

function render(data) {
  const article = document.getElementById("report");
  const r = normalizeReport(data);
  const result = (data && data.result) || {};
  const env = (data && data.environment) || {};
  const lang = env.language || {};
  const sys = env.system || {};
  const output = result.output || {};
  const grade = r.grade;
  article.dataset.grade = grade;

  const title = el(
    "h1",
    {},
    gradeBadge(grade),
    " ",
    r.dist ? el("a", { href: `/dist/${encodeSegment(r.dist)}/${encodeSegment(r.version)}` }, `${r.dist} ${r.version}`) : "Report",
  );
  const sub = el("p", { class: "lede" }, "Report ", el("code", { class: "report-id" }, reportId), r.date ? [" · ", timeEl(r.date)] : null, " · ", el("a", { href: `/v3/report/${encodeSegment(reportId)}` }, "raw JSON"));

  const todo = result.todo ? `${result.todo.pass ?? 0} passed, ${result.todo.fail ?? 0} failed` : null;
  const summary = facts([
    ["Grade", grade],
    ["Perl", [lang.name, lang.version].filter(Boolean).join(" ") || null],
    ["Platform", lang.archname],
    ["OS", [sys.osname, sys.osversion].filter(Boolean).join(" ") || null],
    ["CPU", [sys.cpu_type, sys.cpu_count].filter(Boolean).join(", ") || null],
    ["Reporter", r.reporter],
    ["Tests", result.tests],
    ["Failures", result.failures],
    ["Skipped", result.skipped],
    ["TODO", todo],
    ["Warnings", result.warnings],
    ["Duration", typeof result.duration === "number" ? `${result.duration} s` : null],
    ["Sent by", env.user_agent],
  ]);

  const nodes = [title, sub, summary];
  const comments = (data && data.comments) || result.comments;
  if (comments) nodes.push(el("section", { class: "comments" }, el("h2", {}, "Comments"), el("p", {}, typeof comments === "string" ? comments : JSON.stringify(comments))));

  const present = SECTIONS.filter((s) => typeof output[s] === "string" && output[s].length);
  const outputSection = el("section", { class: "outputs" }, el("h2", {}, "Output"));
  if (!present.length) outputSection.append(el("p", { class: "muted" }, "This report has no output."));
  const wrapToggle = el("button", { type: "button", class: "wrap-toggle", "aria-pressed": "false" }, "Wrap long lines");
  wrapToggle.addEventListener("click", () => {
    const on = article.classList.toggle("wrap");
    wrapToggle.setAttribute("aria-pressed", String(on));
  });
  if (present.length) outputSection.append(wrapToggle);
  for (const name of present) {
    const { pre, problems } = outputBlock(output[name]);
    const lines = output[name].split("\n").length;
    const open = name === "test" || problems > 0 || grade !== "pass" || present.length === 1;
    outputSection.append(
      el(
        "details",
        { class: "output-section", "data-section": name, open },
        el("summary", {}, el("span", { class: "section-name" }, name), el("span", { class: "muted" }, ` ${lines} line${lines === 1 ? "" : "s"}${problems ? `, ${problems} flagged` : ""}`)),
        pre,
      ),
    );
  }
  nodes.push(outputSection);

  const prereqs = (data && data.distribution && data.distribution.prerequisites) || [];
  if (prereqs.length) {
    nodes.push(
      el(
        "section",
        {},
        el("h2", {}, "Prerequisites"),
        el(
          "div",
          { class: "table-wrap" },
          el(
            "table",
            { class: "prereqs" },
            el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Phase"), el("th", { scope: "col" }, "Module"), el("th", { scope: "col", class: "num" }, "Needs"), el("th", { scope: "col", class: "num" }, "Has"))),
            el("tbody", {}, prereqs.map((p) => el("tr", { class: p.have ? "" : "missing" }, el("td", {}, p.phase || ""), el("td", {}, p.name || ""), el("td", { class: "num" }, p.need ?? ""), el("td", { class: "num" }, p.have ?? "✘ missing")))),
          ),
        ),
      ),
    );
  }

  const envSection = el("section", { class: "environment" }, el("h2", {}, "Environment"));
  for (const block of [
    kvTable("Toolchain", env.toolchain || lang.toolchain),
    kvTable("Perl variables", lang.variables),
    kvTable("System", Object.fromEntries(Object.entries(sys).filter(([k]) => k !== "variables"))),
    kvTable("Environment variables", sys.variables),
  ]) {
    if (block) envSection.append(block);
  }
  if (lang.build) envSection.append(el("details", { class: "env" }, el("summary", {}, "perl -V"), el("pre", { class: "output", tabindex: "0" }, lang.build)));
  if (envSection.children.length > 1) nodes.push(envSection);

  article.replaceChildren(...nodes);
  document.title = `${grade}: ${r.dist} ${r.version} · quicksilver`;
}

async function main() {
  const state = document.getElementById("report-state");
  const res = await fetchJSON(`/v3/report/${encodeSegment(reportId)}`);
  if (res.ok && res.data) {
    render(res.data);
    return;
  }
  document.getElementById("report").dataset.state = res.status === 404 ? "missing" : "error";
  state.textContent =
    res.status === 404 || res.status === 400
      ? "No report with this id is known here."
      : `The report could not be loaded: ${res.error}.`;
}

main();
