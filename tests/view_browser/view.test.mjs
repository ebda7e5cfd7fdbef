// Headless Chromium (Debian's, driven by playwright-core) against `gtar-logd
// view` of a real Keras run. Run by run.sh, which starts the daemon and the
// view and writes the numpy expectations; environment:
//   VIEW_URL       the URL the view printed (with its token)
//   EXPECT         keras_run.py's JSON (numpy on GetFrame's arrays)
//   ARCHIVE        the archive's name
//   LIVE_CMD       a shell command writing one more frame (prints "start", "done")
//   SHOTS          directory for the README screenshots (docs/)
//   OFFLINE_URL, OFFLINE_EXPECT   a view of a libgetar-written archive, no daemon
import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import { readFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import assert from "node:assert/strict";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set (run tests/view_browser/run.sh)`);
  return v;
};
const URL_ = env("VIEW_URL");
const EXPECT = JSON.parse(readFileSync(env("EXPECT"), "utf8"));
const ARCHIVE = env("ARCHIVE");
const origin = new URL(URL_).origin;
const token = new URL(URL_).searchParams.get("token");

function close(got, want, what) {
  if (want == null) { assert.ok(got == null, `${what}: expected none, the page shows ${got}`); return; }
  assert.ok(typeof got === "number", `${what}: the page shows ${got}`);
  const tol = 1e-9 * Math.max(Math.abs(want), 1e-300) + 1e-12;
  assert.ok(Math.abs(got - want) <= tol, `${what}: numpy says ${want}, the page shows ${got}`);
}

async function waitFor(what, ms, fn) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

// A screenshot of the whole page, no taller than its content.
async function shot(page, file) {
  const vp = page.viewportSize();
  await page.setViewportSize({ width: vp.width, height: 200 });
  await page.screenshot({ path: join(process.env.SHOTS || ".", file), fullPage: true });
  await page.setViewportSize(vp);
}

let checks = 0;
const ok = (what) => { checks++; console.log("ok -", what); };

// 401 without the token, for the page and its data (no browser: plain fetch).
for (const p of ["/", "/api/archives", `/api/archive?name=${encodeURIComponent(ARCHIVE)}`, "/assets/app.js"]) {
  const r = await fetch(origin + p);
  assert.equal(r.status, 401, `${p} without the token`);
  const w = await fetch(origin + p + (p.includes("?") ? "&" : "?") + "token=x" + token.slice(1));
  assert.equal(w.status, 401, `${p} with a wrong token`);
}
ok("401 without the token (page, data, assets)");

const profile = mkdtempSync(join(tmpdir(), "gtar-view-chromium-"));
// A fresh profile (--user-data-dir, which playwright passes for a persistent context).
const ctx = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  viewport: { width: 1360, height: 1000 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await ctx.newPage();
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
try {
  // Archives page.
  await page.goto(URL_);
  await page.waitForSelector(`#archives tr[data-name="${ARCHIVE}"]`, { timeout: 15000 });
  const frames = await page.$eval(`#archives tr[data-name="${ARCHIVE}"] td:nth-child(3)`, (td) => td.textContent);
  assert.equal(Number(frames), EXPECT.frames.length);
  ok(`archives page lists ${ARCHIVE} with ${frames} frames`);

  // The archive page: one loss point per epoch, the stored values.
  await page.goto(`${origin}/#/a/${encodeURIComponent(ARCHIVE)}`);
  await page.waitForFunction(() => window.gtarView.charts["metrics/epoch"], null, { timeout: 15000 });
  const loss = await page.evaluate(() => {
    const u = window.gtarView.charts["metrics/epoch"];
    const k = u.series.findIndex((s) => s.label === "loss");
    return { xs: u.data[0], ys: u.data[k] };
  });
  assert.deepEqual(loss.xs, EXPECT.loss.steps.map(Number), "one loss point per epoch");
  EXPECT.loss.values.forEach((v, i) => close(loss.ys[i], v, `loss at epoch ${EXPECT.loss.steps[i]}`));
  ok(`loss curve: ${loss.xs.length} points, one per epoch, equal to the stored values`);
  const boxes = await page.$$eval("#timeline a", (a) => a.length);
  assert.equal(boxes, EXPECT.frames.length);
  await shot(page, "view-archive.png");

  // A tensor page per tensor: L2 norm, update ratio and percentiles as shown
  // in the page's table equal numpy's on GetFrame's arrays.
  const ids = Object.keys(EXPECT.tensors);
  assert.ok(ids.length >= 6, `the model's weights: ${ids}`);
  for (const id of ids) {
    const e = EXPECT.tensors[id];
    await page.goto(`${origin}/#/t/${encodeURIComponent(ARCHIVE)}/${id.split("/").map(encodeURIComponent).join("/")}`);
    await page.waitForSelector("#stats tbody tr", { state: "attached", timeout: 60000 });
    const rows = await page.$$eval("#stats tbody tr", (trs) => trs.map((tr) => ({
      frame: tr.dataset.frame,
      v: [...tr.querySelectorAll("td[data-value]")].map((td) => (td.dataset.value === "" ? null : Number(td.dataset.value))),
    })));
    assert.deepEqual(rows.map((r) => r.frame), e.frames, `${id}: every frame`);
    rows.forEach((r, i) => {
      const f = e.frames[i];
      close(r.v[4], e.l2[i], `${id} frame ${f} L2 norm`);
      close(r.v[5], e.update_ratio[i], `${id} frame ${f} update ratio`);
      e.percentiles[i].forEach((p, k) => close(r.v[11 + k], p, `${id} frame ${f} percentile #${k}`));
    });
    if (id === "keras/layer/0/weight/0/weight") {
      await shot(page, "view-tensor.png");
    }
  }
  ok(`norm, update ratio and 9 percentiles of ${ids.length} tensors × ${EXPECT.frames.length} frames equal numpy's (method 'linear')`);

  await page.goto(`${origin}/#/l/${encodeURIComponent(ARCHIVE)}`);
  await page.waitForSelector("canvas.heat", { timeout: 30000 });
  const lay = await page.evaluate(() => window.gtarView.data.layers);
  for (const id of ids) {
    const r = lay.tensors.findIndex((t) => t.id === id);
    assert.ok(r >= 0, `${id} in the layer overview`);
    EXPECT.tensors[id].update_ratio.forEach((v, j) => close(lay.update_ratio[r][j], v, `layers: ${id} frame ${j}`));
  }
  await shot(page, "view-layers.png");
  ok("layer overview: every tensor's update ratio");

  // Frame page: tensors with .npy links, and a diff.
  const last = EXPECT.frames[EXPECT.frames.length - 1];
  await page.goto(`${origin}/#/f/${encodeURIComponent(ARCHIVE)}/${encodeURIComponent(last)}`);
  await page.waitForSelector("#diff table", { timeout: 30000 });
  const npy = await page.$$eval("table.tensors a[download]", (a) => a.map((x) => x.href));
  assert.ok(npy.length >= ids.length);
  const body = await page.evaluate(async (u) => new Uint8Array(await (await fetch(u)).arrayBuffer()).slice(0, 6), npy[0]);
  assert.deepEqual([...Object.values(body)], [0x93, 78, 85, 77, 80, 89], ".npy magic");
  ok("frame page: tensors, .npy download, diff");

  // Live: a frame written while the page is open appears within 2 s.
  await page.goto(`${origin}/#/a/${encodeURIComponent(ARCHIVE)}`);
  await page.waitForSelector("#timeline a");
  const before = await page.$$eval("#timeline a", (a) => a.length);
  const writer = spawn("sh", ["-c", env("LIVE_CMD")], { stdio: ["ignore", "pipe", "inherit"] });
  let started = null;
  const finished = new Promise((res, rej) => {
    let buf = "";
    writer.stdout.on("data", (d) => {
      buf += d;
      if (started == null && buf.includes("start")) started = Date.now();
    });
    writer.on("exit", (c) => (c === 0 ? res() : rej(new Error(`live writer exited ${c}`))));
  });
  await waitFor("the writer to start", 60000, () => started != null);
  await waitFor("the new frame on the open page", 2000 + 3000, async () =>
    (await page.$$eval("#timeline a", (a) => a.length)) > before);
  const took = Date.now() - started;
  await finished;
  assert.ok(took <= 2000, `the new frame appeared ${took} ms after the write began (limit 2000)`);
  ok(`a frame written while the page is open appeared after ${took} ms (without a reload)`);
  assert.deepEqual(errors, [], "no errors in the page");
} finally {
  await ctx.close();
  rmSync(profile, { recursive: true, force: true });
}

