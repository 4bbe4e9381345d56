// vmshield web console: talks only to the REST API with the bearer token.
// Every string that comes from a guest (or the store) is set with textContent,
// never innerHTML.
"use strict";

const state = {
  token: sessionStorage.getItem("vmshield-token") || "",
  vms: [],
  events: [],          // newest last, at most MAX_EVENTS
  lastId: null,        // for Last-Event-ID resume
  rate: new Map(),     // vm -> Map(bucket -> count)
  stream: null,        // AbortController of the SSE fetch
};
const MAX_EVENTS = 500;
const BUCKET = 5;      // seconds per chart bucket
const WINDOW = 120;    // seconds shown in the chart
const COLORS = ["#2e90fa", "#f79009", "#12b76a", "#ee46bc", "#7a5af8", "#f04438"];

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

async function api(method, path, body) {
  const opts = { method, headers: { Authorization: "Bearer " + state.token } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  if (r.status === 204) return null;
  const doc = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = new Error((doc.title || r.status) + ": " + (doc.detail || ""));
    err.status = r.status;
    throw err;
  }
  return doc;
}

// -- sign in -------------------------------------------------------------------------

async function signIn(token) {
  state.token = token;
  try {
    await api("GET", "/v1/vms");
  } catch (e) {
    $("signin-error").textContent = e.status === 401 ? "That token is not valid." : e.message;
    state.token = "";
    return;
  }
  sessionStorage.setItem("vmshield-token", token);
  $("signin").hidden = true;
  $("console").hidden = false;
  $("signout").hidden = false;
  const health = await fetch("/v1/health").then((r) => r.json()).catch(() => ({}));
  $("who").textContent = "host " + (health.host || "?");
  await refresh();
  await loadRecent();
  startStream();
  setInterval(refresh, 5000);
  setInterval(drawRate, 1000);
}

$("signin-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  signIn($("token").value.trim());
});
$("signout").addEventListener("click", () => {
  sessionStorage.removeItem("vmshield-token");
  location.reload();
});

// -- VMs and isolation requests --------------------------------------------------------

async function refresh() {
  const { vms } = await api("GET", "/v1/vms");
  state.vms = vms;
  const body = $("vms").tBodies[0];
  body.replaceChildren();
  for (const v of vms) {
    const tr = el("tr");
    tr.dataset.vm = v.id;
    const st = v.status || {};
    for (const t of [v.name, v.id, v.host, v.kernel || "-", st.engine || "-",
                     st.security_space || "none", st.armed_points || 0, st.last_error || ""]) {
      tr.append(el("td", t));
    }
    body.append(tr);
  }
  for (const sel of [$("iso-vm"), $("ev-vm")]) {
    const keep = sel.value;
    const first = sel.id === "ev-vm" ? [["", "all VMs"]] : [];
    sel.replaceChildren();
    for (const [value, label] of [...first, ...vms.map((v) => [v.id, v.name + " (" + v.id + ")"])]) {
      const o = el("option", label);
      o.value = value;
      sel.append(o);
    }
    if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
  }
  await refreshIsolations();
}

async function refreshIsolations() {
  const body = $("isolations").tBodies[0];
  const rows = [];
  for (const v of state.vms) {
    try {
      const { isolations } = await api("GET", "/v1/vms/" + encodeURIComponent(v.id) + "/isolations");
      for (const i of isolations) rows.push([v, i]);
    } catch (e) { /* the VM went away meanwhile */ }
  }
  body.replaceChildren();
  for (const [v, i] of rows) {
    const tr = el("tr");
    tr.dataset.iso = i.id;
    const filters = Object.entries(i.filters).map(([k, x]) => k + "=" + x).join(", ");
    for (const t of [i.id, v.name, i.object, filters, i.action]) tr.append(el("td", t));
    tr.append(el("td", i.state, "state-" + i.state));
    tr.append(el("td", i.reason || ""));
    const td = el("td");
    const btn = el("button", "Release");
    btn.addEventListener("click", async () => {
      btn.disabled = true;
      try {
        await api("DELETE", "/v1/isolations/" + encodeURIComponent(i.id));
      } catch (e) {
        $("iso-error").textContent = e.message;
      }
      await refresh();
    });
    td.append(btn);
    tr.append(td);
    body.append(tr);
  }
}

$("vm-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = { target: $("vm-target").value.trim() };
  if ($("vm-name").value.trim()) body.name = $("vm-name").value.trim();
  try {
    await api("POST", "/v1/vms", body);
    $("vm-target").value = "";
    $("vm-name").value = "";
    $("iso-error").textContent = "";
  } catch (e) {
    $("iso-error").textContent = e.message;
  }
  await refresh();
});

