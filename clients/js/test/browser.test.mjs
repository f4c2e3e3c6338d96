// End to end in real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core): a page served by this test, with its origin in
// server.allowed_origins, runs two browser nodes that exchange a QoS 1 message and a
// topic message through the hub. The screenshot is checked too: it must show the
// received lines (dark text pixels where the DOM has them, none there before).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { Client, Identity } from "../dist/index.js";
import { Hub, ROOT, collect, freePort } from "./hub.mjs";

// Debian's chromium; where there is none (an Ubuntu CI runner), a preinstalled Chrome.
const CHROMIUM = process.env.OPENRED_CHROMIUM ?? ["/usr/bin/chromium", "/usr/bin/google-chrome"].find((p) => existsSync(p)) ?? "/usr/bin/chromium";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const HERE = fileURLToPath(new URL(".", import.meta.url));
const RESULTS = join(HERE, "..", "test-results");
const have = existsSync(CHROMIUM);
// Without Chromium the test is skipped, except under CI=true, where it fails.
const skip = !have && process.env.CI !== "true" ? `no Chromium at ${CHROMIUM} (apt-get install chromium)` : false;

let hub, server, origin, context, profile;
const clients = [];

const TYPES = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };
function serve(port) {
  const files = {
    "/openred.browser.js": join(HERE, "..", "dist", "openred.browser.js"),
    "/test/page.html": join(HERE, "browser", "page.html"),
    "/test/page.js": join(HERE, "browser", "page.js"),
  };
  const s = createServer((req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    let file = files[path];
    if (!file && path.startsWith("/examples/browser/")) file = join(ROOT, normalize(path));
    if (!file && path.startsWith("/clients/js/dist/")) file = join(ROOT, normalize(path));
    if (path === "/examples/browser/") file = join(ROOT, "examples/browser/index.html");
    if (!file || !existsSync(file)) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "Content-Type": TYPES[file.slice(file.lastIndexOf("."))] ?? "application/octet-stream", "Cache-Control": "no-store" });
    res.end(readFileSync(file));
  });
  return new Promise((r) => s.listen(port, "127.0.0.1", () => r(s)));
}

before(async () => {
  if (skip) return;
  const port = await freePort();
  origin = `http://127.0.0.1:${port}`;
  server = await serve(port);
  hub = await new Hub({ OPENRED_HUB_SERVER_ALLOWED_ORIGINS: origin }).start();
  const { chromium } = await import("playwright-core");
  profile = mkdtempSync(join(tmpdir(), "openred-chromium-"));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ARGS,
    viewport: { width: 900, height: 500 },
  });
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await context?.close();
  server?.close();
  await hub?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

/** Dark pixels of a PNG inside a CSS-pixel rectangle, decoded by the browser itself. */
async function darkPixels(page, png, rect) {
  return page.evaluate(async ({ b64, rect }) => {
    const img = new Image();
    img.src = "data:image/png;base64," + b64;
    await img.decode();
    const c = document.createElement("canvas");
    c.width = img.width;
    c.height = img.height;
    const g = c.getContext("2d");
    g.drawImage(img, 0, 0);
    const scale = img.width / window.innerWidth;
    const x = Math.floor(rect.x * scale), y = Math.floor(rect.y * scale);
    const w = Math.ceil(rect.width * scale), h = Math.ceil(rect.height * scale);
    const d = g.getImageData(x, y, Math.max(1, w), Math.max(1, h)).data;
    let dark = 0;
    const all = g.getImageData(0, 0, img.width, img.height).data;
    const colours = new Set();
    for (let i = 0; i < all.length; i += 4 * 97) colours.add((all[i] << 16) | (all[i + 1] << 8) | all[i + 2]);
    for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] < 200) dark++;
    return { dark, colours: colours.size, width: img.width, height: img.height };
  }, { b64: png.toString("base64"), rect });
}

