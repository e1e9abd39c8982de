// The live wall. Camera tiles show the server-annotated MJPEG streams; figures come from the
// WebSocket /ws (per-frame results + stats every second), with /api/cameras polling as a fallback.
"use strict";

const wall = document.getElementById("wall");
const tiles = new Map(); // camera id -> {el, img, status}
let focused = null;
let lastStats = null;
let wsAlive = false;

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 0) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
const STATUS_TEXT = { live: "live", no_signal: "no signal", reconnecting: "reconnecting" };

function streamUrl(id) {
  return `/cameras/${encodeURIComponent(id)}/stream.mjpg?t=${Date.now()}`;
}

function columnsFor(n) {
  if (n <= 1) return 1;
  if (n <= 4) return 2;
  if (n <= 9) return 3;
  return 4;
}

function makeTile(cam) {
  const el = document.getElementById("tile-tpl").content.firstElementChild.cloneNode(true);
  el.dataset.camera = cam.id;
  el.querySelector(".name").textContent = cam.name || cam.id;
  const img = el.querySelector("img");
  img.alt = `Live view of camera ${cam.id}`;
  img.src = streamUrl(cam.id);
  // A stream that ends (viewer restart, network) is reopened after a pause.
  img.addEventListener("error", () => setTimeout(() => { if (tiles.has(cam.id)) img.src = streamUrl(cam.id); }, 2000));
  el.addEventListener("click", (ev) => { if (!ev.target.closest(".remove")) openFocus(cam.id); });
  el.addEventListener("keydown", (ev) => { if (ev.key === "Enter") openFocus(cam.id); });
  el.querySelector(".remove").addEventListener("click", async (ev) => {
    ev.stopPropagation();
    if (!confirm(`Remove camera ${cam.id}? Its capture process is stopped.`)) return;
    const r = await fetch(`/api/cameras/${encodeURIComponent(cam.id)}`, { method: "DELETE" });
    if (r.ok) removeTile(cam.id);
  });
  wall.appendChild(el);
  const tile = { el, img, status: null };
  tiles.set(cam.id, tile);
  return tile;
}

function removeTile(id) {
  const tile = tiles.get(id);
  if (!tile) return;
  tile.img.src = ""; // closes the MJPEG connection at once
  tile.el.remove();
  tiles.delete(id);
  if (focused === id) closeFocus();
  layoutWall();
}

function layoutWall() {
  const n = tiles.size;
  wall.dataset.count = String(n);
  wall.style.setProperty("--cols", String(columnsFor(n)));
  $("empty").hidden = n > 0;
}

function updateTile(tile, cam) {
  const status = cam.status || "no_signal";
  if (tile.status !== status) {
    tile.el.classList.remove("live", "no_signal", "reconnecting");
    tile.el.classList.add(status);
    tile.el.dataset.status = status;
    const badge = tile.el.querySelector(".status");
    badge.className = `status ${status}`;
    badge.textContent = STATUS_TEXT[status] || status;
    tile.status = status;
  }
  tile.el.querySelector(".fps").textContent = `${fmt(cam.fps, 1)} fps`;
  tile.el.querySelector(".lat").textContent = cam.inference ? `${fmt(cam.latency_ms)} ms` : "– ms";
  // In the tile's head, where it is seen whatever the size of the screen (not over the picture).
  tile.el.querySelector(".note").hidden = !(status === "live" && !cam.inference);
  setCounts(cam.id, cam.counts || {});
}

// Faces in view per camera: from every result message (so the panel keeps up with the picture)
// and from the stats once a second (which zero them when results stop coming). Counts are keyed by
// label: "faces", each class of the model (in its order), "uncertain", "no_model".
const counts = new Map();
function setCounts(id, c) {
  counts.set(id, c);
  const tile = tiles.get(id);
  if (tile) {
    const n = c.faces || 0;
    const parts = Object.entries(c).filter(([k, v]) => k !== "faces" && v)
      .map(([k, v]) => `${v} ${k === "no_model" ? "no model" : k}`);
    tile.el.querySelector(".faces").textContent =
      `${n} face${n === 1 ? "" : "s"}` + (parts.length ? ` · ${parts.join(", ")}` : "");
  }
  renderTotals();
}

// One row per class of the model, in the model's order, in the colour its boxes are drawn in.
let classRows = "";
function renderClassRows(classes) {
  const key = JSON.stringify(classes);
  if (key === classRows) return;
  classRows = key;
  const box = document.querySelector(".counts");
  box.querySelectorAll(".count.cls").forEach((el) => el.remove());
  const uncertain = box.querySelector(".count.uncertain");
  for (const c of classes) {
    const row = document.createElement("div");
    row.className = "count cls";
    row.dataset.class = c.name;
    row.style.borderLeftColor = c.colour;
    const n = document.createElement("span");
    n.className = "n";
    const k = document.createElement("span");
    k.className = "k";
    const swatch = document.createElement("i");
    swatch.className = "sw";
    swatch.style.background = c.colour;
    k.append(swatch, c.name); // textContent: a class name is the model's, never markup
    row.append(n, k);
    box.insertBefore(row, uncertain);
  }
  renderTotals();
}

function renderTotals() {
  const rows = [...document.querySelectorAll(".count.cls")];
  const t = new Map([["faces", 0], ["uncertain", 0], ...rows.map((r) => [r.dataset.class, 0])]);
  for (const [id, c] of counts) {
    if (!tiles.has(id)) continue;
    for (const k of t.keys()) t.set(k, t.get(k) + (c[k] || 0));
  }
  $("c-faces").textContent = t.get("faces");
  $("c-uncertain").textContent = t.get("uncertain");
  for (const row of rows) row.querySelector(".n").textContent = t.get(row.dataset.class);
}

