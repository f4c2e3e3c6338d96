// Reconnects against a real hub: restart (bye shutdown + retry_ms, outbox through the
// restart), a hub that goes silent (liveness, §7), and a topic gap (§5 recovered: false).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client, HubError, Identity } from "../dist/index.js";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CuttingProxy, Hub, PYTHON, collect, eventually, sleep } from "./hub.mjs";

let hub;
const clients = [];

before(async () => {
  hub = await new Hub({ OPENRED_HUB_LIMITS_HB_S: "1", OPENRED_HUB_STORE_TOPIC_HISTORY: "2" }).start();
});
after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await hub?.close();
});

async function node(opts = {}) {
  const c = new Client(hub.url, { identity: await Identity.generate(), openTimeoutMs: 2000, ...opts });
  clients.push(c);
  await c.connect();
  return c;
}

test("topic gap: history lost publications while away -> TopicGap, then what it kept", async () => {
  const a = await node();
  const b = await node({ backoffMinMs: 1500, backoffMaxMs: 2000 });
  const sub = await b.subscribe("js/gap");
  const got = collect(b, "message");
  const gaps = collect(b, "gap");
  const first = await a.publish("js/gap", "p1");
  await got.next();
  const down = collect(b, "disconnected");
  await hub.admin("POST", `/v1/nodes/${b.nodeId}/kick`);
  await down.next();
  for (const t of ["p2", "p3", "p4", "p5", "p6"]) await a.publish("js/gap", t);
  const gap = await gaps.next();
  assert.deepEqual([gap.topic, gap.fromSeq, gap.toSeq], ["js/gap", first.seq + 1, first.seq + 3]);
  await eventually(() => got.items.length === 3, 5000, "kept messages");
  assert.deepEqual(got.items.map((m) => m.text), ["p1", "p5", "p6"]);
  assert.equal(sub.recovered, false);
});

test("hub restart: bye shutdown's retry_ms is honoured, QoS 1 sent meanwhile is delivered once, topics resume", async () => {
  const a = await node({ backoffMinMs: 300, backoffMaxMs: 1000 });
  const b = await node({ backoffMinMs: 300, backoffMaxMs: 1000 });
  await b.subscribe("js/restart");
  const got = collect(b, "message");
  const bDown = collect(b, "disconnected");
  const bUp = collect(b, "connected");
  await hub.stop("SIGTERM");
  const d = await bDown.next();
  const downAt = d.__at;
  assert.equal(d.code, 1012);
  assert.ok(d.retryMs >= 1000 && d.retryMs <= 4999, `retry_ms ${d.retryMs}`);
  assert.ok(d.delayMs >= d.retryMs, `waits ${d.delayMs} >= retry_ms ${d.retryMs}`);
  // the hub is down: a QoS 1 send waits in the outbox
  const sent = a.send(b.nodeId, "through the restart", { qos: 1 });
  await sleep(200);
  assert.equal(a.outboxSize, 1);
  await hub.start();
  const u = await bUp.next((e) => e.type === "connected", 20000);
  assert.ok(u.__at - downAt >= d.retryMs, `reconnected after ${u.__at - downAt} ms, retry_ms ${d.retryMs}`);
  const mid = await sent;
  assert.equal(a.outboxSize, 0);
  const m = await got.next((x) => x.mid === mid, 10000);
  assert.equal(m.text, "through the restart");
  await a.publish("js/restart", "after restart");
  await got.next((x) => x.topic === "js/restart");
  await sleep(300);
  assert.equal(got.items.filter((x) => x.mid === mid).length, 1, "delivered once");
});

test("liveness: a hub that stops answering (SIGSTOP) is left after 3 x hb, and rejoined", async () => {
  const a = await node({ backoffMinMs: 200, backoffMaxMs: 500 });
  const down = collect(a, "disconnected");
  const up = collect(a, "connected");
  hub.proc.kill("SIGSTOP");
  let resumed = false;
  try {
    const d = await down.next(() => true, 10000);
    assert.match(d.reason, /no sign of life/);
    assert.equal(d.willRetry, true);
  } finally {
    hub.proc.kill("SIGCONT");
    resumed = true;
  }
  assert.ok(resumed);
  await up.next(() => true, 20000);
  assert.equal(a.state, "connected");
  assert.deepEqual(await a.presence([a.nodeId]), { [a.nodeId]: true });
});