test("two browser nodes exchange a QoS 1 message and a topic message; the screenshot shows them", { skip, timeout: 120000 }, async () => {
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${origin}/test/page.html?hub=${encodeURIComponent(hub.url)}`);
  await page.waitForFunction(() => document.querySelector("#status")?.textContent === "ready", null, { timeout: 30000 });
  const logBox = await page.locator("#log").boundingBox();
  const before = await page.screenshot();
  await page.evaluate(() => window.start());
  await page.waitForFunction(() => document.body.dataset.done, null, { timeout: 30000 });
  const result = await page.evaluate(() => window.result);
  assert.equal(result.error, undefined, result.error);
  const texts = result.received.map((r) => r.text).sort();
  assert.deepEqual(texts, ["Hello Bob, QoS one", "Hello room"]);
  const direct = result.received.find((r) => r.topic === null);
  assert.deepEqual([direct.qos, direct.verified, direct.enc], [1, true, "box"]);
  assert.deepEqual(result.acked, [true, true]);
  assert.equal(result.outboxLeft, 0, "the IndexedDB outbox emptied");
  const topic = result.received.find((r) => r.topic === "browser/room");
  assert.equal(topic.verified, true);
  assert.equal(result.alice.extractable, false, "the IndexedDB key is a non-extractable WebCrypto key");
  assert.equal(result.alice.reloaded, result.alice.nodeId);
  // The DOM says it...
  const lines = await page.locator("#log li").allTextContents();
  assert.deepEqual(lines.sort(), ["direct QoS 1: Hello Bob, QoS one", "topic browser/room: Hello room"]);
  // ...and the PNG shows it: text pixels in the list's area that were not there before.
  const after = await page.screenshot();
  mkdirSync(RESULTS, { recursive: true });
  writeFileSync(join(RESULTS, "browser-e2e.png"), after);
  const box = await page.locator("#log").boundingBox();
  const rect = { x: box.x, y: box.y, width: Math.max(box.width, 600), height: Math.max(box.height, 40) };
  const was = await darkPixels(page, before, rect);
  const now = await darkPixels(page, after, rect);
  assert.ok(now.width >= 900 && now.colours > 2, `a real picture (${now.width}x${now.height}, ${now.colours} colours)`);
  assert.ok(now.dark > 300, `text rendered in the list: ${now.dark} dark pixels`);
  assert.ok(was.dark < now.dark / 10, `the list was empty before: ${was.dark} vs ${now.dark}`);
  assert.ok(logBox !== null);
  assert.deepEqual(errors, []);
  await page.close();
});

test("the example page (examples/browser) works as a node against the hub", { skip, timeout: 60000 }, async () => {
  const page = await context.newPage();
  await page.goto(`${origin}/examples/browser/?hub=${encodeURIComponent(hub.url)}`);
  await page.waitForFunction(() => /^[0-9a-f]{64}$/.test(document.querySelector("#me")?.textContent ?? ""), null, { timeout: 30000 });
  const browserNode = await page.locator("#me").textContent();
  const peer = new Client(hub.url, { identity: await Identity.generate() });
  clients.push(peer);
  await peer.connect();
  await peer.subscribe("room/1");
  const got = collect(peer, "message");
  await peer.send(browserNode, "hi from node", { qos: 1 });
  await page.waitForFunction(() => document.querySelector("#log").textContent.includes("hi from node"), null, { timeout: 15000 });
  await page.fill("#text", "hi from the browser");
  await page.click("button");
  const m = await got.next((x) => x.topic === "room/1");
  assert.equal(m.text, "hi from the browser");
  assert.equal(m.sender, browserNode);
  await page.close();
});

test("a page from an origin the hub does not list cannot connect (server.allowed_origins)", { skip, timeout: 60000 }, async () => {
  const page = await context.newPage();
  const other = origin.replace("127.0.0.1", "localhost"); // same server, another origin
  await page.goto(`${other}/test/page.html`);
  const outcome = await page.evaluate(async (hubUrl) => {
    const { Client, Identity } = await import("/openred.browser.js");
    const c = new Client(hubUrl, { identity: await Identity.generate(), reconnect: false });
    try {
      await c.connect();
      return "connected";
    } catch (e) {
      return `${e.name}: ${e.message}`;
    }
  }, hub.url);
  assert.match(outcome, /^ConnectError: .*1006/);
  await page.close();
});
