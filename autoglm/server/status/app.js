// Status page: polls /status/data and renders it. No external assets, no frameworks.
"use strict";

const REFRESH_MS = 2000;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function bytes(n) {
  if (n === undefined || n === null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function count(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(2) + "B";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + "k";
  return String(n);
}

function duration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + (d || h || m ? m + "m " : "") + (s % 60) + "s";
}

function badge(ok, text) {
  return el("span", text, "badge " + (ok === null ? "pending" : ok ? "ok" : "bad"));
}

function setText(id, text) { document.getElementById(id).textContent = text; }

function renderModules(modules) {
  const body = document.querySelector("#modules tbody");
  body.replaceChildren();
  for (const m of modules) {
    const row = el("tr");
    row.className = "module-row";
    row.dataset.module = m.name;
    row.append(el("td", m.name));
    const health = el("td");
    const h = m.health;
    health.append(badge(h ? h.ok : null, h ? (h.ok ? "healthy" : "failing") : "checking"));
    row.append(health);
    row.append(el("td", m.format + " " + m.quantization));
    row.append(el("td", m.device));
    row.append(el("td", count(m.parameters)));
    row.append(el("td", bytes(m.bytes)));
    row.append(el("td", m.load_seconds.toFixed(2) + " s"));
    const detail = el("td", h ? h.detail + " (" + h.latency_ms.toFixed(0) + " ms)" : "", "wrap");
    detail.title = m.path;
    row.append(detail);
    body.append(row);
  }
}

function renderRecent(recent) {
  const body = document.querySelector("#recent tbody");
  body.replaceChildren();
  for (const r of recent.slice(0, 20)) {
    const row = el("tr");
    row.append(el("td", new Date(r.started * 1000).toLocaleTimeString()));
    row.append(el("td", r.request_id.slice(0, 10)));
    row.append(el("td", r.endpoint + (r.stream ? " (stream)" : "")));
    const status = el("td");
    status.append(badge(r.status < 400, r.status));
    row.append(status);
    row.append(el("td", r.prompt_tokens));
    row.append(el("td", r.completion_tokens + (r.reasoning_tokens ? " (" + r.reasoning_tokens + " think)" : "")));
    row.append(el("td", r.ttft_s === null ? "–" : (r.ttft_s * 1000).toFixed(0) + " ms"));
    row.append(el("td", r.duration_s.toFixed(2) + " s"));
    row.append(el("td", r.finish_reason || "–"));
    body.append(row);
  }
}

function render(data) {
  const m = data.model;
  setText("model-name", m.name);
  setText("served", m.name);
  setText("aliases", m.aliases.length ? m.aliases.join(", ") : "none");
  setText("path", m.path || "built-in default");
  setText("arch", (m.architecture || "–") + ((m.modalities || []).length ? " · " + m.modalities.join(", ") : ""));
  setText("ctx", m.max_model_len + " tokens");
  setText("uptime", duration(data.uptime_s));
  setText("requests", data.totals.requests);
  setText("errors", data.totals.errors);
  setText("tps", data.tokens_per_second.toFixed(1));
  setText("queue", (data.engine.running ?? 0) + " / " + (data.engine.waiting ?? 0));
  const e = data.engine;
  setText("kv", (e.kv_blocks_used ?? "–") + " / " + (e.kv_blocks_total ?? "–"));
  setText("prefix", e.prefix_cache_enabled === false ? "off" : ((e.prefix_cache_hit_rate ?? 0) * 100).toFixed(1) + " %");
  setText("preemptions", e.preemptions ?? 0);
  setText("rss", bytes(data.process.rss_bytes));
  renderModules(data.modules);
  renderRecent(data.recent);
  const healthy = data.modules.length > 0 && data.modules.every((x) => x.health && x.health.ok);
  const overall = document.getElementById("overall");
  overall.textContent = m.status === "ready" ? (healthy ? "healthy" : "degraded") : m.status;
  overall.className = "badge " + (m.status !== "ready" ? "pending" : healthy ? "ok" : "bad");
  setText("updated", "updated " + new Date().toLocaleTimeString());
}

async function refresh() {
  try {
    const response = await fetch("/status/data", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (err) {
    const overall = document.getElementById("overall");
    overall.textContent = "unreachable";
    overall.className = "badge bad";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
