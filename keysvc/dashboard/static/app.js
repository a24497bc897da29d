// keygate dashboard: live updates from the event stream (Server-Sent
// Events). The pages read fully without it. Every value from an event is
// put in the page as text (textContent), never as markup: a process name
// or path is whatever the attacker chose.
"use strict";
(function () {
  const body = document.body;
  const page = body.dataset.page;
  if (page !== "fleet" && page !== "vm" || !window.EventSource) return;
  const vm = body.dataset.vm;
  const live = document.getElementById("live");
  let last = body.dataset.lastEvent || "0";
  const src = new EventSource(body.dataset.stream + "?after=" + encodeURIComponent(last));
  src.onopen = function () { if (live) { live.textContent = "live"; live.classList.add("on"); } };
  src.onerror = function () { if (live) { live.textContent = "reconnecting"; live.classList.remove("on"); } };
  src.onmessage = function (m) {
    let ev;
    try { ev = JSON.parse(m.data); } catch (e) { return; }
    if (page === "vm" && ev.vm === vm) onVMEvent(ev);
    if (page === "fleet") onFleetEvent(ev);
  };

  function when(s) {
    const d = new Date(s);
    return isNaN(d) ? "" : d.toISOString().replace(/\.\d+Z$/, "Z").replace("T", " ");
  }
  function cell(tr, text) {
    const td = document.createElement("td");
    td.textContent = text === undefined || text === null ? "" : String(text);
    tr.appendChild(td);
    return td;
  }
  function bump(el) { if (el) el.textContent = String((parseInt(el.textContent, 10) || 0) + 1); }

  function onVMEvent(ev) {
    if (ev.kind === "heartbeat") {
      const hb = document.getElementById("last-heartbeat");
      if (hb) hb.textContent = when(ev.received);
      return;
    }
    const tbody = document.querySelector("#timeline tbody");
    if (!tbody) return;
    const empty = tbody.querySelector("tr.empty");
    if (empty) empty.remove();
    const tr = document.createElement("tr");
    tr.className = "entry alert fresh sev-" + (ev.severity || "info");
    tr.dataset.eventId = String(ev.id);
    cell(tr, when(ev.received));
    cell(tr, ev.severity === "info" ? "event" : "alert");
    cell(tr, ev.severity);
    cell(tr, ev.kind);
    cell(tr, ev.pid || "");
    cell(tr, ev.comm).className = "comm";
    cell(tr, ev.exe).className = "exe";
    cell(tr, ev.uid === undefined ? "" : ev.uid);
    cell(tr, ev.overlap ? "overlap" + (ev.overlap_bytes ? " (" + ev.overlap_bytes + " bytes)" : "") : "no");
    cell(tr, (ev.denied ? "denied" : "not denied") + (ev.mode ? " (" + ev.mode + ")" : ""));
    cell(tr, (ev.volume ? "volume " + ev.volume : "") + (ev.path ? " path " + ev.path : "") + (ev.message ? " " + ev.message : ""));
    tbody.insertBefore(tr, tbody.firstChild);
    if (ev.severity === "critical") bump(document.getElementById("critical"));
    if (ev.severity === "warning") bump(document.getElementById("warning"));
    if (ev.mode) { const m = document.getElementById("mode"); if (m) m.textContent = ev.mode; }
  }

  function onFleetEvent(ev) {
    const rows = document.querySelectorAll("#fleet tbody tr");
    for (const tr of rows) {
      if (tr.dataset.vm !== ev.vm) continue;
      if (ev.kind === "heartbeat") {
        const hb = tr.querySelector("td.heartbeat");
        if (hb) hb.textContent = when(ev.received);
      } else if (ev.severity === "critical" || ev.severity === "warning") {
        bump(tr.querySelector("td." + ev.severity));
        tr.classList.add("fresh");
        if (ev.mode) { const m = tr.querySelector("td.mode"); if (m) m.textContent = ev.mode; }
      }
    }
  }
})();
