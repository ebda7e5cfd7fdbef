// gtar-logd view: plain JavaScript over the JSON of /api/..., drawn with uPlot.
//
// Every number comes from the server, exact, for every frame. Only drawing
// downsamples (evenly spaced, always keeping the first, last and best frame);
// zooming a chart (drag across it) redraws every frame in the range.
// The page polls every second, so new frames and metric points appear
// without a reload. `window.gtarView` holds what the page shows (its data and
// charts), for tests and for the curious at the console.
"use strict";

const MAX_POINTS = 1500;   // points a curve draws before downsampling
const POLL_MS = 1000;
const view = (window.gtarView = { page: null, data: {}, charts: {}, updates: 0 });
const $ = (sel, el) => (el || document).querySelector(sel);

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const k of kids.flat()) if (k != null) el.append(k instanceof Node ? k : String(k));
  return el;
}

async function api(path, params) {
  const q = new URLSearchParams(params || {}).toString();
  const r = await fetch("api/" + path + (q ? "?" + q : ""), { credentials: "same-origin", cache: "no-store" });
  const body = await r.json().catch(() => ({ error: r.status + " " + r.statusText }));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

const fmtBytes = (n) => {
  if (n == null) return "";
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : n) + " " + u[i];
};
const fmt = (x) => (x == null ? "–" : typeof x !== "number" ? String(x) :
  x === 0 ? "0" : Math.abs(x) >= 1e5 || Math.abs(x) < 1e-3 ? x.toExponential(4) : x.toPrecision(6));
const fmtTime = (s) => (s == null ? "" : new Date(s * 1000).toLocaleString());
const enc = encodeURIComponent;

// ---------------------------------------------------------------- routing

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const [kind, name, arg] = parts;
  stopPolling();
  view.charts = {};
  if (kind === "a" && name) return archivePage(name);
  if (kind === "t" && name) return tensorPage(name, parts.slice(2).join("/"));
  if (kind === "l" && name) return layersPage(name);
  if (kind === "f" && name) return framePage(name, arg);
  return archivesPage();
}
window.addEventListener("hashchange", route);

let pollTimer = null;
function poll(fn) {
  stopPolling();
  const tick = async () => {
    try { await fn(); setStatus(true); } catch (e) { setStatus(false, e); }
    pollTimer = setTimeout(tick, POLL_MS);
  };
  pollTimer = setTimeout(tick, POLL_MS);
}
function stopPolling() { if (pollTimer) clearTimeout(pollTimer); pollTimer = null; }
function setStatus(ok, e) {
  const s = $("#status");
  s.className = ok ? "live" : "";
  s.textContent = ok ? "live" : "offline: " + (e && e.message);
}

function crumbs(...items) {
  const c = $("#crumbs");
  c.replaceChildren(...items.flatMap((it, i) => [i ? " / " : "", it]));
}
function show(...kids) { $("#main").replaceChildren(...kids); }
function fail(e) { show(h("p", { class: "err" }, String(e.message || e))); }

// ---------------------------------------------------------------- helpers

// Indices to draw among n points: every one when few, else evenly spaced,
// always with the first, the last and those in `keep`.
function pick(n, keep) {
  if (n <= MAX_POINTS) return [...Array(n).keys()];
  const s = new Set([0, n - 1, ...keep.filter((i) => i >= 0 && i < n)]);
  for (let k = 0; k < MAX_POINTS; k++) s.add(Math.round((k * (n - 1)) / (MAX_POINTS - 1)));
  return [...s].sort((a, b) => a - b);
}

// x positions of frame indices: their numbers when all are integers, else
// their positions.
function xsOf(frames) {
  const nums = frames.map(Number);
  return nums.every((x) => Number.isFinite(x)) ? nums : frames.map((_, i) => i);
}