// Offline: a libgetar-written archive, no daemon.
if (process.env.OFFLINE_URL) {
  const u = new URL(process.env.OFFLINE_URL);
  const t = u.searchParams.get("token");
  const E = JSON.parse(readFileSync(env("OFFLINE_EXPECT"), "utf8"));
  const get = async (p) => {
    const r = await fetch(u.origin + p + (p.includes("?") ? "&" : "?") + "token=" + t);
    assert.equal(r.status, 200, p);
    return r.json();
  };
  assert.equal((await fetch(u.origin + "/api/archives")).status, 401);
  const list = await get("/api/archives");
  assert.equal(list.archives.length, 1);
  const a = list.archives[0];
  assert.equal(a.frames, E.frames.length);
  const d = await get(`/api/tensor?name=${encodeURIComponent(a.name)}&id=${encodeURIComponent(E.id)}`);
  assert.deepEqual(d.frames, E.frames);
  assert.deepEqual(d.shape, [6, 5], "shape from keras_gtar's shape record");
  d.stats.forEach((s, i) => {
    close(s.l2, E.l2[i], `libgetar frame ${i} L2`);
    close(s.update_ratio, E.update_ratio[i], `libgetar frame ${i} update ratio`);
    E.percentiles[i].forEach((p, k) => close(s.percentiles[k], p, `libgetar frame ${i} percentile #${k}`));
    assert.deepEqual(s.hist, E.hist[i], `libgetar frame ${i}: the histogram is np.histogram(a, bins=64)`);
  });
  ok(`offline view of a libgetar-written archive (no daemon): ${E.frames.length} frames, statistics and histograms equal numpy's`);
}
console.log(`all ${checks} checks passed`);
