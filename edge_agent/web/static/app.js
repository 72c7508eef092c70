"use strict";
// Small helpers for the server-rendered pages. Text goes in with textContent only.

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

async function api(method, url, body) {
  const opts = { method, headers: { "X-CSRF-Token": csrf() }, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(url, opts);
  if (r.status === 401) { window.location = "/login?next=" + encodeURIComponent(location.pathname); }
  const data = await r.json();
  if (!r.ok) { throw new Error(data.error ? data.error.message : r.statusText); }
  return data;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fmtTime(ts) {
  return ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) : "-";
}

function startWorklist(refreshMs) {
  document.getElementById("filters").addEventListener("submit", (e) => e.preventDefault());
  const body = document.querySelector("#worklist tbody");
  const q = document.getElementById("q"), state = document.getElementById("state");
  const critical = document.getElementById("critical");
  async function load() {
    const p = new URLSearchParams({ limit: "200" });
    if (q.value) p.set("q", q.value);
    if (state.value) p.set("state", state.value);
    if (critical.checked) p.set("critical", "true");
    try {
      const data = await api("GET", "/api/v1/studies?" + p.toString());
      body.replaceChildren();
      for (const s of data.studies) {
        const tr = document.createElement("tr");
        tr.dataset.study = s.study_uid;
        if (s.critical) tr.className = "critical";
        const badge = cell(tr, s.critical ? "CRITICAL" : "");
        if (s.critical) badge.className = "badge";
        const name = cell(tr, "");
        const a = document.createElement("a");
        a.href = "/studies/" + encodeURIComponent(s.study_uid);
        a.textContent = s.patient_name || "(no name)";
        name.appendChild(a);
        cell(tr, s.patient_id);
        cell(tr, s.modality);
        cell(tr, fmtTime(s.received_at));
        cell(tr, s.state, "state");
        cell(tr, s.ai_status, "ai");
        cell(tr, String(s.reviews));
        body.appendChild(tr);
      }
      document.getElementById("refreshed").textContent =
        data.total + " studies, updated " + new Date().toLocaleTimeString();
    } catch (e) {
      document.getElementById("refreshed").textContent = "refresh failed: " + e.message;
    }
  }
  for (const el of [q, state, critical]) el.addEventListener("input", load);
  load();
  setInterval(load, refreshMs);
}

function startStudy() {
  for (const div of document.querySelectorAll(".series")) {
    const img = div.querySelector("img.slice");
    if (!img) continue;
    const range = div.querySelector(".index"), preset = div.querySelector(".preset");
    const overlay = div.querySelector(".overlay"), pos = div.querySelector(".pos");
    const update = () => {
      const p = new URLSearchParams({
        index: range.value, preset: preset.value, overlay: overlay && overlay.checked ? "1" : "0",
      });
      img.src = "/api/v1/series/" + div.dataset.series + "/image?" + p.toString();
      pos.textContent = (Number(range.value) + 1) + " / " + div.dataset.count;
    };
    range.addEventListener("input", update);
    preset.addEventListener("change", update);
    if (overlay) overlay.addEventListener("change", update);
  }
  for (const res of document.querySelectorAll(".result")) {
    const list = res.querySelector("ul.reviews");
    for (const f of res.querySelectorAll(".finding")) {
      const send = async (decision, comment) => {
        try {
          const v = await api("POST", "/api/v1/results/" + res.dataset.result + "/reviews",
            { finding: f.dataset.finding, decision, comment: comment || "" });
          const li = document.createElement("li");
          li.className = "new-review";
          li.textContent = v.reviewer + ": " + v.decision + " " + v.finding + " " + v.comment;
          list.appendChild(li);
        } catch (e) {
          alert("Review not saved: " + e.message);
        }
      };
      f.querySelector(".accept").addEventListener("click", () => send("accept"));
      f.querySelector(".reject").addEventListener("click", () => send("reject"));
      f.querySelector(".send-comment").addEventListener("click",
        () => send("comment", f.querySelector(".comment").value));
    }
  }
  startActions();
  for (const b of document.querySelectorAll("button.restore")) {
    b.addEventListener("click", async () => {
      await api("POST", "/api/v1/studies/" + b.dataset.study + "/restore");
      b.textContent = "Restore requested";
      b.disabled = true;
    });
  }
}

function startActions() {
  const box = document.getElementById("actions");
  if (!box) return;
  const uid = box.dataset.study, status = document.getElementById("action-status");
  const url = "/api/v1/studies/" + encodeURIComponent(uid);
  // after a re-run: reload once the study is at rest again, to show the new results
  async function follow() {
    try {
      const s = await api("GET", url);
      if (s.state === "DONE" || s.state === "FAILED") { location.reload(); return; }
      status.textContent = "Re-run: " + s.state;
    } catch (e) { status.textContent = "Re-run: " + e.message; }
    setTimeout(follow, 1500);
  }
  document.getElementById("rerun").addEventListener("click", async () => {
    const model = document.getElementById("rerun-model").value;
    try {
      const r = await api("POST", url + "/rerun", model ? { model } : {});
      status.textContent = "Re-run requested (round " + r.round + ")";
      setTimeout(follow, 1500);
    } catch (e) { status.textContent = "Not re-run: " + e.message; }
  });
}

async function startConflicts() {
  const body = document.querySelector("#conflicts tbody");
  const status = document.getElementById("conflicts-status");
  async function load() {
    try {
      const data = await api("GET", "/api/v1/conflicts");
      body.replaceChildren();
      status.textContent = data.conflicts.length + " open";
      for (const c of data.conflicts) {
        const tr = document.createElement("tr");
        tr.dataset.conflict = c.id;
        cell(tr, String(c.id));
        cell(tr, c.key);
        cell(tr, c.data_type || c.type || "");
        cell(tr, JSON.stringify(c.edge_payload), "payload");
        cell(tr, JSON.stringify(c.cloud_payload), "payload");
        const td = cell(tr, "");
        for (const take of ["edge", "cloud"]) {
          const b = document.createElement("button");
          b.textContent = "Keep " + take;
          b.className = "take-" + take;
          b.addEventListener("click", async () => {
            try {
              await api("POST", "/api/v1/conflicts/" + c.id + "/resolve", { take });
              load();
            } catch (e) { alert("Not resolved: " + e.message); }
          });
          td.appendChild(b);
        }
        body.appendChild(tr);
      }
    } catch (e) {
      status.textContent = "cannot load the queue: " + e.message;
    }
  }
  load();
}

// The page names what to start in <body data-start>: no inline script, so the
// Content-Security-Policy can forbid them all.
(function start() {
  const d = document.body.dataset;
  const pages = {
    worklist: () => startWorklist(Number(d.refreshMs) || 5000),
    study: () => startStudy(),
    conflicts: () => startConflicts(),
  };
  if (pages[d.start]) pages[d.start]();
})();