// A uPlot chart of series over xs, zoomable (drag), downsampled for drawing
// only: `columns` are full-length arrays; zooming redraws every point in range.
function chart(el, title, xs, columns, opts) {
  opts = opts || {};
  const keep = opts.keep || [];
  const box = h("div", { class: "chart" }, h("h3", {}, title));
  el.append(box);
  const build = (lo, hi) => {
    const inRange = [];
    for (let i = 0; i < xs.length; i++) if ((lo == null || xs[i] >= lo) && (hi == null || xs[i] <= hi)) inRange.push(i);
    const sel = pick(inRange.length, keep.map((k) => inRange.indexOf(k))).map((j) => inRange[j]);
    return [sel.map((i) => xs[i]), ...columns.map((c) => sel.map((i) => (c.values[i] == null ? null : c.values[i])))];
  };
  const series = [{ label: opts.xLabel || "frame" }, ...columns.map((c) => ({
    label: c.label, stroke: c.color, width: c.width || 1.5, fill: c.fill,
    points: { show: xs.length < 60 }, spanGaps: false,
  }))];
  const u = new uPlot({
    width: Math.min(680, Math.max(480, el.clientWidth / 2 - 24 || 640)), height: opts.height || 220,
    series, bands: opts.bands,
    scales: { x: { time: false }, y: opts.log ? { distr: 3 } : {} },
    axes: [{}, { size: 70 }],
    cursor: { drag: { x: true, y: false, setScale: false } },
    hooks: {
      setSelect: [(u) => {
        if (u.select.width < 3) return;
        const lo = u.posToVal(u.select.left, "x"), hi = u.posToVal(u.select.left + u.select.width, "x");
        u.setData(build(lo, hi));
        u.setSelect({ width: 0, height: 0 }, false);
        reset.disabled = false;
      }],
      draw: [(u) => {
        if (opts.marker == null) return;
        const x = Math.round(u.valToPos(opts.marker, "x", true));
        const ctx = u.ctx;
        ctx.save(); ctx.strokeStyle = "#e0a100"; ctx.lineWidth = 2; ctx.setLineDash([5, 4]);
        ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke(); ctx.restore();
      }],
    },
  }, build(), box);
  const reset = h("button", { disabled: "", onclick: () => { u.setData(build()); reset.disabled = true; } }, "show all frames");
  box.append(h("div", { class: "controls" }, reset, h("span", { class: "legend" }, "drag across the chart to zoom to a step range")));
  u.fullData = { xs, columns };
  view.charts[opts.key || title] = u;
  return u;
}

// Colours of a sequential scale (viridis, 9 stops), t in [0, 1].
const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
function colour(t) {
  t = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - i, a = VIRIDIS[i], b = VIRIDIS[i + 1];
  return [0, 1, 2].map((k) => Math.round(a[k] + (b[k] - a[k]) * f));
}

