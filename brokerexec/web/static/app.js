// brokerexec web view: one live stream per tab, and controls sent without leaving the page.
// Every page reads right without this file; it only keeps the page up to date.
"use strict";

(function () {
  const body = document.body;
  const csrf = body.dataset.csrf || "";

  function when(epoch) {
    const d = new Date(epoch * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function took(seconds) {
    if (seconds == null || !isFinite(seconds)) return "-";
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    if (seconds < 3600) return `${(seconds / 60).toFixed(1)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  function short(value, limit) {
    const text = typeof value === "string" ? value : JSON.stringify(value);
    return text.length > limit ? text.slice(0, limit) + "…" : text;
  }

  function rows(jobId) {
    return document.querySelectorAll(`[data-job-id="${CSS.escape(jobId)}"]`);
  }

  function setBar(bar, fraction) {
    const percent = Math.max(0, Math.min(100, Math.round(fraction * 100)));
    bar.value = percent;  // a <progress>: its role and value are the browser's own
    bar.textContent = `${percent}%`;
  }

  function onProgress(event) {
    const data = event.data || {};
    const fraction = typeof data.fraction === "number" ? data.fraction : null;
    for (const bar of document.querySelectorAll(`[data-bar-of="${CSS.escape(event.job_id)}"]`)) {
      if (fraction !== null) setBar(bar, fraction);
    }
    for (const row of rows(event.job_id)) {
      const eta = row.querySelector("[data-eta]");
      if (eta && fraction && typeof data.elapsed === "number") {
        eta.textContent = fraction >= 1 ? "" : `ETA ${took(data.elapsed * (1 - fraction) / fraction)}`;
      }
    }
  }

  function onState(event) {
    const to = (event.data || {}).to;
    if (!to) return;
    for (const row of rows(event.job_id)) {
      row.dataset.state = to;
      for (const field of row.querySelectorAll('[data-field="state"]')) field.textContent = to;
      const attempt = row.querySelector('[data-field="attempt"]');
      if (attempt && event.attempt) attempt.textContent = String(event.attempt);
    }
    if (["finished", "failed", "aborted"].includes(to) && document.querySelector("article.job")) {
      if (to === "finished") {
        for (const bar of document.querySelectorAll(`[data-bar-of="${CSS.escape(event.job_id)}"]`)) setBar(bar, 1);
      }
      // The result and its controls' end: the page again, once the store has the record.
      setTimeout(() => location.reload(), 1500);
    }
  }

  const points = [];
  function onImproved(event) {
    const state = (event.data || {}).state;
    const table = document.querySelector("[data-improved]");
    if (table) {
      const tr = document.createElement("tr");
      const at = document.createElement("td");
      at.textContent = when(event.time);
      const value = document.createElement("td");
      const code = document.createElement("code");
      code.textContent = short(state, 2000);
      value.appendChild(code);
      tr.append(at, value);
      table.appendChild(tr);
      while (table.children.length > 20) table.removeChild(table.firstElementChild);
    }
    drawChart(event.time, state);
  }

  function drawChart(time, state) {
    const holder = document.querySelector("[data-chart]");
    if (!holder || !state || typeof state !== "object") return;
    let svg = holder.querySelector("svg");
    const field = (svg && svg.dataset.field) ||
      Object.keys(state).find((name) => typeof state[name] === "number" && isFinite(state[name]));
    if (!field || typeof state[field] !== "number") return;
    points.push([time, state[field]]);
    if (!svg) {
      svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("class", "chart");
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", `${field} over time`);
      svg.dataset.field = field;
      svg.setAttribute("viewBox", "0 0 480 120");
      svg.setAttribute("width", "100%");
      svg.setAttribute("height", "120");
      const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", "currentColor");
      line.setAttribute("stroke-width", "2");
      svg.appendChild(line);
      holder.replaceChildren(svg);
    }
    const times = points.map((p) => p[0]);
    const values = points.map((p) => p[1]);
    const t0 = Math.min(...times), t1 = Math.max(...times);
    const lo = Math.min(...values), hi = Math.max(...values);
    const spanT = t1 - t0 || 1, spanV = hi - lo || 1;
    const coords = points.map(([t, v]) =>
      `${((t - t0) / spanT * 470 + 5).toFixed(1)},${(115 - (v - lo) / spanV * 110).toFixed(1)}`);
    svg.querySelector("polyline").setAttribute("points", coords.join(" "));
  }

  function onCheckpoint(event) {
    for (const row of rows(event.job_id)) {
      const field = row.querySelector('[data-field="checkpoint"]');
      if (field) field.textContent = when(event.time);
    }
  }

  function logEvent(event) {
    const log = document.querySelector("[data-events]");
    if (!log) return;
    const item = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = when(event.time);
    const kind = document.createElement("b");
    kind.textContent = event.kind;
    const code = document.createElement("code");
    code.textContent = short(event.data, 500);
    item.append(time, " ", kind, " ", code);
    log.prepend(item);
    while (log.children.length > 200) log.removeChild(log.lastElementChild);
  }

  const refreshes = {};
  function refreshCounts() {
    // An operation's counts come from the store, which follows the journal a little behind:
    // the page again soon, and once more a little later; its live parts taken.
    for (const delay of [500, 2500]) {
      if (refreshes[delay]) continue;
      refreshes[delay] = setTimeout(async () => {
        refreshes[delay] = null;
        try {
          const answer = await fetch(location.href, { headers: { Accept: "text/html" } });
          if (!answer.ok) return;
          const page = new DOMParser().parseFromString(await answer.text(), "text/html");
          const live = ["[data-counts]", "table.items tbody", '[data-field="rate"]', '[data-field="eta"]', "[data-best]"];
          for (const selector of live) {
            const now = document.querySelector(selector), fresh = page.querySelector(selector);
            if (now && fresh) now.replaceWith(document.importNode(fresh, true));
          }
        } catch (error) { /* the next event tries again */ }
      }, delay);
    }
  }

  const handlers = { progress: onProgress, state: onState, improved: onImproved, checkpoint: onCheckpoint };

  let source = null;
  function listen(from) {
    const stream = body.dataset.stream;
    if (!stream || !window.EventSource) return;
    const url = stream + (stream.includes("?") ? "&" : "?") + "from=" + encodeURIComponent(from || "");
    source = new EventSource(url);
    const said = document.querySelector("[data-live-state]");
    source.onopen = () => { if (said) said.textContent = "live"; };
    // On an error the browser reconnects by itself, sending the last id it saw (Last-Event-ID).
    source.onerror = () => { if (said) said.textContent = "reconnecting…"; };
    source.addEventListener("reset", () => location.reload());
    source.addEventListener("job", (message) => {
      const event = JSON.parse(message.data);
      body.dataset.lastEventId = message.lastEventId;
      const handle = handlers[event.kind];
      if (handle) handle(event);
      logEvent(event);
      if (body.dataset.refresh === "counts" && event.kind === "state") refreshCounts();
    });
  }

  // A stream dropped and opened again goes on after the last event this page saw.
  window.brokerexec = {
    disconnect() { if (source) { source.close(); source = null; } },
    reconnect() { this.disconnect(); listen(body.dataset.lastEventId || body.dataset.liveFrom); },
  };

  function controls() {
    for (const form of document.querySelectorAll("form[data-control]")) {
      form.addEventListener("submit", async (submitted) => {
        submitted.preventDefault();
        const output = form.querySelector("[data-outcome]");
        const button = form.querySelector("button");
        if (button) button.disabled = true;
        try {
          const answer = await fetch(form.getAttribute("action"), {
            method: "POST", body: new FormData(form),
            headers: { Accept: "application/json", "X-CSRF-Token": csrf },
          });
          const text = await answer.text();
          let said;
          try { said = JSON.parse(text); } catch (error) { said = { ok: false, message: text }; }
          if (output) {
            output.textContent = said.message || (answer.ok ? "done" : `refused (${answer.status})`);
            output.className = said.ok ? "ok" : "refused";
          }
          if (said.ok && body.dataset.refresh === "counts") refreshCounts();
        } catch (error) {
          if (output) { output.textContent = "the server did not answer"; output.className = "refused"; }
        } finally {
          if (button) button.disabled = false;
        }
      });
    }
  }

  // A browser opens at most six connections to one server over HTTP/1.1, and each live tab
  // holds one: a tab out of sight lets go of its stream, and goes on from its last event when
  // it is seen again (or loads again, if the server no longer holds that event).
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "hidden") window.brokerexec.disconnect();
    else if (!source) window.brokerexec.reconnect();
  });

  listen(body.dataset.liveFrom);
  controls();
})();
