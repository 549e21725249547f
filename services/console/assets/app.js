// Kalon console: one page, four views, each refreshed in place from the
// console's JSON API. No framework, nothing fetched from outside.
"use strict";

const $ = (selector, root) => (root || document).querySelector(selector);
const $$ = (selector, root) => Array.from((root || document).querySelectorAll(selector));

let settings = { refresh_ms: 3000, judge: false, actions: false, max_k: 50 };
let timer = null;
let selectedCanary = null;
let selectedVersion = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function token() {
  return $("#token").value.trim();
}

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : response.status + " " + response.statusText;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function problem(message) {
  const p = $("#problem");
  p.hidden = !message;
  p.textContent = message || "";
}

const fmt = {
  n: (x, digits) => (x === null || x === undefined || Number.isNaN(x)) ? "-" : Number(x).toFixed(digits === undefined ? 2 : digits),
  pct: (x) => (x === null || x === undefined) ? "-" : (100 * x).toFixed(0) + "%",
  signed: (x, digits) => (x === null || x === undefined) ? "-" : (x >= 0 ? "+" : "") + Number(x).toFixed(digits === undefined ? 4 : digits),
  time: (t) => t ? new Date(t).toLocaleTimeString() : "-",
  datetime: (t) => t ? new Date(t).toLocaleString() : "-",
  secs: (a, b) => (a && b) ? ((new Date(b) - new Date(a)) / 1000).toFixed(0) + " s" : "-",
};

function state(name) {
  return el("span", { class: "state " + name, text: name.replace("_", " ") });
}

function pairText(counts) {
  if (!counts || typeof counts !== "object") return "-";
  const parts = Object.entries(counts).filter(([, v]) => typeof v === "number");
  return parts.length ? parts.map(([k, v]) => k + " " + v).join(", ") : "-";
}

function gateText(gate) {
  if (!gate) return "-";
  const verdict = gate.passed === true ? "passed" : gate.passed === false ? "failed" : "";
  const checks = Array.isArray(gate.checks) ? gate.checks.map((c) =>
    c.metric + " " + fmt.signed(c.change, 3) + (c.passed === false ? " (failed)" : "")) : [];
  const text = [verdict, checks.join(", ")].filter(Boolean).join(": ");
  return text || JSON.stringify(gate).slice(0, 120);
}

// ---- overview ------------------------------------------------------------

async function showOverview() {
  const o = await api("/api/overview");
  $("#overview-at").textContent = "at " + fmt.time(o.at) + ", rates over the last " + o.events.window_s + " s";
  const figure = (value, label) => el("div", {}, el("span", { class: "figure", text: value }), " ", el("span", { class: "label", text: label }));
  $("#stage-events .body").replaceChildren(
    figure(fmt.n(o.events.impressions_per_s, 1), "impressions/s"),
    figure(fmt.n(o.events.clicks_per_s, 1), "clicks/s"),
    figure(fmt.n(o.events.ratings_per_s, 2), "ratings/s"));
  $("#stage-enricher .body").replaceChildren(
    figure(o.enricher.pending, "queries waiting"),
    figure(o.enricher.done, "queries rephrased"),
    figure(o.enricher.judgments_last_hour, "judgments, last hour"));
  $("#stage-pairs .body").replaceChildren(
    ...(o.pairs.length ? o.pairs.map((p) => figure(p.total, p.source + " (" + p.last_hour + " last hour)")) : [el("div", { class: "label", text: "none yet" })]));
  const run = o.last_run;
  $("#stage-trainer .body").replaceChildren(...(run ? [
    el("div", {}, state(run.state), " ", el("span", { class: "label", text: run.trigger_kind + " run, " + fmt.time(run.started_at) })),
    el("div", { class: "label", text: "made " + (run.model_version || "nothing yet") }),
    el("div", { class: "label", text: "pairs: " + pairText(run.pair_counts) }),
    el("div", { class: "label", text: "gate: " + gateText(run.gate) }),
  ] : [el("div", { class: "label", text: "no run yet" })]));
  const c = o.canary;
  $("#stage-canary .body").replaceChildren(...(c ? [
    el("div", {}, state(c.status), " ", el("span", { class: "figure", text: fmt.pct(c.share) }), " ", el("span", { class: "label", text: "to " + c.candidate })),
    el("div", { class: "label", text: "step " + c.step + ", against " + (c.stable || "-") }),
    el("div", { class: "label", text: (c.last_action || "") + ": " + (c.last_reason || "") }),
  ] : [el("div", { class: "label", text: "no canary yet" })]));
  const impressions = new Map(o.events.impressions_by_version);
  $("#serving tbody").replaceChildren(...o.serving.map((s) => el("tr", { "data-version": s.model_version },
    el("td", { text: s.model_version }), el("td", { text: s.variant }), el("td", { text: fmt.pct(s.share) }),
    el("td", { text: s.interleave ? fmt.pct(s.interleave) : "-" }), el("td", {}, state(s.state)),
    el("td", { text: impressions.get(s.model_version) || 0 }))));
}