function applyCameras(cameras) {
  const seen = new Set();
  for (const cam of cameras) {
    seen.add(cam.id);
    const tile = tiles.get(cam.id) || makeTile(cam);
    updateTile(tile, cam);
  }
  for (const id of [...tiles.keys()]) if (!seen.has(id)) { removeTile(id); counts.delete(id); }
  renderTotals();
  layoutWall();
  if (focused) {
    const cam = cameras.find((c) => c.id === focused);
    // Fps and latency are in the picture's own heads-up line: not a second, older copy here.
    if (cam) $("focus-title").textContent = `${cam.id} · ${STATUS_TEXT[cam.status] || cam.status}` + (cam.status === "live" && !cam.inference ? " · no inference" : "");
  }
}

function applyStats(s) {
  lastStats = s;
  applyCameras(s.cameras || []);
  const redis = $("redis-pill");
  redis.textContent = s.redis === "ok" ? "redis ok" : "reconnecting to redis…";
  redis.className = `pill ${s.redis === "ok" ? "pill-ok" : "pill-warn"}`;
  // Without Redis the figures are the last ones known: keep them, but show they are stale.
  const stale = s.redis !== "ok";
  document.body.classList.toggle("stale", stale);
  $("workers-pill").textContent = stale ? "workers ?" : `${s.workers} worker${s.workers === 1 ? "" : "s"}`;
  $("workers-pill").className = `pill ${s.workers > 0 && !stale ? "pill-ok" : "pill-warn"}`;
  $("model-pill").textContent = s.model ? `model ${s.model.name} ${s.model.version}` : "no model";
  $("blur-pill").hidden = !s.blur;
  $("thr").textContent = `${Math.round((s.uncertain_threshold || 0) * 100)}%`;
  renderClassRows(s.classes || []);
  renderStages(s.stages_ms || {});
  renderWorkers(s.worker_list || []);
  renderEvents(s.refused || []);
}

function renderStages(stages) {
  const order = ["queue", "detect", "classify", "publish", "total"];
  const max = Math.max(1, ...order.map((k) => stages[k] || 0));
  const box = $("stages");
  box.replaceChildren();
  if (!Object.keys(stages).length) { box.innerHTML = '<span class="muted">no results yet</span>'; return; }
  for (const k of order) {
    const row = document.createElement("div");
    row.className = `stage ${k}`;
    const v = stages[k] || 0;
    row.innerHTML = `<span></span><span class="bar"><i></i></span><span class="v"></span>`;
    row.children[0].textContent = k;
    row.querySelector("i").style.width = `${Math.min(100, (100 * Math.max(0, v)) / max)}%`;
    row.children[2].textContent = fmt(v, 1);
    box.appendChild(row);
  }
}

function renderWorkers(list) {
  const ul = $("workers");
  ul.replaceChildren();
  if (!list.length) { ul.innerHTML = '<li class="muted">none: frames are shown without inference</li>'; return; }
  for (const w of list) {
    const li = document.createElement("li");
    li.textContent = `${w.name} · ${w.model || "no model"} · ${w.processed} frames`;
    ul.appendChild(li);
  }
}

function renderEvents(events) {
  const ul = $("events");
  ul.replaceChildren();
  if (!events.length) { ul.innerHTML = '<li class="muted">no refused models</li>'; return; }
  for (const e of events.slice().reverse()) {
    const li = document.createElement("li");
    li.textContent = `${new Date(e.at * 1000).toLocaleTimeString()} ${e.source}: ${e.message}`;
    ul.appendChild(li);
  }
}

function openFocus(id) {
  focused = id;
  $("focus-img").src = streamUrl(id);
  $("focus-img").alt = `Live view of camera ${id}`;
  $("focus-title").textContent = id;
  $("focus").hidden = false;
}
function closeFocus() {
  focused = null;
  $("focus-img").src = "";
  $("focus").hidden = true;
}
$("focus-close").addEventListener("click", closeFocus);
$("focus").addEventListener("click", (ev) => { if (ev.target.id === "focus") closeFocus(); });
document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeFocus(); });

$("add-toggle").addEventListener("click", () => {
  const form = $("add-form");
  form.hidden = !form.hidden;
  $("add-toggle").setAttribute("aria-expanded", String(!form.hidden));
});
$("add-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const data = new FormData(ev.target);
  const body = { source: data.get("source") };
  if (data.get("camera_id")) body.camera_id = data.get("camera_id");
  const r = await fetch("/api/cameras", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const j = await r.json().catch(() => ({}));
  $("add-msg").textContent = r.ok ? `requested ${j.camera_id}; it appears when it starts` : `error: ${typeof j.detail === "string" ? j.detail : r.status}`;
});

function connect(delay = 500) {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.onopen = () => { wsAlive = true; delay = 500; };
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    if (m.type === "stats") applyStats(m);
    else if (m.type === "cameras") applyCameras(m.cameras);
    else if (m.type === "result" && tiles.has(m.camera)) setCounts(m.camera, m.counts || {});
  };
  ws.onclose = () => {
    wsAlive = false;
    document.body.classList.add("stale");
    const pill = $("redis-pill");
    pill.textContent = "viewer unreachable, retrying…";
    pill.className = "pill pill-warn";
    setTimeout(() => connect(Math.min(delay * 2, 5000)), delay);
  };
}

// Fallback while the WebSocket is down (e.g. a proxy that does not pass WebSockets).
setInterval(async () => {
  if (wsAlive) return;
  try {
    const r = await fetch("/api/cameras", { cache: "no-store" });
    if (r.ok) applyCameras(await r.json());
  } catch (_) { /* viewer down: the pill already says so */ }
}, 2000);

connect();
layoutWall();
