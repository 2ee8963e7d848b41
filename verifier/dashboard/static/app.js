// Strongroom fleet dashboard. Plain JavaScript, no libraries, no build step.
// Every text that comes from the fleet is inserted as text (textContent), never as HTML.
"use strict";

(() => {
  const CATS = ["affirming", "warning", "contraindicated", "stale", "offline", "revoked", "unverified", "pending"];
  const STACK = ["affirming", "pending", "warning", "stale", "offline", "revoked", "contraindicated", "unverified"];
  const LABELS = {
    affirming: "Affirming", warning: "Warning", contraindicated: "Contraindicated", stale: "Stale",
    offline: "Offline", revoked: "Revoked", unverified: "Unverified", pending: "No result yet",
  };
  const TOKEN_KEY = "strongroom-operator-token";
  const $ = (id) => document.getElementById(id);

  const state = {
    q: "", status: "", sort: "status", desc: false, offset: 0, limit: 50,
    summary: null, page: null, history: null, openDevice: null, detail: null,
    alertsSeen: -1, clockOffset: 0, historyAt: 0, historyTimer: null, refreshTimer: null, pendingChanged: new Set(), refreshAll: false,
  };

  // -- small helpers ----------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    for (const child of children) node.append(child);
    return node;
  }

  const serverNow = () => Date.now() / 1000 + state.clockOffset;

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const s = Math.max(0, Math.round(seconds));
    if (s < 5) return "just now";
    if (s < 90) return `${s} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }

  function until(t) {
    if (!t) return "—";
    const left = t - serverNow();
    if (left <= 0) return `expired ${ago(-left)}`;
    if (left < 90) return `in ${Math.round(left)} s`;
    if (left < 5400) return `in ${Math.round(left / 60)} min`;
    return `in ${Math.round(left / 3600)} h`;
  }

  const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "—");
  const short = (hex) => (hex ? hex.slice(0, 12) : "—");
  const chip = (cat, text) => el("span", { class: "chip", "data-cat": cat, text: text || LABELS[cat] || cat });

  let toastTimer = null;
  function toast(text, bad) {
    const box = $("toast");
    box.textContent = text;
    box.className = bad ? "toast bad" : "toast";
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.hidden = true; }, 6000);
  }

  async function getJson(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  // -- summary ----------------------------------------------------------------------------------

  function renderSummary() {
    const sum = state.summary;
    if (!sum) return;
    state.clockOffset = sum.at - Date.now() / 1000;
    const cards = [el("button", {
      type: "button", class: `card${state.status === "" ? " active" : ""}`, "data-cat": "total",
      onclick: () => setFilter(""),
    }, el("span", { class: "count", text: sum.total }), el("span", { class: "label", text: "Devices" }))];
    for (const cat of CATS) {
      const count = sum.counts[cat] || 0;
      cards.push(el("button", {
        type: "button", "data-cat": cat, "aria-pressed": state.status === cat ? "true" : "false",
        class: `card${count === 0 ? " zero" : ""}${state.status === cat ? " active" : ""}`,
        onclick: () => setFilter(state.status === cat ? "" : cat),
      }, el("span", { class: "count", text: count }), el("span", { class: "label", text: LABELS[cat] })));
    }
    $("summary").replaceChildren(...cards);
    const conn = $("conn");
    conn.textContent = sum.connected ? "live" : "broker unreachable";
    conn.className = sum.connected ? "conn live" : "conn down";
  }

  function setFilter(cat) {
    state.status = cat;
    state.offset = 0;
    $("filter").value = cat;
    renderSummary();
    loadPage();
  }

  // -- device table -----------------------------------------------------------------------------

  async function loadPage() {
    const params = new URLSearchParams({
      q: state.q, status: state.status, sort: state.sort, desc: state.desc ? "1" : "0",
      offset: String(state.offset), limit: String(state.limit),
    });
    try {
      state.page = await getJson(`/api/devices?${params}`);
    } catch (e) {
      return;
    }
    if (state.page.matched > 0 && state.offset >= state.page.matched) {
      state.offset = Math.max(0, Math.floor((state.page.matched - 1) / state.limit) * state.limit);
      loadPage();
      return;
    }
    renderTable();
  }

  function renderTable() {
    const page = state.page;
    const body = $("devices").tBodies[0];
    if (!page.rows.length) {
      const why = page.total ? "No device matches." : "No device has reported yet.";
      body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "empty", text: why })));
    } else {
      body.replaceChildren(...page.rows.map(rowNode));
    }
    const first = page.matched ? page.offset + 1 : 0;
    const last = page.offset + page.rows.length;
    const of = page.matched === page.total ? `${page.total}` : `${page.matched} (of ${page.total})`;
    $("page-info").textContent = `${first}–${last} of ${of}`;
    $("prev").disabled = page.offset === 0;
    $("next").disabled = last >= page.matched;
    for (const th of document.querySelectorAll("#devices th")) {
      const button = th.querySelector("button");
      if (!button) continue;
      const sorted = button.dataset.sort === state.sort;
      if (sorted) th.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    }
  }

  function rowNode(r) {
    const artifacts = Object.entries(r.artifacts).map(([n, v]) => `${n} v${v}`).join(", ");
    const reasons = r.reasons.join("; ");
    const connection = r.connection ? r.connection : "not heard from";
    const tr = el("tr", { "data-device": r.device, tabindex: 0, "data-cat": r.status },
      el("td", {}, el("span", { class: "mono", text: r.device }), el("span", { class: "sub", text: connection })),
      el("td", { class: "reasons" }, chip(r.status), reasons ? el("span", { class: "sub reason-text", text: reasons }) : null),
      el("td", { text: r.firmware || "—" }),
      el("td", {}, r.svn === null ? "—" : `SVN ${r.svn}`, el("span", { class: "sub mono", text: short(r.measurement), title: r.measurement })),
      el("td", { text: artifacts || "—" }),
      el("td", { text: ago(r.evidence_age_s), title: r.evidence_age_s === null ? "" : `${r.evidence_age_s} s` }),
      el("td", { text: until(r.lease_until), title: r.lease_until ? when(r.lease_until) : "" }),
    );
    tr.addEventListener("click", () => showDevice(r.device));
    tr.addEventListener("keydown", (e) => { if (e.key === "Enter") showDevice(r.device); });
    return tr;
  }

  // -- chart ------------------------------------------------------------------------------------

  async function loadHistory() {
    try {
      state.history = await getJson("/api/history");
    } catch (e) {
      return;
    }
    drawChart();
  }

  function drawChart() {
    const box = $("chart");
    const hist = state.history;
    if (!hist) return;
    const W = Math.max(box.clientWidth, 260), H = 180, L = 32, R = 8, T = 10, B = 22;
    const samples = hist.samples;
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Device counts by status over time" });
    if (!samples.length) {
      root.append(svg("text", { x: L, y: H / 2 }, "no data yet"));
      box.replaceChildren(root);
      return;
    }
    const idx = Object.fromEntries(hist.categories.map((c, i) => [c, i]));
    const now = Math.max(hist.now, samples[samples.length - 1][0]);
    const t0 = Math.min(samples[0][0], now - 10); // since the dashboard started
    const max = Math.max(1, ...samples.map((s) => s[1].reduce((a, b) => a + b, 0)));
    const x = (t) => L + ((t - t0) / (now - t0)) * (W - L - R);
    const y = (v) => T + (H - T - B) * (1 - v / max);
    const lower = samples.map(() => 0);
    for (const cat of STACK) {
      const i = idx[cat];
      if (i === undefined || samples.every((s) => s[1][i] === 0)) continue;
      const upper = samples.map((s, k) => lower[k] + s[1][i]);
      let d = `M${x(samples[0][0])},${y(upper[0])}`;
      for (let k = 1; k < samples.length; k++) d += `H${x(samples[k][0])}V${y(upper[k])}`;
      d += `H${x(now)}V${y(lower[samples.length - 1])}`;
      for (let k = samples.length - 1; k >= 1; k--) d += `H${x(samples[k][0])}V${y(lower[k - 1])}`;
      d += `H${x(samples[0][0])}Z`;
      const area = svg("path", { d, fill: cssColor(cat), "fill-opacity": 0.85 }, svg("title", {}, LABELS[cat]));
      root.append(area);
      upper.forEach((v, k) => { lower[k] = v; });
    }
    root.append(
      svg("line", { x1: L, y1: y(0), x2: W - R, y2: y(0), class: "axis" }),
      svg("line", { x1: L, y1: T, x2: L, y2: y(0), class: "axis" }),
      svg("text", { x: L - 6, y: y(max) + 4, "text-anchor": "end" }, String(max)),
      svg("text", { x: L - 6, y: y(0) + 4, "text-anchor": "end" }, "0"),
      svg("text", { x: L, y: H - 6 }, new Date(t0 * 1000).toLocaleTimeString()),
      svg("text", { x: W - R, y: H - 6, "text-anchor": "end" }, "now"),
    );
    box.replaceChildren(root);
  }

  const colorCache = {};
  function cssColor(cat) {
    if (!colorCache[cat]) {
      colorCache[cat] = getComputedStyle(document.documentElement).getPropertyValue(`--${cat}`).trim() || "#999";
    }
    return colorCache[cat];
  }

  function renderLegend() {
    $("legend").replaceChildren(...STACK.map((c) => el("li", { "data-cat": c, text: LABELS[c] })));
  }

  // -- alerts -----------------------------------------------------------------------------------

  async function loadAlerts() {
    let doc;
    try {
      doc = await getJson("/api/alerts");
    } catch (e) {
      return;
    }
    const items = doc.alerts.map((a) => el("li", { class: a.severity },
      el("span", { class: "meta", text: `${a.severity} · ${a.device} · ${new Date(a.at * 1000).toLocaleTimeString()}` }),
      el("span", { class: "reason", text: a.reason })));
    $("alerts").replaceChildren(...(items.length ? items : [el("li", { class: "meta", text: "No alerts since the dashboard started." })]));
  }

  // -- one device -------------------------------------------------------------------------------

  function showDevice(id) {
    location.hash = `device=${encodeURIComponent(id)}`;
  }

  function onHash() {
    const match = /^#device=(.+)$/.exec(location.hash);
    const id = match ? decodeURIComponent(match[1]) : null;
    const dialog = $("device-dialog");
    state.openDevice = id;
    if (!id) {
      if (dialog.open) dialog.close();
      return;
    }
    loadDetail().then(() => { if (!dialog.open && state.openDevice === id) dialog.showModal(); });
  }

  async function loadDetail() {
    const id = state.openDevice;
    if (!id) return;
    try {
      state.detail = await getJson(`/api/devices/${encodeURIComponent(id)}`);
    } catch (e) {
      state.detail = null;
    }
    if (state.openDevice === id) renderDetail(id);
  }

  function renderDetail(id) {
    const d = state.detail;
    $("detail-title").replaceChildren(el("span", { class: "mono", text: id }), " ", d ? chip(d.row.status) : "");
    if (!d) {
      $("detail").replaceChildren(el("p", { text: "This device is not in the fleet view." }));
      setActions(null);
      return;
    }
    const row = d.row;
    const r = d.result;
    const parts = [];
    if (d.unverified) {
      parts.push(el("div", { class: "banner", id: "unverified-banner" },
        el("strong", { text: "Unverified result. " }),
        `The latest result on this device's topic does not verify with the fleet verifier's key (${d.unverified}). ` +
        "It is not trusted and none of it is shown" + (r ? "; below is the last verified result." : ".")));
    }
    parts.push(el("h3", { text: "Reasons" }));
    parts.push(row.reasons.length
      ? el("ul", { class: "reason-list", id: "detail-reasons" }, row.reasons.map((t) => el("li", { text: t })))
      : el("p", { id: "detail-reasons", text: r ? "None: every check passed." : "No result yet." }));
    const details = r ? r.details : {};
    const artifacts = Object.entries(row.artifacts).map(([n, v]) => `${n} v${v}`).join(", ");
    const facts = [
      ["Result", r ? `${r.status}, ${when(r.iat)}` : "—"],
      ["Firmware", row.firmware || "—"],
      ["Enclave SVN", row.svn === null ? "—" : String(row.svn)],
      ["Measurement (MRENCLAVE)", row.measurement || "—"],
      ["Artifacts", artifacts || "—"],
      ["Evidence", details.freshness ? `${details.freshness}, sequence ${details.seq ?? "—"}` : "—"],
      ["Last evidence", ago(row.evidence_age_s)],
      ["Key lease", row.lease_until ? `${until(row.lease_until)} (${when(row.lease_until)})` : "—"],
      ["Connection", d.connection.state ? `${d.connection.state} since ${when(d.connection.at)}` : "not heard from"],
      ["Registry", row.registry || "not enrolled"],
      ["Policy", r ? r.policy : "—"],
      ["Verifier", r ? r.verifier : "—"],
    ];
    parts.push(el("dl", { class: "facts" }, facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: v })))));

    const vector = r
      ? el("table", { class: "vector", id: "detail-vector" }, el("tbody", {}, r.vector.map((c) => {
        const bar = el("div", { class: "bar", "data-cat": c.tier });
        bar.style.width = `${Math.min(100, Math.abs(c.value))}%`;
        return el("tr", { "data-claim": c.claim },
          el("td", { text: c.claim }), el("td", { class: "mono", text: String(c.value) }),
          el("td", {}, c.value === 0 ? el("span", { class: "sub", text: "no claim" }) : chip(c.tier)),
          el("td", { class: "bar-cell" }, bar));
      })))
      : el("p", { text: "No verified result yet." });

    const strip = svg("svg", { viewBox: "0 0 300 22", preserveAspectRatio: "none" });
    const tl = d.timeline.slice().reverse();
    tl.forEach((t, k) => {
      const w = 300 / Math.max(tl.length, 1);
      strip.append(svg("rect", { x: k * w, y: 2, width: Math.max(w - 1, 1), height: 18, fill: cssColor(t.status === "none" ? (t.freshness === "stale" ? "stale" : "pending") : t.status) },
        svg("title", {}, `${t.status} · ${when(t.iat)}`)));
    });
    const timeline = el("div", {},
      el("div", { class: "timeline-strip" }, strip),
      el("ol", { class: "timeline", id: "detail-timeline" }, d.timeline.map((t) => el("li", {},
        el("span", { class: "when", text: new Date(t.iat * 1000).toLocaleTimeString() }),
        chip(t.status === "none" && t.freshness === "stale" ? "stale" : t.status, t.status),
        el("span", { text: t.reasons.join("; ") || t.freshness }))))
    );
    parts.push(el("div", { class: "detail-cols" },
      el("div", {}, el("h3", { text: "AR4SI trustworthiness vector" }), vector),
      el("div", {}, el("h3", { text: `Results (${d.timeline.length})` }), d.timeline.length ? timeline : el("p", { text: "None yet." }))));
    if (d.audit.length) {
      parts.push(el("h3", { text: "Operator and verifier actions (audit log)" }));
      parts.push(el("ul", { class: "audit", id: "detail-audit" }, d.audit.map((a) =>
        el("li", { text: `${when(a.at)} · ${a.event}${a.text ? ` · ${a.text}` : ""}` }))));
    }
    $("detail").replaceChildren(el("div", { class: "detail" }, parts));
    setActions(row.registry);
  }

  function setActions(registry) {
    for (const button of document.querySelectorAll("#device-dialog [data-action]")) {
      const action = button.dataset.action;
      button.disabled = !registry
        || (action === "revoke" && registry === "revoked")
        || (action === "reinstate" && registry !== "revoked")
        || (action === "reattest" && registry === "revoked");
    }
  }

  // -- operator actions -------------------------------------------------------------------------

  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

  function renderSignin() {
    const button = $("signin");
    button.textContent = token() ? "Operator: signed in" : "Operator sign-in";
    button.classList.toggle("signed-in", Boolean(token()));
  }

  function askToken() {
    const dialog = $("token-dialog");
    const input = $("token-input");
    const error = $("token-error");
    input.value = "";
    error.hidden = true;
    $("token-forget").hidden = !token();
    return new Promise((resolve) => {
      const done = (value) => {
        cleanup();
        if (dialog.open) dialog.close();
        renderSignin();
        resolve(value);
      };
      const submit = async (e) => {
        e.preventDefault();
        const candidate = input.value.trim();
        if (!candidate) return;
        const response = await fetch("/api/operator", { headers: { Authorization: `Bearer ${candidate}` } });
        if (response.status === 204) {
          sessionStorage.setItem(TOKEN_KEY, candidate);
          done(candidate);
        } else {
          error.textContent = "This token was refused.";
          error.hidden = false;
        }
      };
      const cancel = () => done(null);
      const forget = () => { sessionStorage.removeItem(TOKEN_KEY); done(null); };
      const onCancelEvent = (e) => { e.preventDefault(); done(null); };
      function cleanup() {
        $("token-form").removeEventListener("submit", submit);
        $("token-cancel").removeEventListener("click", cancel);
        $("token-forget").removeEventListener("click", forget);
        dialog.removeEventListener("cancel", onCancelEvent);
      }
      $("token-form").addEventListener("submit", submit);
      $("token-cancel").addEventListener("click", cancel);
      $("token-forget").addEventListener("click", forget);
      dialog.addEventListener("cancel", onCancelEvent);
      dialog.showModal();
      input.focus();
    });
  }

  function confirmAction(text, needsReason, verb) {
    const dialog = $("confirm-dialog");
    $("confirm-text").textContent = text;
    $("reason-label").hidden = !needsReason;
    $("reason-input").value = "";
    $("confirm-ok").textContent = verb;
    $("confirm-ok").className = needsReason ? "danger" : "";
    return new Promise((resolve) => {
      const done = (value) => {
        $("confirm-form").removeEventListener("submit", submit);
        $("confirm-cancel").removeEventListener("click", cancel);
        dialog.removeEventListener("cancel", cancel);
        if (dialog.open) dialog.close();
        resolve(value);
      };
      const submit = (e) => { e.preventDefault(); done({ reason: $("reason-input").value.trim() }); };
      const cancel = (e) => { if (e) e.preventDefault(); done(null); };
      $("confirm-form").addEventListener("submit", submit);
      $("confirm-cancel").addEventListener("click", cancel);
      dialog.addEventListener("cancel", cancel);
      dialog.showModal();
      (needsReason ? $("reason-input") : $("confirm-ok")).focus();
    });
  }

  const ACTION_TEXT = {
    revoke: ["Revoke", (id) => `Revoke ${id}? It gets no more keys, and its enclave is told to wipe its keys and plaintext.`],
    reinstate: ["Reinstate", (id) => `Reinstate ${id}? It gets keys again only after a fresh, affirming attestation.`],
    reattest: ["Request", (id) => `Ask the verifier to challenge ${id} now (fresh evidence)?`],
  };

  async function act(action) {
    const id = state.openDevice;
    if (!id) return;
    let bearer = token();
    if (!bearer) {
      bearer = await askToken();
      if (!bearer) return;
    }
    const [verb, text] = ACTION_TEXT[action];
    const answer = await confirmAction(text(id), action === "revoke", verb);
    if (!answer) return;
    const response = await fetch(`/api/devices/${encodeURIComponent(id)}/${action}`, {
      method: "POST",
      headers: { Authorization: `Bearer ${bearer}`, "Content-Type": "application/json" },
      body: JSON.stringify({ reason: answer.reason }),
    });
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      renderSignin();
      toast("The operator token was refused; sign in again.", true);
      return;
    }
    let doc = {};
    try { doc = await response.json(); } catch (e) { /* not JSON */ }
    if (!response.ok) {
      toast(`${verb} failed: ${doc.error || response.status}`, true);
      return;
    }
    const done = { revoke: "revoked", reinstate: "reinstated", reattest: "asked to re-attest" }[action];
    toast(doc.changed === false ? `${id} already ${doc.status}` : `${id} ${done}; recorded in the audit log`);
    scheduleRefresh(null);
  }

  // -- live updates -----------------------------------------------------------------------------

  function scheduleRefresh(changed) {
    if (changed === null) state.refreshAll = true;
    else for (const id of changed) state.pendingChanged.add(id);
    if (state.refreshTimer) return;
    state.refreshTimer = setTimeout(refresh, 150);
  }

  function refresh() {
    state.refreshTimer = null;
    const all = state.refreshAll;
    const changed = state.pendingChanged;
    state.refreshAll = false;
    state.pendingChanged = new Set();
    loadPage();
    if (state.openDevice && (all || changed.has(state.openDevice))) loadDetail();
    if (state.summary && state.summary.alerts !== state.alertsSeen) {
      state.alertsSeen = state.summary.alerts;
      loadAlerts();
    }
    // The chart moves slowly: at most one history request every 2 s, the last one never lost.
    const wait = 2000 - (Date.now() - state.historyAt);
    if (all || wait <= 0) {
      state.historyAt = Date.now();
      loadHistory();
    } else if (!state.historyTimer) {
      state.historyTimer = setTimeout(() => {
        state.historyTimer = null;
        state.historyAt = Date.now();
        loadHistory();
      }, wait);
    }
  }

  function connect() {
    const source = new EventSource("/api/events");
    source.addEventListener("update", (e) => {
      const doc = JSON.parse(e.data);
      state.summary = doc.summary;
      renderSummary();
      scheduleRefresh(doc.changed);
    });
    source.addEventListener("error", () => {
      const conn = $("conn");
      conn.textContent = "dashboard unreachable, retrying…";
      conn.className = "conn down";
    });
  }

  // -- wiring -----------------------------------------------------------------------------------

  function init() {
    const filter = $("filter");
    for (const cat of CATS) filter.append(el("option", { value: cat, text: LABELS[cat] }));
    filter.addEventListener("change", () => setFilter(filter.value));
    let searchTimer = null;
    $("search").addEventListener("input", (e) => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => { state.q = e.target.value; state.offset = 0; loadPage(); }, 200);
    });
    $("page-size").addEventListener("change", (e) => { state.limit = Number(e.target.value); state.offset = 0; loadPage(); });
    $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); loadPage(); });
    $("next").addEventListener("click", () => { state.offset += state.limit; loadPage(); });
    for (const button of document.querySelectorAll("#devices th button")) {
      button.addEventListener("click", () => {
        const key = button.dataset.sort;
        state.desc = state.sort === key ? !state.desc : false;
        state.sort = key;
        loadPage();
      });
    }
    $("signin").addEventListener("click", () => askToken());
    $("detail-close").addEventListener("click", () => { history.replaceState(null, "", location.pathname); onHash(); });
    $("device-dialog").addEventListener("close", () => {
      if (state.openDevice) { state.openDevice = null; history.replaceState(null, "", location.pathname); }
    });
    for (const button of document.querySelectorAll("#device-dialog [data-action]")) {
      button.addEventListener("click", () => act(button.dataset.action));
    }
    window.addEventListener("hashchange", onHash);
    window.addEventListener("resize", () => drawChart());
    setInterval(() => { if (state.page) renderTable(); }, 5000); // ages move on
    renderLegend();
    renderSignin();
    connect();
    onHash();
  }

  init();
})();