$("iso-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const filters = {};
  for (const part of $("iso-filters").value.split(",")) {
    const p = part.trim();
    if (!p) continue;
    const at = p.indexOf("=");
    if (at < 1) {
      $("iso-error").textContent = "bad filter " + JSON.stringify(p) + ": use KEY=VALUE";
      return;
    }
    filters[p.slice(0, at)] = p.slice(at + 1);
  }
  const button = ev.submitter || $("iso-form").querySelector("button");
  button.disabled = true;
  $("iso-error").textContent = "arming...";
  try {
    const r = await api("POST", "/v1/vms/" + encodeURIComponent($("iso-vm").value) + "/isolations",
      { object: $("iso-object").value.trim(), filters, action: $("iso-action").value });
    $("iso-error").textContent = r.state === "failed" ? "failed: " + r.reason : "";
  } catch (e) {
    $("iso-error").textContent = e.message;
  } finally {
    button.disabled = false;
  }
  await refresh();
});

// -- events ------------------------------------------------------------------------------

async function loadRecent() {
  const page = await api("GET", "/v1/events?limit=200");
  const evs = page.events;
  // newest last; keep only the tail of a long history
  for (const e of evs) addEvent(e, false);
  state.lastId = evs.length ? evs[evs.length - 1].id : Number(page.next_cursor || 0);
  renderEvents();
}

function addEvent(e, live) {
  state.events.push(e);
  if (state.events.length > MAX_EVENTS) state.events.shift();
  if (live) {
    const b = Math.floor(Date.now() / 1000 / BUCKET);
    if (!state.rate.has(e.vm)) state.rate.set(e.vm, new Map());
    const m = state.rate.get(e.vm);
    m.set(b, (m.get(b) || 0) + 1);
  }
}

function matches(e) {
  const vm = $("ev-vm").value;
  if (vm && e.vm_id !== vm) return false;
  const obj = $("ev-object").value.trim();
  if (obj && e.object !== obj) return false;
  const text = $("ev-text").value.trim();
  if (text && !JSON.stringify(e).includes(text)) return false;
  return true;
}

function renderEvents(newId) {
  const body = $("events").tBodies[0];
  body.replaceChildren();
  const shown = state.events.filter(matches).slice(-100).reverse();  // newest on top
  for (const e of shown) {
    const tr = el("tr", undefined, e.id === newId ? "new" : "");
    tr.dataset.object = e.object;
    const p = e.process;
    const who = p ? p.comm + " pid " + p.pid + " uid " + p.uid : "-";
    tr.append(el("td", e.id), el("td", new Date(e.time * 1000).toLocaleTimeString()),
              el("td", e.vm), el("td", e.object), el("td", e.action), el("td", who),
              el("td", JSON.stringify(e.fields), "fields"));
    body.append(tr);
  }
}

for (const id of ["ev-vm", "ev-object", "ev-text"]) {
  $(id).addEventListener("input", () => renderEvents());
}

// SSE over fetch (EventSource cannot send the Authorization header), resumed with
// Last-Event-ID after a dropped connection.
async function startStream() {
  for (;;) {
    const ctl = new AbortController();
    state.stream = ctl;
    try {
      const headers = { Authorization: "Bearer " + state.token };
      if (state.lastId !== null) headers["Last-Event-ID"] = String(state.lastId);
      const r = await fetch("/v1/events/stream", { headers, signal: ctl.signal });
      if (!r.ok) throw new Error("stream: HTTP " + r.status);
      $("stream-state").textContent = "(live)";
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).trim()).join("\n");
          if (!data) continue;
          const e = JSON.parse(data);
          state.lastId = e.id;
          addEvent(e, true);
          renderEvents(e.id);
        }
      }
    } catch (e) {
      $("stream-state").textContent = "(reconnecting: " + e.message + ")";
    }
    $("stream-state").textContent = "(reconnecting)";
    await new Promise((res) => setTimeout(res, 1000));
  }
}

// -- the per-VM event-rate chart ---------------------------------------------------------

function drawRate() {
  const c = $("rate");
  const g = c.getContext("2d");
  const w = c.width, h = c.height, pad = 24;
  g.clearRect(0, 0, w, h);
  const now = Math.floor(Date.now() / 1000 / BUCKET);
  const n = WINDOW / BUCKET;
  let max = 1;
  for (const m of state.rate.values()) {
    for (let i = 0; i < n; i++) max = Math.max(max, m.get(now - n + 1 + i) || 0);
  }
  g.strokeStyle = "#d0d5dd";
  g.beginPath();
  g.moveTo(pad, 4); g.lineTo(pad, h - pad); g.lineTo(w - 4, h - pad);
  g.stroke();
  g.fillStyle = "#667085";
  g.font = "11px sans-serif";
  g.fillText(String(max), 2, 12);
  g.fillText("0", 8, h - pad);
  g.fillText("-" + WINDOW + " s", pad, h - 8);
  g.fillText("now", w - 28, h - 8);
  const legend = $("legend");
  legend.replaceChildren();
  let k = 0;
  for (const [vm, m] of state.rate) {
    const color = COLORS[k++ % COLORS.length];
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.beginPath();
    for (let i = 0; i < n; i++) {
      const x = pad + ((w - pad - 4) * i) / (n - 1);
      const y = h - pad - ((h - pad - 8) * (m.get(now - n + 1 + i) || 0)) / max;
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    }
    g.stroke();
    const s = el("span", "\u25A0 " + vm);
    s.style.color = color;
    legend.append(s);
  }
}

if (state.token) signIn(state.token);
