// Tally usage dashboard: plain JavaScript against the public JSON API, same origin.
// The API key lives in memory and this tab's sessionStorage only; it is taken from
// the URL fragment (#key=...), which browsers never send to the server.
"use strict";

(() => {
  const STORAGE = "tally.dashboard.key";
  const MINUTE = 60_000;
  const HOUR = 60 * MINUTE;
  const SVG = "http://www.w3.org/2000/svg";

  // Every endpoint the page calls; tests check each exists in the API.
  const ENDPOINTS = {
    usage: "/api/account/usage",
    usageV1: "/api/v1/account/usage",
    series: "/api/v1/analytics/usage",
    top: "/api/v1/analytics/top-accounts",
    plans: "/api/v1/admin/plans",
    forecast: "/api/v1/account/forecast",
    alerts: "/api/v1/account/alerts",
    webhooks: "/api/v1/admin/webhooks",
    deliveries: "/api/v1/admin/webhooks/{endpoint_id}/deliveries",
    ready: "/readyz",
  };

  const state = { key: null, role: null, timer: null, refreshS: 30 };

  const el = (id) => document.getElementById(id);
  const setText = (id, text) => {
    el(id).textContent = text;
  };

  // -- formatting: the rules the page documents under "How the numbers are shown" --
  const fmtInt = (n) => String(n);
  const fmtPct = (p) => Number(p).toFixed(1);
  const fmtUnits = (u) => String(Number(u));
  const fmtTime = (iso) => (iso === null || iso === undefined ? "—" : iso);

  function localTime(iso) {
    if (!iso) return "—";
    return new Date(iso).toLocaleString(undefined, {
      weekday: "short", hour: "2-digit", minute: "2-digit",
    });
  }

  function countdown(iso) {
    if (!iso) return "no window running";
    const ms = new Date(iso).getTime() - Date.now();
    if (ms <= 0) return "now";
    const mins = Math.floor(ms / MINUTE);
    const d = Math.floor(mins / 1440);
    const h = Math.floor((mins % 1440) / 60);
    const m = mins % 60;
    if (d > 0) return `in ${d}d ${h}h`;
    if (h > 0) return `in ${h}h ${m}m`;
    return m > 0 ? `in ${m}m` : "in <1m";
  }

  const floorTo = (t, step) => Math.floor(t / step) * step;
  const iso = (ms) => new Date(ms).toISOString();

  // -- the API ------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, body) {
      const detail = body && body.error ? body.error.message : `HTTP ${status}`;
      super(detail);
      this.status = status;
    }
  }

  async function call(path, params, bearer) {
    const url = new URL(path, window.location.origin);
    for (const [k, v] of Object.entries(params || {})) url.searchParams.set(k, v);
    const headers = bearer
      ? { Authorization: `Bearer ${state.key}` }
      : { "X-API-Key": state.key };
    const response = await fetch(url, { headers, cache: "no-store" });
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    return { status: response.status, body, headers: response.headers };
  }

  async function ok(path, params, bearer) {
    const r = await call(path, params, bearer);
    if (r.status !== 200) throw new ApiError(r.status, r.body);
    return r;
  }

  async function detectRole() {
    const r = await call(ENDPOINTS.plans);
    if (r.status === 200) return "admin";
    if (r.status === 403) return "account";
    throw new ApiError(r.status, r.body);
  }

  // -- drawing --------------------------------------------------------------------------
  function svg(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function level(p) {
    if (p >= 90) return "danger";
    if (p >= 70) return "warn";
    return "ok";
  }

  function gauge(prefix, window) {
    const pct = window.used_percentage;
    const arc = el(`${prefix}-gauge`).querySelector(".arc");
    arc.setAttribute("stroke-dasharray", `${Math.min(Math.max(pct, 0), 100)} 100`);
    el(`${prefix}-gauge`).className = `gauge ${level(pct)}`;
    setText(`${prefix}-used-percentage`, fmtPct(pct));
    setText(`${prefix}-resets-at`, fmtTime(window.resets_at));
    setText(`${prefix}-resets-local`, window.resets_at ? localTime(window.resets_at) : "when the next window starts");
    setText(`${prefix}-resets-in`, countdown(window.resets_at));
  }

  function meter(id, fraction) {
    const f = Number.isFinite(fraction) ? Math.min(Math.max(fraction, 0), 1) : 0;
    const bar = el(id);
    bar.setAttribute("width", String(f * 100));
    bar.setAttribute("class", `meter-fill ${level(f * 100)}`);
  }

  // The top of the y axis: four whole-number ticks with little headroom.
  function niceMax(v) {
    const step = Math.max(v / 4, 1);
    const mag = 10 ** Math.floor(Math.log10(step));
    for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
      if (m * mag >= step && Number.isInteger(m * mag)) return 4 * m * mag;
    }
    return 40 * mag;
  }

  // Bars for every bucket in [from, to), zero where the series has none.
  function barChart(container, series, from, to, step, labelEvery, label) {
    const byStart = new Map();
    for (const row of series.data) {
      const t = new Date(row.window_start).getTime();
      const seen = byStart.get(t) || { requests: 0, units: 0 };
      seen.requests += row.requests;
      seen.units += row.units;
      byStart.set(t, seen);
    }
    const buckets = [];
    for (let t = from; t < to; t += step) {
      buckets.push({ t, ...(byStart.get(t) || { requests: 0, units: 0 }) });
    }
    const peak = buckets.reduce((m, b) => Math.max(m, b.requests), 0);
    const total = buckets.reduce((s, b) => s + b.requests, 0);
    const top = niceMax(peak);

    const W = 960;
    const H = 220;
    const left = 44;
    const bottom = 24;
    const plotW = W - left - 8;
    const plotH = H - bottom - 10;
    container.replaceChildren();
    container.dataset.from = iso(from);
    container.dataset.to = iso(to);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label }, container);
    for (let i = 0; i <= 4; i++) {
      const y = 10 + plotH - (plotH * i) / 4;
      svg("line", { x1: left, x2: W - 8, y1: y, y2: y, class: i === 0 ? "axis" : "grid" }, root);
      const tick = svg("text", { x: left - 8, y: y + 4, class: "tick", "text-anchor": "end" }, root);
      tick.textContent = String(Math.round((top * i) / 4 * 10) / 10);
    }
    const slot = plotW / buckets.length;
    const gap = Math.max(1, slot * 0.18);
    buckets.forEach((b, i) => {
      const x = left + i * slot;
      if (b.requests > 0) {
        const h = Math.max(1.5, (plotH * b.requests) / top);
        const rect = svg("rect", {
          x: x + gap / 2, y: 10 + plotH - h, width: slot - gap, height: h, rx: Math.min(3, slot / 4),
          class: "bar", "data-testid": `${container.id}-bar`,
          "data-window-start": iso(b.t), "data-requests": b.requests, "data-units": fmtUnits(b.units),
        }, root);
        const title = svg("title", {}, rect);
        title.textContent = `${new Date(b.t).toLocaleString()}: ${b.requests} requests, ${fmtUnits(b.units)} units`;
      }
      if (i % labelEvery === 0) {
        const tick = svg("text", { x: x + slot / 2, y: H - 6, class: "tick", "text-anchor": "middle" }, root);
        tick.textContent = new Date(b.t).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
      }
    });
    setText(`${container.id}-total-requests`, fmtInt(total));
    setText(`${container.id}-peak-requests`, fmtInt(peak));
  }

  async function charts(now, account) {
    const minuteTo = floorTo(now, MINUTE) + MINUTE;
    const minuteFrom = minuteTo - 60 * MINUTE;
    const hourTo = floorTo(now, HOUR) + HOUR;
    const hourFrom = hourTo - 48 * HOUR;
    const scope = account ? { account } : {};
    const [minutes, hours] = await Promise.all([
      ok(ENDPOINTS.series, { from: iso(minuteFrom), to: iso(minuteTo), window: "minute", ...scope }),
      ok(ENDPOINTS.series, { from: iso(hourFrom), to: iso(hourTo), window: "hour", ...scope }),
    ]);
    barChart(el("chart-minute"), minutes.body, minuteFrom, minuteTo, MINUTE, 10, "Requests per minute");
    barChart(el("chart-hour"), hours.body, hourFrom, hourTo, HOUR, 6, "Requests per hour");
    // meta.account is the account the series is for: null means every account.
    const shown = minutes.body.meta.account;
    const text = shown === null ? " · all accounts" : ` · ${shown}`;
    for (const s of document.querySelectorAll("#charts .scope")) s.textContent = text;
    return minutes.body.meta;
  }

  function row(body, testid, cells) {
    // cells: [text, className] pairs; text only, never HTML (URLs and ids come from users).
    const tr = document.createElement("tr");
    tr.dataset.testid = testid;
    for (const [text, cls] of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }

  async function renderAlerts() {
    const [forecast, alerts] = await Promise.all([ok(ENDPOINTS.forecast), ok(ENDPOINTS.alerts)]);
    for (const name of ["session", "weekly"]) {
      const f = forecast.body.data[name];
      setText(`forecast-${name}-projected`, fmtPct(f.projected_percentage));
      setText(`forecast-${name}-exhausted-at`, f.exhausted_at ? fmtTime(f.exhausted_at) : "not before reset");
    }
    const body = el("alerts-body");
    body.replaceChildren();
    const found = alerts.body.data.slice(0, 10);
    for (const a of found) {
      row(body, "alert-row", [
        [a.emitted_at, "iso"], [a.type, "mono"], [`${a.window} from ${a.window_start}`, "iso"],
        [`${a.threshold} %`, "r num"], [`${fmtPct(a.used_percentage)} %`, "r num"],
      ]);
    }
    el("alerts-empty").hidden = found.length > 0;
    el("alerts").hidden = found.length === 0;
  }

  async function renderWebhooks() {
    const endpoints = (await ok(ENDPOINTS.webhooks)).body.data;
    const logs = await Promise.all(endpoints.map((e) =>
      ok(ENDPOINTS.deliveries.replace("{endpoint_id}", encodeURIComponent(e.id)), { limit: "5" })));
    const body = el("webhooks-body");
    body.replaceChildren();
    endpoints.forEach((e, i) => {
      const deliveries = logs[i].body.data;
      if (deliveries.length === 0) {
        row(body, "webhook-row", [[e.id, "mono"], [e.url, "mono"], ["—", "muted"], ["", null], ["", null], ["", null], ["", null], ["", null]]);
      }
      for (const d of deliveries) {
        const last = d.log[0];
        row(body, "webhook-row", [
          [e.id, "mono"], [e.url, "mono"], [d.id, "mono"], [d.event_type, null], [d.status, null],
          [fmtInt(d.attempts), "r num"], [last ? fmtInt(last.status_code) : "—", "r num"],
          [last ? Number(last.latency_ms).toFixed(1) : "—", "r num"],
        ]);
      }
    });
    el("webhooks-empty").hidden = endpoints.length > 0;
    el("webhooks").hidden = endpoints.length === 0;
  }

  async function ready() {
    // /readyz needs no key; 503 carries the same body, saying what is not ok.
    const response = await fetch(ENDPOINTS.ready, { cache: "no-store" });
    const body = await response.json();
    setText("ready-status", body.status);
    el("ready-pill").className = `pill ${body.status === "ready" ? "ok" : "danger"}`;
    return body;
  }

  async function renderAccount() {
    const now = Date.now();
    const [usage, v1] = await Promise.all([
      ok(ENDPOINTS.usage, {}, true),
      ok(ENDPOINTS.usageV1),
    ]);
    const u = usage.body;
    gauge("session", u.session);
    gauge("weekly", u.weekly);
    setText("plan", u.plan);

    const d = v1.body.data;
    setText("requests-today", fmtInt(d.requests.today));
    setText("requests-this-week", fmtInt(d.requests.this_week));
    setText("requests-this-month", fmtInt(d.requests.this_month));
    setText("limit-per-minute", fmtInt(d.requests.limit.per_minute));
    setText("limit-remaining", fmtInt(d.requests.limit.remaining));
    setText("limit-resets-at", fmtTime(d.requests.limit.resets_at));
    meter("limit-meter", 1 - d.requests.limit.remaining / d.requests.limit.per_minute);
    setText("streams-active", fmtInt(d.streams.active));
    setText("streams-max", fmtInt(d.streams.max));
    meter("streams-meter", d.streams.max > 0 ? d.streams.active / d.streams.max : 0);
    setText("period-start", d.period.start);
    setText("period-end", d.period.end);
    setText("data-delay", v1.headers.get("X-Data-Delay") || "—");
    setText("updated-at", v1.body.meta.updated_at);
    const [meta] = await Promise.all([charts(now, null), renderAlerts()]);
    setText("account-id", meta.account || "");
    el("account-label").hidden = !meta.account;
  }

  async function renderAdmin(readiness) {
    const now = Date.now();
    const to = floorTo(now, MINUTE) + MINUTE;
    const from = to - 24 * HOUR;
    const [top, meta] = await Promise.all([
      ok(ENDPOINTS.top, { from: iso(from), to: iso(to), metric: "units", limit: "10" }),
      charts(now, null),
      renderWebhooks(),
    ]);
    setText("top-from", top.body.meta.from);
    setText("top-to", top.body.meta.to);
    const body = el("top-accounts-body");
    body.replaceChildren();
    const rows = top.body.data;
    const sum = rows.reduce((s, r) => s + r.units, 0);
    rows.forEach((row, i) => {
      const tr = document.createElement("tr");
      tr.dataset.testid = "top-account-row";
      const cell = (text, testid, cls) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (testid) td.dataset.testid = testid;
        if (cls) td.className = cls;
        tr.appendChild(td);
        return td;
      };
      cell(String(i + 1), null, "muted");
      cell(row.account, "top-account-name", "mono");
      cell(fmtInt(row.requests), "top-account-requests", "r num");
      cell(fmtUnits(row.units), "top-account-units", "r num");
      const share = cell("", null, "share");
      const bar = svg("svg", { viewBox: "0 0 100 8", preserveAspectRatio: "none", class: "meter", "aria-hidden": "true" }, share);
      svg("rect", { class: "meter-track", x: 0, y: 0, width: 100, height: 8, rx: 4 }, bar);
      svg("rect", { class: "meter-fill ok", x: 0, y: 0, width: sum > 0 ? (100 * row.units) / sum : 0, height: 8, rx: 4 }, bar);
      body.appendChild(tr);
    });
    el("top-empty").hidden = rows.length > 0;
    el("top-accounts").hidden = rows.length === 0;

    setText("ready-status-detail", readiness.status);
    setText("ready-check-store", readiness.checks.store || "—");
    setText("ready-check-processors", readiness.checks.processors || "—");
    setText("pipeline-updated-at", fmtTime(meta.updated_at));
    setText(
      "pipeline-lag-seconds",
      meta.updated_at ? Math.max(0, (now - new Date(meta.updated_at).getTime()) / 1000).toFixed(1) : "—",
    );
  }

  // -- the page's life --------------------------------------------------------------------
  function showError(message) {
    const box = el("error");
    box.textContent = message;
    box.hidden = !message;
  }

  function show(role) {
    el("login").hidden = role !== null;
    el("topbar-right").hidden = role === null;
    el("account-view").hidden = role !== "account";
    el("admin-view").hidden = role !== "admin";
    el("charts").hidden = role === null;
  }

  async function refresh() {
    clearTimeout(state.timer);
    try {
      if (!state.role) state.role = await detectRole();
      setText("role", state.role);
      show(state.role);
      const readiness = await ready();
      if (state.role === "admin") await renderAdmin(readiness);
      else await renderAccount();
      setText("refreshed-at", new Date().toLocaleTimeString());
      showError("");
      document.body.dataset.loaded = "true";
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        signOut();
        showError("That API key was not accepted (unknown or revoked). Check it and try again.");
        return;
      }
      showError(`Could not load usage: ${err.message}. Retrying in ${state.refreshS} s.`);
    }
    state.timer = setTimeout(refresh, state.refreshS * 1000);
  }

  function signIn(key) {
    state.key = key.trim();
    state.role = null;
    sessionStorage.setItem(STORAGE, state.key);
    refresh();
  }

  function signOut() {
    clearTimeout(state.timer);
    state.key = null;
    state.role = null;
    sessionStorage.removeItem(STORAGE);
    show(null);
  }

  function fromFragment() {
    const params = new URLSearchParams(window.location.hash.slice(1));
    const refreshS = Number(params.get("refresh"));
    if (Number.isFinite(refreshS) && refreshS >= 5) state.refreshS = refreshS;
    setText("refresh-seconds", String(state.refreshS));
    const key = params.get("key");
    if (key) {
      // Out of the address bar (and screenshots, and history) once read.
      params.delete("key");
      const rest = params.toString();
      history.replaceState(null, "", window.location.pathname + (rest ? `#${rest}` : ""));
    }
    return key;
  }

  document.addEventListener("DOMContentLoaded", () => {
    el("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = el("key-input").value;
      el("key-input").value = "";
      if (key.trim()) signIn(key);
    });
    el("sign-out").addEventListener("click", signOut);
    el("refresh-now").addEventListener("click", refresh);
    const key = fromFragment() || sessionStorage.getItem(STORAGE);
    if (key) signIn(key);
    else show(null);
  });
})();