// ---- canary --------------------------------------------------------------

function primaryOf(decisions) {
  for (const d of decisions) for (const e of d.evidence || []) if (e.kind === "ab") return e.metric;
  return null;
}

function series(decisions, metric) {
  return decisions
    .map((d) => ({ at: new Date(d.at), e: (d.evidence || []).find((e) => e.metric === metric) }))
    .filter((p) => p.e && p.e.estimate !== null && p.e.estimate !== undefined);
}

function chart(svg, points, marginLine) {
  const W = 480, H = 200, L = 46, R = 8, T = 8, B = 22;
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  if (!points.length) {
    add("text", { x: W / 2 - 60, y: H / 2 }, "no figures yet");
    return;
  }
  const xs = points.map((p) => p.at.getTime());
  const lows = points.map((p) => p.e.lower ?? p.e.estimate);
  const highs = points.map((p) => p.e.upper ?? p.e.estimate);
  let ymin = Math.min(0, ...lows.filter(Number.isFinite), ...points.map((p) => p.e.estimate));
  let ymax = Math.max(0, ...highs.filter(Number.isFinite), ...points.map((p) => p.e.estimate));
  if (marginLine !== null && marginLine !== undefined) { ymin = Math.min(ymin, marginLine); }
  if (ymax - ymin < 1e-9) { ymax += 1; ymin -= 1; }
  const x0 = Math.min(...xs), x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
  const x = (t) => L + (W - L - R) * (t - x0) / (x1 - x0);
  const y = (v) => T + (H - T - B) * (1 - (Math.max(ymin, Math.min(ymax, v)) - ymin) / (ymax - ymin));
  add("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B });
  add("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B });
  add("line", { class: "zero", x1: L, y1: y(0), x2: W - R, y2: y(0) });
  if (marginLine !== null && marginLine !== undefined) add("line", { class: "margin", x1: L, y1: y(marginLine), x2: W - R, y2: y(marginLine) });
  add("text", { x: 2, y: T + 8 }, fmt.signed(ymax, 3));
  add("text", { x: 2, y: H - B }, fmt.signed(ymin, 3));
  add("text", { x: L, y: H - 6 }, fmt.time(points[0].at));
  add("text", { x: W - R - 50, y: H - 6 }, fmt.time(points[points.length - 1].at));
  const finite = points.filter((p) => Number.isFinite(p.e.lower) && Number.isFinite(p.e.upper));
  if (finite.length) {
    const top = finite.map((p) => x(p.at.getTime()) + "," + y(p.e.upper));
    const bottom = finite.slice().reverse().map((p) => x(p.at.getTime()) + "," + y(p.e.lower));
    add("polygon", { class: "band", points: top.concat(bottom).join(" ") });
  }
  add("polyline", { class: "line", points: points.map((p) => x(p.at.getTime()) + "," + y(p.e.estimate)).join(" ") });
  for (const p of points) add("circle", { cx: x(p.at.getTime()), cy: y(p.e.estimate), r: 2.5, fill: "#3a5bd9" });
}

function evidenceCell(evidence) {
  if (!evidence || !evidence.length) return "-";
  return el("div", { class: "evidence" }, ...evidence.map((e) => el("div", {},
    el("b", { text: e.metric }), " " + e.decision.replace(/_/g, " ") + " ",
    fmt.signed(e.estimate) + " [" + fmt.signed(e.lower) + ", " + fmt.signed(e.upper) + "]",
    ", p " + fmt.n(e.p_value, 3) + " (alpha " + fmt.n(e.alpha, 3) + ", margin " + fmt.n(e.margin, 3) + ")",
    ", n " + e.n_stable + "/" + e.n_candidate + (e.enough_data ? "" : ", not enough data"))));
}

async function showCanary() {
  const { canaries } = await api("/api/canaries?limit=20");
  const list = $("#canary-list");
  if (!canaries.length) {
    list.replaceChildren(el("p", { class: "label", text: "No canary yet: one starts when the trainer registers a version whose gate passed." }));
    $("#canary-detail").hidden = true;
    return;
  }
  $("#canary-detail").hidden = false;
  if (!selectedCanary || !canaries.some((r) => r.canary.id === selectedCanary)) selectedCanary = canaries[0].canary.id;
  list.replaceChildren(el("table", {}, el("thead", {}, el("tr", {}, ...["candidate", "against", "status", "share", "started", "finished"].map((h) => el("th", { text: h })))),
    el("tbody", {}, ...canaries.map((r) => el("tr", {
      class: "clickable" + (r.canary.id === selectedCanary ? " selected" : ""), "data-candidate": r.canary.candidate,
      onclick: () => { selectedCanary = r.canary.id; refresh(); },
    }, el("td", { text: r.canary.candidate }), el("td", { text: r.canary.stable || "-" }), el("td", {}, state(r.canary.status)),
      el("td", { text: fmt.pct(r.share) }), el("td", { text: fmt.datetime(r.canary.started_at) }), el("td", { text: fmt.datetime(r.canary.finished_at) }))))));
  const report = canaries.find((r) => r.canary.id === selectedCanary);
  const c = report.canary;
  $("#canary-title").textContent = c.candidate + " against " + (c.stable || "-");
  $("#canary-status").replaceChildren(state(c.status), " step " + c.step + ", " + fmt.pct(report.share) + " of traffic" + (c.note ? " - " + c.note : ""));
  $$(".actions button").forEach((b) => { b.disabled = !(c.status === "running" || c.status === "paused" || c.status === "waiting"); });
  const decisions = report.decisions.slice().sort((a, b) => new Date(a.at) - new Date(b.at));
  const primary = primaryOf(decisions);
  $("#chart-primary-title").textContent = primary ? primary + ": candidate minus stable, with its anytime-valid interval (dotted: the margin)" : "primary metric";
  const lastPrimary = primary ? series(decisions, primary).slice(-1)[0] : null;
  chart($("#chart-primary"), primary ? series(decisions, primary) : [], lastPrimary ? -Math.abs(lastPrimary.e.margin * (lastPrimary.e.stable_mean || 1)) : null);
  chart($("#chart-interleaving"), series(decisions, "interleaving"), null);
  const shown = $("#show-holds").checked ? decisions : decisions.filter((d) => d.action !== "hold");
  $("#decisions tbody").replaceChildren(...shown.slice().reverse().map((d) => el("tr", { "data-action": d.action },
    el("td", { text: fmt.time(d.at) }), el("td", { text: d.action }), el("td", { text: d.step_from + " -> " + d.step_to }),
    el("td", { text: fmt.pct(d.share) }), el("td", { text: d.automatic ? "controller" : d.actor }),
    el("td", { text: d.reason }), el("td", {}, evidenceCell(d.evidence)))));
}

async function act(action) {
  const result = $("#action-result");
  const reason = $("#action-reason").value.trim();
  const headers = { "content-type": "application/json" };
  if (token()) headers.authorization = "Bearer " + token();
  const report = (await api("/api/canaries?limit=20")).canaries.find((r) => r.canary.id === selectedCanary);
  try {
    const body = await api("/api/canary/" + action, {
      method: "POST", headers,
      body: JSON.stringify({ reason: reason || ("operator " + action + " from the console"), candidate: report ? report.canary.candidate : undefined }),
    });
    result.className = "ok";
    result.textContent = action + " recorded (decision " + body.decision.id + ")";
    await showCanary();
  } catch (error) {
    result.className = "refused";
    result.textContent = "refused: " + error.message;
  }
}

// ---- compare -------------------------------------------------------------

async function fillVersions() {
  const { models } = await api("/api/models");
  const serving = models.filter((m) => m.deployment);
  const overview = await api("/api/overview");
  const a = $("#compare-a"), b = $("#compare-b");
  if (a.options.length === serving.length && serving.every((m, i) => a.options[i].value === m.version)) return;
  const options = () => serving.map((m) => el("option", { value: m.version, text: m.version + " (" + m.state + ")" }));
  a.replaceChildren(...options());
  b.replaceChildren(...options());
  const promoted = overview.promoted;
  const candidate = overview.canary && !["promoted", "rolled_back", "superseded"].includes(overview.canary.status) ? overview.canary.candidate : null;
  if (promoted && serving.some((m) => m.version === promoted)) a.value = promoted;
  const other = candidate && candidate !== a.value ? candidate : (serving.find((m) => m.version !== a.value) || {}).version;
  if (other) b.value = other;
}

function hitTile(hit, shared) {
  return el("div", { class: "hit" + (shared ? " shared" : ""), "data-image": hit.image_id, title: hit.image_id },
    el("img", { src: hit.url, alt: hit.image_id, loading: "lazy" }),
    "#" + hit.rank + " " + fmt.n(hit.score, 3));
}

async function compare(event) {
  if (event) event.preventDefault();
  const query = $("#compare-query").value.trim();
  if (!query) return;
  const params = new URLSearchParams({ query, k: $("#compare-k").value || "8" });
  if ($("#compare-a").value) params.set("a", $("#compare-a").value);
  if ($("#compare-b").value) params.set("b", $("#compare-b").value);
  try {
    const c = await api("/api/compare?" + params);
    const idsA = new Set(c.a.results.map((h) => h.image_id)), idsB = new Set(c.b.results.map((h) => h.image_id));
    $("#row-a-title").textContent = c.a.version;
    $("#row-b-title").textContent = c.b.version;
    $("#row-a").replaceChildren(...c.a.results.map((h) => hitTile(h, idsB.has(h.image_id))));
    $("#row-b").replaceChildren(...c.b.results.map((h) => hitTile(h, idsA.has(h.image_id))));
    $("#compare-note").textContent = c.overlap + " of " + c.k + " images in both rows (outlined); pinned searches: no impression is recorded.";
    $("#judge-result").textContent = "";
  } catch (error) {
    $("#compare-note").textContent = "";
    problem("compare: " + error.message);
  }
}

async function askJudge() {
  const out = $("#judge-result");
  const headers = { "content-type": "application/json" };
  if (token()) headers.authorization = "Bearer " + token();
  out.className = "";
  out.textContent = "asking the judge, both orders...";
  try {
    const v = await api("/api/judge", { method: "POST", headers, body: JSON.stringify({
      query: $("#compare-query").value.trim(), a: $("#compare-a").value, b: $("#compare-b").value, k: Number($("#compare-k").value || 8) }) });
    out.className = "ok";
    out.replaceChildren(...v.verdicts.map((x) => el("div", { "data-aspect": x.aspect },
      x.aspect + ": " + (x.verdict === "similar" ? "similar (the two orders disagree, or the rows are the same)" : x.preferred + " is better in both orders") + ", " + x.tokens + " tokens")));
  } catch (error) {
    out.className = "refused";
    out.textContent = "refused: " + error.message;
  }
}

// ---- models and runs -----------------------------------------------------

async function showModels() {
  const [{ models }, { runs }] = await Promise.all([api("/api/models"), api("/api/runs?limit=20")]);
  $("#models tbody").replaceChildren(...models.map((m) => el("tr", {
    class: "clickable" + (m.version === selectedVersion ? " selected" : ""), "data-version": m.version,
    onclick: () => { selectedVersion = m.version; showLineage(m.version); showModels(); },
  }, el("td", { text: m.version }), el("td", {}, state(m.state)), el("td", { text: m.parent || "-" }),
    el("td", { text: m.deployment ? m.deployment.variant + " " + m.deployment.weight : "-" }),
    el("td", { text: gateText(m.gate) }), el("td", { text: pairText(m.pair_counts) }), el("td", { text: fmt.datetime(m.created_at) }))));
  $("#runs tbody").replaceChildren(...runs.map((r) => el("tr", {},
    el("td", { text: fmt.datetime(r.started_at) }), el("td", {}, state(r.state)), el("td", { text: r.trigger_kind }),
    el("td", { text: r.model_version || "-" }), el("td", { text: pairText(r.pair_counts) }),
    el("td", { text: fmt.secs(r.started_at, r.finished_at) }), el("td", { text: r.reason || "" }))));
}

async function showLineage(version) {
  const lineage = await api("/api/models/" + encodeURIComponent(version) + "/lineage");
  $("#lineage").replaceChildren(el("h2", { text: "Why " + version + " exists" }), el("div", { class: "lineage" },
    ...lineage.generations.map((g) => el("div", { class: "generation", "data-version": g.version },
      el("h3", {}, g.version + " ", state(g.state)),
      g.run ? el("div", { class: "label", text: g.run.trigger.kind + " run by " + g.run.trigger.requested_by + " (" + g.run.trigger.reason + "), from " + (g.run.parent_version || "-") + " on pairs " + pairText(g.run.pair_counts) + ", device " + (g.run.device || "-") }) : el("div", { class: "label", text: "not trained by Kalon (a person's version)" }),
      el("div", { class: "label", text: "gate: " + gateText(g.gate) }),
      el("ul", {}, ...g.transitions.map((t) => el("li", { text: fmt.datetime(t.at || t.created_at) + ": " + (t.from_state || "new") + " -> " + t.to_state + " by " + (t.actor || "-") + (t.reason ? " (" + t.reason + ")" : "") })))))));
}

// ---- routing -------------------------------------------------------------

const views = { overview: showOverview, canary: showCanary, compare: fillVersions, models: showModels };

function current() {
  const name = location.hash.replace("#", "");
  return views[name] ? name : "overview";
}

async function refresh() {
  const view = current();
  $$(".view").forEach((v) => { v.hidden = v.id !== "view-" + view; });
  $$("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
  try {
    await views[view]();
    problem(null);
    document.body.dataset.loaded = view;
  } catch (error) {
    problem(view + ": " + error.message);
  }
}

function schedule() {
  clearInterval(timer);
  // the comparison refreshes only when asked
  timer = setInterval(() => { if (current() !== "compare") refresh(); }, settings.refresh_ms);
}

async function start() {
  try { settings = await api("/api/config"); } catch (_) { /* defaults */ }
  $("#token").value = sessionStorage.getItem("kalon-token") || "";
  $("#token").addEventListener("change", () => sessionStorage.setItem("kalon-token", token()));
  $$(".actions button").forEach((b) => b.addEventListener("click", () => act(b.dataset.action)));
  $("#show-holds").addEventListener("change", refresh);
  $("#compare-form").addEventListener("submit", compare);
  $("#judge-go").addEventListener("click", askJudge);
  $("#judge-go").hidden = !settings.judge;
  window.addEventListener("hashchange", refresh);
  await refresh();
  schedule();
}

start();