// A heatmap: cells[row][col] in [0,1] or null (grey); one pixel block a cell.
function heatmap(el, rows, cols, cell, opts) {
  const cw = Math.max(1, Math.min(48, Math.floor((opts.width || 900) / Math.max(1, cols))));
  const rh = opts.rowHeight || 4;
  const c = h("canvas", { class: "heat", width: cols * cw, height: rows * rh });
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(cols * cw, rows * rh);
  for (let r = 0; r < rows; r++) for (let k = 0; k < cols; k++) {
    const v = cell(r, k);
    const rgb = v == null ? [225, 228, 234] : colour(v);
    for (let y = r * rh; y < (r + 1) * rh; y++) for (let x = k * cw; x < (k + 1) * cw; x++) {
      const o = (y * cols * cw + x) * 4;
      img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
  el.append(c);
  return c;
}

// ------------------------------------------------------------ archives page

async function archivesPage() {
  crumbs();
  view.page = "archives";
  const draw = async () => {
    const d = await api("archives");
    view.data.archives = d;
    const rows = d.archives.map((a) => h("tr", { "data-name": a.name },
      h("td", {}, h("a", { href: "#/a/" + enc(a.name) }, a.name), a.error ? h("div", { class: "err" }, a.error) : null),
      h("td", { class: "num" }, fmtBytes(a.size)),
      h("td", { class: "num" }, a.frames),
      h("td", { class: "num" }, a.first ?? ""),
      h("td", { class: "num" }, a.last ?? ""),
      h("td", {}, a.live ? h("span", { class: "pill live" }, "live") : h("span", { class: "pill" }, "closed")),
      h("td", {}, fmtTime(a.last_write)),
      h("td", {}, a.replication ? replicationText(a.replication) : h("span", { class: "muted" }, "local"))));
    show(h("h1", {}, "Archives"),
      d.archives.length ? h("table", { id: "archives" },
        h("thead", {}, h("tr", {}, ["archive", "size", "frames", "first", "last", "state", "last write", "replication"].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows)) : h("p", { class: "muted" }, "No archives yet."));
  };
  try { await draw(); poll(draw); } catch (e) { fail(e); }
}

function replicationText(r) {
  const caught = r.replicated_bytes >= r.durable_bytes;
  return h("span", { title: r.remote + (r.error ? "\n" + r.error : "") },
    caught ? "replicated" : (r.lagging ? "lagging " : "replicating ") + fmtBytes(r.durable_bytes - r.replicated_bytes),
    r.error ? h("span", { class: "err" }, " error") : null);
}

// ------------------------------------------------------------- archive page

async function archivePage(name) {
  view.page = "archive";
  crumbs(h("a", { href: "#/a/" + enc(name) }, name));
  let last = "";
  const draw = async () => {
    const d = await api("archive", { name });
    const sig = JSON.stringify([d.frames.length, d.frames[d.frames.length - 1], d.states, d.metrics.map((m) => m.steps.length), d.best]);
    if (sig === last) return;
    last = sig;
    view.data.archive = d;
    view.updates++;
    renderArchive(name, d);
  };
  try { await draw(); poll(draw); } catch (e) { fail(e); }
}

// A frame's state as the source tells it: each of durable and replicated is
// true, false or null (the source cannot know).
function frameState(s) {
  if (!s) return { cls: "unknown", text: "received" };
  const parts = ["received"];
  if (s.durable === true) parts.push("durable");
  else if (s.durable === false) parts.push("not yet durable");
  else parts.push("durability unknown");
  if (s.replicated === true) parts.push("replicated");
  else if (s.replicated === false) parts.push("not yet replicated");
  const cls = s.replicated === true ? "replicated" : s.durable === true ? "durable" : s.durable === false ? "received" : "unknown";
  return { cls, text: parts.join(", ") };
}

function renderArchive(name, d) {
  const a = d.archive;
  const bestFrame = d.best && d.best.frame != null ? String(d.best.frame) : null;
  const main = [h("h1", {}, name),
    h("p", {}, `${a.frames} frames (${a.first ?? "–"} … ${a.last ?? "–"}), ${fmtBytes(a.size)}, `,
      a.live ? h("span", { class: "pill live" }, "live") : h("span", { class: "pill" }, "closed"),
      bestFrame != null ? h("span", {}, `, best frame ${bestFrame} (${d.best.monitor} ${d.best.mode} = ${fmt(d.best.value)})`) : null,
      " · ", h("a", { href: "#/l/" + enc(name) }, "layer overview")),
    h("p", { class: "muted" }, "groups: " + (a.groups.join(", ") || "–")),
    h("h2", {}, "Frames"),
    h("div", { class: "timeline", id: "timeline" }, d.frames.map((f, i) => {
      const st = frameState(d.states && d.states[i]);
      return h("a", {
        href: "#/f/" + enc(name) + "/" + enc(f), class: "s-" + st.cls + (f === bestFrame ? " best" : ""),
        title: `frame ${f}: ${st.text}${f === bestFrame ? " (best)" : ""}`, "data-frame": f, "data-state": st.cls,
      });
    })),
    h("p", { class: "legend" },
      h("span", { class: "key s-received" }), " received (committed, not yet durable) ",
      h("span", { class: "key s-durable" }), " durable ",
      h("span", { class: "key s-replicated" }), " replicated ",
      h("span", { class: "key s-unknown" }), " state unknown; outlined: the best frame recorded. Click a frame for its tensors."),
    h("p", { class: "legend" }, d.states_note || "")];
  const charts = h("div", { class: "grid", id: "metrics" });
  // One chart per metric group (epoch, batch, …), every metric in it.
  const groups = {};
  for (const m of d.metrics) (groups[m.group] = groups[m.group] || []).push(m);
  const palette = ["#2f6fd6", "#d6452f", "#1a9c4a", "#8a3fd6", "#e0a100", "#0aa3b5", "#b5357c"];
  main.push(h("h2", {}, "Metrics"), Object.keys(groups).length ? charts : h("p", { class: "muted" }, "No metrics stored."));
  main.push(h("h2", {}, "Tensors (last frame)"), tensorTable(name, d.tensors, d.frames[d.frames.length - 1]));
  show(...main);
  for (const [g, ms] of Object.entries(groups)) {
    // The union of steps, in GETAR order as stored.
    const steps = [];
    const seen = new Set();
    for (const m of ms) for (const s of m.steps) if (!seen.has(s)) { seen.add(s); steps.push(s); }
    const xs = xsOf(steps);
    const order = [...steps.keys()].sort((i, j) => xs[i] - xs[j]);
    const sx = order.map((i) => xs[i]);
    const cols = ms.map((m, k) => {
      const at = new Map(m.steps.map((s, i) => [s, m.values[i]]));
      return { label: m.name, color: palette[k % palette.length], values: order.map((i) => at.has(steps[i]) ? at.get(steps[i]) : null) };
    });
    const isEpoch = /(^|\/)epoch$/.test(g);
    const bestX = isEpoch && bestFrame != null && d.best.epoch != null ? Number(d.best.epoch) : null;
    const keep = bestX != null ? [sx.indexOf(bestX)] : [];
    chart(charts, g, sx, cols, { key: g, xLabel: isEpoch ? "epoch" : "step", marker: bestX, keep });
  }
}

function tensorTable(name, tensors, frame) {
  return h("table", { class: "tensors" },
    h("thead", {}, h("tr", {}, ["tensor", "dtype", "shape", "bytes", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, tensors.map((t) => h("tr", { "data-id": t.id },
      h("td", { title: t.id }, h("a", { href: "#/t/" + enc(name) + "/" + t.id.split("/").map(enc).join("/") }, t.label)),
      h("td", {}, t.dtype), h("td", {}, "(" + t.shape.join(", ") + ")"),
      h("td", { class: "num" }, fmtBytes(t.size)),
      h("td", {}, frame != null ? h("a", { href: "api/npy?" + new URLSearchParams({ name, frame, id: t.id }), download: "" }, ".npy") : null)))));
}

// -------------------------------------------------------------- tensor page

async function tensorPage(name, id) {
  view.page = "tensor";
  crumbs(h("a", { href: "#/a/" + enc(name) }, name), h("span", {}, id));
  show(h("p", { class: "muted" }, "Computing statistics of every frame (once: they are kept)…"));
  let last = "";
  const draw = async () => {
    const d = await api("tensor", { name, id });
    const sig = d.frames.length + ":" + d.frames[d.frames.length - 1];
    if (sig === last) return;
    last = sig;
    view.data.tensor = d;
    view.updates++;
    renderTensor(name, d);
  };
  try { await draw(); poll(draw); } catch (e) { fail(e); }
}

function renderTensor(name, d) {
  const xs = xsOf(d.frames);
  const S = d.stats;
  const col = (f) => S.map(f);
  const P = (k) => col((s) => (s.percentiles.length ? s.percentiles[k] : null));
  const grid = h("div", { class: "grid" });
  const heat = h("div", { id: "heatmap" });
  const tbl = h("details", {}, h("summary", {}, `every frame's values (${d.frames.length} frames)`), statsTable(d));
  show(h("h1", {}, d.label || d.id),
    h("p", { class: "muted" }, `${d.id} · ${d.dtype} (${d.shape.join(", ")}) · ${d.frames.length} frames`),
    grid, h("h2", {}, "Distribution: frame × value histogram"), heat, tbl);
  const blues = ["#c6dbef", "#9ecae1", "#6baed6", "#3182bd"];
  chart(grid, "percentiles 0, 7, 16, 31, 50, 69, 84, 93, 100", xs,
    [0, 1, 2, 3, 4, 5, 6, 7, 8].map((k) => ({ label: "p" + [0, 7, 16, 31, 50, 69, 84, 93, 100][k], color: k === 4 ? "#08306b" : blues[Math.min(k, 8 - k)], width: k === 4 ? 2 : 1, values: P(k) })),
    { key: "percentiles", bands: [[8, 0], [7, 1], [6, 2], [5, 3]].map(([a, b], i) => ({ series: [a + 1, b + 1], fill: `rgba(49,130,189,${0.08 + 0.06 * i})` })) });
  chart(grid, "L2 norm", xs, [{ label: "‖W‖", color: "#2f6fd6", values: col((s) => s.l2) }], { key: "l2" });
  chart(grid, "update ratio ‖Wₜ − Wₜ₋₁‖ / ‖Wₜ‖", xs, [{ label: "update ratio", color: "#d6452f", values: col((s) => s.update_ratio) }], { key: "update_ratio" });
  chart(grid, "cosine to the previous and the first frame", xs, [
    { label: "cos(prev)", color: "#1a9c4a", values: col((s) => s.cos_prev) },
    { label: "cos(first)", color: "#8a3fd6", values: col((s) => s.cos_first) }], { key: "cosine" });
  chart(grid, "min, max, mean ± std", xs, [
    { label: "min", color: "#6baed6", values: col((s) => s.min) },
    { label: "max", color: "#08519c", values: col((s) => s.max) },
    { label: "mean", color: "#d6452f", values: col((s) => s.mean) },
    { label: "mean−std", color: "#f4a582", values: col((s) => (s.mean == null ? null : s.mean - s.std)) },
    { label: "mean+std", color: "#f4a582", values: col((s) => (s.mean == null ? null : s.mean + s.std)) }], { key: "moments" });
  chart(grid, "zeros (fraction), NaN and Inf (counts)", xs, [
    { label: "zeros", color: "#555", values: col((s) => s.zeros) },
    { label: "NaN", color: "#b3261e", values: col((s) => s.nan) },
    { label: "Inf", color: "#e0a100", values: col((s) => s.pos_inf + s.neg_inf) }], { key: "zeros" });
  drawHistogramHeatmap(heat, d);
}

// Every frame's 64-bin histogram re-binned onto one value axis (the range of
// all frames), its counts spread over the overlap; colour: log(1 + count).
function drawHistogramHeatmap(el, d) {
  const S = d.stats.filter((s) => s.hist_range);
  if (!S.length) { el.append(h("p", { class: "muted" }, "no finite values")); return; }
  const lo = Math.min(...S.map((s) => s.hist_range[0])), hi = Math.max(...S.map((s) => s.hist_range[1]));
  const rows = 80;
  const n = d.stats.length;
  const cols = pick(n, []);
  const grid = cols.map((i) => {
    const s = d.stats[i];
    const out = new Float64Array(rows);
    if (!s.hist_range) return out;
    const [a, b] = s.hist_range, w = (b - a) / s.hist.length;
    s.hist.forEach((c, k) => {
      if (!c) return;
      const x0 = ((a + k * w - lo) / (hi - lo)) * rows, x1 = ((a + (k + 1) * w - lo) / (hi - lo)) * rows;
      for (let r = Math.max(0, Math.floor(x0)); r < Math.min(rows, Math.ceil(x1)); r++) {
        const ov = Math.min(x1, r + 1) - Math.max(x0, r);
        if (ov > 0) out[r] += (c * ov) / Math.max(x1 - x0, 1e-12);
      }
    });
    return out;
  });
  let mx = 0;
  for (const g of grid) for (const v of g) mx = Math.max(mx, v);
  const wrap = h("div", { class: "heatwrap" });
  el.append(wrap);
  wrap.append(h("div", { class: "heatlabels" }, h("div", {}, fmt(hi)), h("div", { style: `height:${rows * 4 - 36}px` }), h("div", {}, fmt(lo))));
  heatmap(wrap, rows, cols.length, (r, k) => (grid[k][rows - 1 - r] ? Math.log1p(grid[k][rows - 1 - r]) / Math.log1p(mx) : 0), { width: 1100, rowHeight: 4 });
  el.append(h("p", { class: "legend" }, `frames ${d.frames[0]} … ${d.frames[n - 1]} left to right${cols.length < n ? ` (${cols.length} of ${n} drawn)` : ""}; values ${fmt(lo)} … ${fmt(hi)} bottom to top`));
}

function statsTable(d) {
  const ps = [0, 7, 16, 31, 50, 69, 84, 93, 100];
  const head = ["frame", "min", "max", "mean", "std", "L2", "update ratio", "cos prev", "cos first", "zeros", "NaN", "Inf", ...ps.map((p) => "p" + p)];
  return h("table", { id: "stats" }, h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))),
    h("tbody", {}, d.stats.map((s, i) => h("tr", { "data-frame": d.frames[i] },
      h("td", {}, d.frames[i]),
      [s.min, s.max, s.mean, s.std, s.l2, s.update_ratio, s.cos_prev, s.cos_first, s.zeros, s.nan, s.pos_inf + s.neg_inf, ...(s.percentiles.length ? s.percentiles : ps.map(() => null))]
        .map((v) => h("td", { class: "num", "data-value": v == null ? "" : String(v) }, fmt(v)))))));
}

// -------------------------------------------------------------- layers page

async function layersPage(name) {
  view.page = "layers";
  crumbs(h("a", { href: "#/a/" + enc(name) }, name), h("span", {}, "layers"));
  show(h("p", { class: "muted" }, "Computing statistics of every frame (once: they are kept)…"));
  let last = "";
  const draw = async () => {
    const d = await api("layers", { name });
    const sig = d.frames.length + ":" + d.frames[d.frames.length - 1];
    if (sig === last) return;
    last = sig;
    view.data.layers = d;
    view.updates++;
    renderLayers(name, d);
  };
  try { await draw(); poll(draw); } catch (e) { fail(e); }
}

function renderLayers(name, d) {
  const n = d.frames.length;
  const cols = pick(n, []);
  const vals = d.update_ratio.flat().filter((v) => v != null && v > 0);
  const lmin = vals.length ? Math.log10(Math.min(...vals)) : -6, lmax = vals.length ? Math.log10(Math.max(...vals)) : 0;
  const wrap = h("div", { class: "heatwrap" });
  const rh = 16;
  show(h("h1", {}, "Layer overview: update ratio ‖Wₜ − Wₜ₋₁‖ / ‖Wₜ‖"),
    h("p", { class: "muted" }, "One row per tensor, one column per frame; colour: log₁₀ of the update ratio, " +
      `${fmt(10 ** lmin)} (dark) … ${fmt(10 ** lmax)} (bright). Grey: no previous frame, or a zero norm. A dark row is a tensor that stopped learning; a bright one moves fast.`),
    wrap, h("p", { class: "legend" }, `frames ${d.frames[0] ?? ""} … ${d.frames[n - 1] ?? ""} left to right${cols.length < n ? ` (${cols.length} of ${n} drawn)` : ""}`));
  wrap.append(h("div", { class: "heatlabels" }, d.tensors.map((t) =>
    h("div", { style: `height:${rh}px;line-height:${rh}px` }, h("a", { href: "#/t/" + enc(name) + "/" + t.id.split("/").map(enc).join("/"), title: t.id }, t.label)))));
  const c = heatmap(wrap, d.tensors.length, cols.length, (r, k) => {
    const v = d.update_ratio[r][cols[k]];
    return v == null || !(v > 0) ? null : lmax > lmin ? (Math.log10(v) - lmin) / (lmax - lmin) : 0.5;
  }, { width: 900, rowHeight: rh });
  c.title = "click a cell for that tensor";
  c.addEventListener("click", (ev) => {
    const r = Math.floor(ev.offsetY / rh);
    if (d.tensors[r]) location.hash = "#/t/" + enc(name) + "/" + d.tensors[r].id.split("/").map(enc).join("/");
  });
}

// --------------------------------------------------------------- frame page

async function framePage(name, frame) {
  view.page = "frame";
  crumbs(h("a", { href: "#/a/" + enc(name) }, name), h("span", {}, "frame " + frame));
  try {
    const [d, a] = await Promise.all([api("frame", { name, frame }), api("archive", { name })]);
    view.data.frame = d;
    const pos = a.frames.indexOf(frame);
    const other = h("select", { id: "diff-with" }, a.frames.map((f) => {
      const o = h("option", { value: f }, f);
      if (f === a.frames[Math.max(0, pos - 1)]) o.selected = true;
      return o;
    }));
    const out = h("div", { id: "diff" });
    const run = async () => {
      out.replaceChildren(h("p", { class: "muted" }, "comparing…"));
      try {
        const df = await api("diff", { name, a: frame, b: other.value });
        view.data.diff = df;
        out.replaceChildren(h("table", {}, h("thead", {}, h("tr", {}, ["tensor", "‖Δ‖", "max |Δ|", "changed"].map((t) => h("th", {}, t)))),
          h("tbody", {}, df.tensors.map((t) => h("tr", { "data-id": t.id }, h("td", { title: t.id }, t.label),
            h("td", { class: "num" }, fmt(t.diff_l2)), h("td", { class: "num" }, fmt(t.max_abs_diff)),
            h("td", { class: "num" }, t.changed == null ? "–" : (100 * t.changed).toFixed(2) + " %"))))));
      } catch (e) { out.replaceChildren(h("p", { class: "err" }, e.message)); }
    };
    other.addEventListener("change", run);
    show(h("h1", {}, `${name} · frame ${frame}`),
      pos > 0 ? h("a", { href: "#/f/" + enc(name) + "/" + enc(a.frames[pos - 1]) }, "← previous") : null, " ",
      pos >= 0 && pos < a.frames.length - 1 ? h("a", { href: "#/f/" + enc(name) + "/" + enc(a.frames[pos + 1]) }, "next →") : null,
      h("h2", {}, "Tensors"), tensorTable(name, d.tensors, frame),
      h("h2", {}, "Difference"), h("div", { class: "controls" }, `frame ${frame} against frame `, other), out);
    if (a.frames.length > 1) run();
  } catch (e) { fail(e); }
}

// ------------------------------------------------------------------- start

api("info").then((i) => { $("#source").textContent = i.source; }).catch(() => {});
route();
