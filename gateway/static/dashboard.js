// The loraroute dashboard: polls /dashboard/state every second and redraws six panels.
// No framework, no external resource; every value is inserted as text (never as HTML).
"use strict";

const POLL_MS = 1000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function ms(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return seconds < 1 ? `${(seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0)} ms` : `${seconds.toFixed(2)} s`;
}

function pct(x) {
  return x === null || x === undefined ? "–" : `${(100 * x).toFixed(0)} %`;
}

function ago(at) {
  const s = Math.max(0, Date.now() / 1000 - at);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

function bar(fraction) {
  const f = Math.max(0, Math.min(1, fraction || 0));
  const fill = el("span", {});
  fill.style.width = `${(100 * f).toFixed(1)}%`; // CSSOM, allowed by the page's CSP (style attributes are not)
  return el("span", { class: f > 0.9 ? "bar hot" : "bar", title: pct(f) }, fill);
}

function table(head, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, ...head.map(([label, cls]) => el("th", cls ? { class: cls } : {}, label)))),
    el("tbody", {}, ...rows));
}

function fill(panel, content, rows) {
  const body = document.querySelector(`[data-panel="${panel}"] .body`);
  body.replaceChildren(rows ? content : el("div", { class: "empty" }, content));
  body.dataset.rows = String(rows);
}

function drawMatrix(s) {
  const pods = s.pods.filter((p) => p.state).map((p) => p.pod);
  if (!s.adapters.length || !pods.length) return fill("matrix", "no adapters or no pods yet", 0);
  const rows = s.adapters.map((a) => el("tr", { "data-adapter": a }, el("td", {}, a),
    ...pods.map((p) => {
      const tier = (s.matrix[p] || {})[a] || "none";
      return el("td", {}, el("span", { class: `tier ${tier}`, "data-tier": tier }, tier === "none" ? "—" : tier));
    })));
  fill("matrix", table([["adapter"], ...pods.map((p) => [p])], rows), rows.length);
}

function drawPods(s) {
  const rows = s.pods.map((p) => p.state
    ? el("tr", {}, el("td", {}, p.pod),
        el("td", { class: p.healthy && p.routable ? "ok" : "bad" }, p.healthy ? (p.routable ? "routable" : "not routable") : "unhealthy"),
        el("td", {}, bar(p.kv), ` ${pct(p.kv)}`),
        el("td", { class: "num" }, `${p.running} / ${p.waiting} / ${p.deferred}`),
        el("td", { class: "num" }, p.inflight), el("td", { class: "num" }, `${p.age_s} s`),
        el("td", { class: "num", title: "GPU slots / CPU cache / max rank" }, `${p.max_loras}/${p.max_cpu_loras} r${p.max_lora_rank}`),
        el("td", {}, p.sidecar ? "yes" : "no"))
    : el("tr", {}, el("td", {}, p.pod), el("td", { class: "bad" }, "no state"), el("td", { colspan: "6" }, "")));
  if (!rows.length) return fill("pods", "no pod discovered", 0);
  fill("pods", table([["pod"], ["state"], ["KV cache"], ["run / wait / defer", "num"], ["in flight", "num"],
    ["age", "num"], ["LoRA", "num"], ["sidecar"]], rows), rows.length);
}

function drawModels(s) {
  document.getElementById("window").textContent = `last ${Math.round(s.window_s / 60)} minutes`;
  const rows = s.models.map((m) => el("tr", { "data-model": m.model }, el("td", {}, m.model),
    el("td", { class: "num" }, m.requests), el("td", { class: "num" }, pct(m.gpu)),
    el("td", { class: "num" }, m.gpu === null ? "–" : pct(m.gpu + m.cpu)),
    el("td", { class: "num" }, m.streams), el("td", { class: "num" }, ms(m.ttft_p50)), el("td", { class: "num" }, ms(m.ttft_p99))));
  if (!rows.length) return fill("models", "no request in the window", 0);
  fill("models", table([["model"], ["requests", "num"], ["GPU hit", "num"], ["GPU+CPU hit", "num"], ["streams", "num"],
    ["TTFT p50", "num"], ["TTFT p99", "num"]], rows), rows.length);
}

function drawDecisions(s) {
  if (!s.decisions.length) return fill("decisions", "no request routed yet", 0);
  const items = s.decisions.slice(0, 6).map((d) => {
    const scorers = d.candidates.length ? Object.keys(d.candidates[0].scores) : [];
    const cands = d.candidates.map((c) => el("tr", { class: c.pod === d.picked ? "picked" : "" }, el("td", {}, c.pod),
      el("td", { class: "num" }, c.total.toFixed(3)), ...scorers.map((n) => el("td", { class: "num" }, (c.scores[n] ?? 0).toFixed(3)))));
    return el("div", { class: "decision", "data-request": d.request_id },
      el("div", { class: "head" }, el("b", {}, d.model), el("span", {}, `→ ${d.picked || "none"}`),
        el("span", { class: d.status && d.status < 400 ? "ok" : d.status ? "bad" : "" }, d.status ? `HTTP ${d.status}` : "in flight"),
        el("span", { class: "who" }, `${d.policy} · ${ago(d.at)} · ${d.request_id}`)),
      el("div", { class: "reason" }, d.reason),
      table([["pod"], ["total", "num"], ...scorers.map((n) => [n, "num"])], cands));
  });
  fill("decisions", el("div", {}, ...items), items.length);
}

function drawPending(s) {
  if (!s.pending.length) return fill("pending", "nothing waits for approval", 0);
  const items = s.pending.map((c) => el("div", { class: "change", "data-change": c.id },
    el("b", {}, `${c.id} `), c.what, el("div", { class: "who" },
      `proposed by ${c.proposed_by} ${ago(c.proposed_at)}${c.spec.reason ? " · " + c.spec.reason : ""} · approve: loraroute changes approve ${c.id}`)));
  fill("pending", el("div", {}, ...items), items.length);
}

function drawAudit(s) {
  if (!s.audit.length) return fill("audit", "no entry yet", 0);
  const items = s.audit.map((e) => el("div", { class: "entry" },
    el("span", { class: `event ${e.event}` }, e.event), ` ${e.change_id} `, e.what,
    el("div", { class: "who" }, `#${e.seq} by ${e.by} · ${e.time}`)));
  fill("audit", el("div", {}, ...items), items.length);
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch("/dashboard/state", { credentials: "same-origin", cache: "no-store" });
    if (resp.status === 401 || resp.status === 403) {
      status.textContent = `HTTP ${resp.status}: admin key needed`;
      status.className = "status down";
      return;
    }
    const s = await resp.json();
    for (const draw of [drawMatrix, drawPods, drawModels, drawDecisions, drawPending, drawAudit]) draw(s);
    status.textContent = "live";
    status.className = "status live";
    document.getElementById("meta").textContent =
      `policy ${s.policy} · config generation ${s.generation} · changes in ${s.changes} · updated ${new Date(s.at * 1000).toLocaleTimeString()}`;
    document.body.dataset.updated = String(s.at);
  } catch (err) {
    status.textContent = "gateway unreachable";
    status.className = "status down";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