test("outbox + cid (§4.2): a QoS 1 send whose ok was lost is resent after the reconnect and delivered once", async () => {
  const proxy = await new CuttingProxy(hub.wsPort).start();
  try {
    const a = new Client(proxy.url, { identity: await Identity.generate(), backoffMinMs: 200, backoffMaxMs: 500 });
    clients.push(a);
    await a.connect();
    const b = await node();
    const got = collect(b, "message");
    const down = collect(a, "disconnected");
    const up = collect(a, "connected");
    const cut = proxy.loseNextReply();
    const sent = a.send(b.nodeId, "exactly once", { qos: 1 });
    await cut; // the hub stored it; its ok never reached a
    assert.equal((await down.next()).willRetry, true);
    assert.equal(a.outboxSize <= 1, true);
    const mid = await sent; // resent with the same cid after the reconnect: ok dup, the first mid
    const m = await got.next();
    assert.equal(m.mid, mid);
    assert.equal(m.text, "exactly once");
    const back = await up.next();
    assert.ok(m.__at < back.__at, "the first copy was stored and delivered before the resend");
    await sleep(500);
    assert.equal(got.items.length, 1, "delivered once");
    assert.equal(a.outboxSize, 0);
  } finally {
    proxy.close();
  }
});

test("outboxFile: a restored send the hub refuses reaches the error listener (nobody awaits it)", async () => {
  const dir = mkdtempSync(join(tmpdir(), "openred-outbox-"));
  const file = join(dir, "a.outbox");
  try {
    execFileSync(PYTHON, ["-c",
      "import asyncio, sys; from openred.client import Outbox, OutboxEntry; " +
      "o = Outbox(path=sys.argv[1]); o.add(OutboxEntry(cid='c1', to='not a node id', body=b'x')); " +
      "asyncio.run(o.persist())", file]);
    const a = new Client(hub.url, { identity: await Identity.generate(), outboxFile: file });
    clients.push(a);
    const errors = [];
    a.on("error", (e) => errors.push(e));
    await a.connect();
    await eventually(() => errors.length === 1 && a.outboxSize === 0, 5000, "the refusal reported");
    assert.ok(errors[0] instanceof HubError && errors[0].code === "bad_frame", String(errors[0]));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("outboxFile: QoS 1 sends unconfirmed when the program stopped go out on its next run (the Python SDK's format)", async () => {
  const dir = mkdtempSync(join(tmpdir(), "openred-outbox-"));
  const file = join(dir, "a.outbox");
  try {
    const id = await Identity.generate();
    const bid = await Identity.generate();
    const a1 = new Client(hub.url, { identity: id, outboxFile: file, backoffMinMs: 200, backoffMaxMs: 500 });
    await a1.connect();
    await hub.stop();
    const lost = [a1.send(bid.nodeId, "kept 1", { qos: 1 }), a1.send(bid.nodeId, "kept 2", { qos: 1, cid: "named-2" })];
    await eventually(() => a1.outboxSize === 2, 3000, "two in the outbox");
    await a1.flush(200).catch(() => undefined);
    await a1.close(); // the program stops: the sends fail here, but stay in the file
    for (const p of lost) await assert.rejects(p);
    assert.equal(statSync(file).mode & 0o777, 0o600);
    const inPython = execFileSync(PYTHON, ["-c",
      "import sys; from openred.client import Outbox; o = Outbox(path=sys.argv[1]); print(len(o), sorted(e.body.decode() for e in o))", file],
      { encoding: "utf8" }).trim();
    assert.equal(inPython, "2 ['kept 1', 'kept 2']");
    await hub.start();
    const a2 = new Client(hub.url, { identity: id, outboxFile: file });
    clients.push(a2);
    await a2.connect();
    await a2.flush(5000);
    assert.equal(a2.outboxSize, 0);
    const b = new Client(hub.url, { identity: bid });
    clients.push(b);
    await b.connect();
    assert.equal(b.welcome.pending, 2);
    const it = b[Symbol.asyncIterator]();
    const texts = [(await it.next()).value.text, (await it.next()).value.text];
    assert.deepEqual(texts, ["kept 1", "kept 2"]);
    const left = execFileSync(PYTHON, ["-c", "import sys; from openred.client import Outbox; print(len(Outbox(path=sys.argv[1])))", file], { encoding: "utf8" }).trim();
    assert.equal(left, "0");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
