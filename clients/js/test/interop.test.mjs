// Interop with the Python SDK (openred.client), both ways, through a real hub: plain,
// signed, box-encrypted direct messages, group-key topics, request/reply, key files, and
// QoS 1 through a hub restart. The Python side is test/py/peer.py, run with .venv/bin/python.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Client, Identity, toHex } from "../dist/index.js";
import { saveKeyFile } from "../dist/platform-node.js";
import { Hub, PyPeer, collect, eventually, sleep } from "./hub.mjs";

let hub;
let dir;
const clients = [];

before(async () => {
  hub = await new Hub().start();
  dir = mkdtempSync(join(tmpdir(), "openred-interop-"));
});
after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await hub?.close();
  rmSync(dir, { recursive: true, force: true });
});

async function node(opts = {}) {
  const c = new Client(hub.url, { identity: await Identity.generate(), ...opts });
  clients.push(c);
  await c.connect();
  return c;
}

test("Python sends, JS receives: plain, signed, encrypted QoS 1, group-key topic, request", async () => {
  const key = crypto.getRandomValues(new Uint8Array(32));
  const js = await node({ onRequest: (m) => `js-echo:${m.text}` });
  js.groupKeys.add("py/topic", "g1", key);
  await js.subscribe("py/topic");
  const got = collect(js, "message");
  const py = new PyPeer(["talk", hub.url, js.nodeId, toHex(key)]);
  const { node: pyNode } = await py.next((x) => x.node);
  const plain = await got.next((m) => m.topic === undefined && m.raw.length && new TextDecoder().decode(m.raw) === "py-plain");
  assert.equal(plain.sender, pyNode);
  assert.equal(plain.verified, undefined);
  const signed = await got.next((m) => m.topic === undefined && m.sig !== undefined && m.enc === undefined);
  assert.deepEqual([signed.text, signed.verified], ["py-signed", true]);
  const secret = await got.next((m) => m.enc === "box");
  assert.deepEqual([secret.text, secret.qos, secret.verified, secret.decrypted, secret.meta.k], ["py-secret", 1, true, true, "v"]);
  const group = await got.next((m) => m.topic === "py/topic");
  assert.deepEqual([group.text, group.enc, group.meta.kid, group.verified, group.decrypted], ["py-group", "secretbox", "g1", true, true]);
  const reply = await py.next((x) => x.reply !== undefined);
  assert.equal(reply.reply, "js-echo:py-asks");
  await py.done();
  await eventually(() => secret.acked, 2000, "the QoS 1 message acked");
});

test("JS sends, Python receives: plain, signed, encrypted QoS 1, group-key topic, request; a JS key file", async () => {
  const key = crypto.getRandomValues(new Uint8Array(32));
  const id = await Identity.generate();
  const keyFile = join(dir, "py-node.key");
  await saveKeyFile(keyFile, id); // the Python SDK loads the JS-written key file
  const py = new PyPeer(["listen", hub.url, keyFile, toHex(key), "4"]);
  const { ready } = await py.next((x) => x.ready);
  assert.equal(ready, id.nodeId);
  const js = await node();
  js.groupKeys.add("js/topic", "g2", key);
  await js.send(ready, "js-plain");
  await js.send(ready, "js-signed", { sign: true });
  await js.send(ready, "js-secret", { qos: 1, encrypt: true, sign: true, meta: { k: "v" } });
  await js.publish("js/topic", "js-group", { sign: true });
  const r = await js.request(ready, "js-asks", { encrypt: true, sign: true });
  assert.deepEqual([r.text, r.enc, r.decrypted], ["py-echo:js-asks", "box", true]);
  const lines = [];
  for (let i = 0; i < 4; i++) lines.push(await py.next((x) => x.kind));
  const by = Object.fromEntries(lines.map((l) => [l.text, l]));
  assert.deepEqual(Object.keys(by).sort(), ["js-group", "js-plain", "js-secret", "js-signed"]);
  assert.equal(by["js-plain"].verified, null);
  assert.equal(by["js-signed"].verified, true);
  assert.deepEqual([by["js-secret"].enc, by["js-secret"].decrypted, by["js-secret"].verified, by["js-secret"].qos, by["js-secret"].meta.k], ["box", true, true, 1, "v"]);
  assert.deepEqual([by["js-group"].kind, by["js-group"].enc, by["js-group"].decrypted, by["js-group"].verified], ["topic", "secretbox", true, true]);
  for (const l of lines) assert.equal(l.sender, js.nodeId);
  await py.done();
});

test("QoS 1 through a hub restart, both ways", async () => {
  // Python -> offline JS node; the hub restarts; the JS node connects and gets it.
  const jsId = await Identity.generate();
  const p1 = new PyPeer(["send1", hub.url, jsId.nodeId, "py-before-restart"]);
  const { mid: pyMid } = await p1.next((x) => x.mid);
  await p1.done();
  // JS -> offline Python node, stored before the restart
  const pyId = await Identity.generate();
  const keyFile = join(dir, "py-offline.key");
  await saveKeyFile(keyFile, pyId);
  const sender = await node({ backoffMinMs: 200, backoffMaxMs: 1000 });
  const jsMid = await sender.send(pyId.nodeId, "js-before-restart", { qos: 1, sign: true });
  const up = collect(sender, "connected");
  await hub.restart();
  await up.next(() => true, 20000);
  // ... and one sent by JS while Python's node is still offline, after the restart
  const later = await sender.send(pyId.nodeId, "js-after-restart", { qos: 1 });
  const js = new Client(hub.url, { identity: jsId });
  clients.push(js);
  await js.connect();
  assert.equal(js.welcome.pending, 1);
  const got = await js[Symbol.asyncIterator]().next();
  assert.deepEqual([got.value.mid, got.value.text, got.value.verified], [pyMid, "py-before-restart", true]);
  const p2 = new PyPeer(["recv1", hub.url, keyFile]);
  const ready = await p2.next((x) => x.ready);
  assert.equal(ready.pending, 2);
  const m = await p2.next((x) => x.kind);
  assert.deepEqual([m.mid, m.text, m.verified, m.qos], [jsMid, "js-before-restart", true, 1]);
  await p2.done();
  assert.ok(later);
  await sleep(100);
});

test("an outbox file the Python SDK left is sent by the JS client (same journal format)", async () => {
  const file = join(dir, "from-python.outbox");
  const b = await node();
  const got = collect(b, "message");
  const py = new PyPeer(["outbox", file, b.nodeId, "left by python 1", "left by python 2"]);
  assert.equal((await py.next((x) => x.kept !== undefined)).kept, 2);
  await py.done();
  const a = new Client(hub.url, { identity: await Identity.generate(), outboxFile: file });
  clients.push(a);
  await a.connect();
  await a.flush(5000);
  await eventually(() => got.items.length === 2, 5000, "both");
  assert.deepEqual(got.items.map((m) => [m.text, m.meta.from]), [["left by python 1", "python"], ["left by python 2", "python"]]);
});
