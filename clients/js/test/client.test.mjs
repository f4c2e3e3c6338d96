// The client against a real hub (openred-hub serve on free ports, temporary directory).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import {
  Client, Identity, AuthError, HubError, RemoteError, RequestTimeout, DecryptError, ConnectionLost, GroupKeys, Message,
} from "../dist/index.js";
import { Hub, collect, eventually, sleep } from "./hub.mjs";

let hub;
const clients = [];

before(async () => {
  hub = await new Hub().start();
});
after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await hub?.close();
});

async function node(opts = {}, h = hub) {
  const c = new Client(h.url, { identity: opts.token ? undefined : opts.identity ?? (await Identity.generate()), ...opts });
  clients.push(c);
  await c.connect();
  return c;
}

test("key auth: the welcome names the node by its public key", async () => {
  const id = await Identity.generate();
  const c = new Client(hub.url, { identity: id });
  clients.push(c);
  const connected = collect(c, "connected");
  await c.connect();
  assert.equal(c.nodeId, id.nodeId);
  assert.equal(c.welcome.node, id.nodeId);
  assert.equal(c.state, "connected");
  assert.equal((await connected.next()).session, c.session);
  assert.equal(c.welcome.limits.max_body_bytes, 65536);
});

test("token auth, and a refused token is an AuthError that is not retried", async () => {
  const token = await hub.token("js-token-node");
  const c = await node({ token });
  assert.equal(c.nodeId, "js-token-node");
  const bad = new Client(hub.url, { token: token.slice(0, -4) + "AAAA", connectTimeoutMs: 20000 });
  const t0 = Date.now();
  await assert.rejects(bad.connect(), (e) => e instanceof AuthError && e.code === "auth_failed" && e.closeCode === 4001);
  assert.ok(Date.now() - t0 < 3000, "not retried");
  assert.equal(bad.state, "closed");
});

test("QoS 0: delivered to a listener; no_route to an offline node", async () => {
  const a = await node();
  const b = await node();
  const got = collect(b, "message");
  const mid = await a.send(b.nodeId, "hello b", { meta: { app: "x" } });
  const m = await got.next();
  assert.equal(m.mid, mid);
  assert.equal(m.text, "hello b");
  assert.equal(m.sender, a.nodeId);
  assert.equal(m.qos, 0);
  assert.deepEqual(m.meta, { app: "x" });
  const offline = (await Identity.generate()).nodeId;
  await assert.rejects(a.send(offline, "x"), (e) => e instanceof HubError && e.code === "no_route");
  await a.sendNowait(offline, "no reply, no no_route"); // §3: a frame without id
  await a.sendNowait(b.nodeId, "without id");
  assert.equal((await got.next()).text, "without id");
});

test("QoS 1: stored for an offline node, redelivered until acked, acked once", async () => {
  const a = await node();
  const bid = await Identity.generate();
  const mid = await a.send(bid.nodeId, "keep me", { qos: 1 });
  // first session: taken from the iterator, not acked (autoAck off)
  const b1 = await node({ identity: bid, autoAck: false });
  const it = b1[Symbol.asyncIterator]();
  const first = (await it.next()).value;
  assert.equal(first.mid, mid);
  assert.equal(first.qos, 1);
  assert.equal(first.acked, false);
  await b1.close();
  // second session: the same message again; the iterator acks it when asked for the next
  const b2 = await node({ identity: bid });
  assert.equal(b2.welcome.pending, 1);
  const it2 = b2[Symbol.asyncIterator]();
  const again = (await it2.next()).value;
  assert.equal(again.mid, mid);
  const pendingNext = it2.next(); // acks `again`
  await eventually(() => again.acked, 2000, "ack");
  await sleep(300);
  await b2.close();
  void pendingNext.catch(() => undefined);
  const b3 = await node({ identity: bid });
  assert.equal(b3.welcome.pending, 0);
});

test("QoS 1 with a cid: a repeat is stored once and answered with the first mid (§4.2)", async () => {
  const a = await node();
  const b = await node();
  const got = collect(b, "message");
  const m1 = await a.send(b.nodeId, "once", { qos: 1, cid: "js-cid-1" });
  const m2 = await a.send(b.nodeId, "once", { qos: 1, cid: "js-cid-1" });
  assert.equal(m2, m1);
  await got.next();
  await sleep(300);
  assert.equal(got.items.length, 1);
  assert.equal(a.outboxSize, 0);
});

test("receipts: the sender hears when the recipient acks", async () => {
  const a = await node();
  const b = await node();
  const receipts = collect(a, "receipt");
  b.on("message", () => undefined); // handled: auto-acked
  const mid = await a.send(b.nodeId, "r", { qos: 1, receipt: true });
  const r = await receipts.next((x) => x.mid === mid);
  assert.equal(r.to, b.nodeId);
});

test("topics: publish, subscribe, seq, no own publications; Subscription iterator", async () => {
  const a = await node();
  const b = await node();
  const sub = await b.subscribe("js/room");
  assert.equal(sub.topic, "js/room");
  await a.subscribe("js/room");
  const own = collect(a, "message");
  const p1 = await a.publish("js/room", "one");
  const p2 = await a.publish("js/room", "two");
  assert.equal(p2.seq, p1.seq + 1);
  const it = sub[Symbol.asyncIterator]();
  const m1 = (await it.next()).value;
  const m2 = (await it.next()).value;
  assert.deepEqual([m1.text, m1.seq, m2.text, m2.seq], ["one", p1.seq, "two", p2.seq]);
  assert.equal(m1.topic, "js/room");
  await sleep(200);
  assert.equal(own.items.length, 0, "a publisher does not receive its own publications");
  assert.equal(b.subscriptions["js/room"], p2.seq);
});

test("reconnect after a kick (4012) resubscribes with since: nothing lost, nothing twice", async () => {
  const a = await node();
  const b = await node({ backoffMinMs: 1500, backoffMaxMs: 2000 });
  await b.subscribe("js/since");
  const got = collect(b, "message");
  await a.publish("js/since", "before");
  await got.next();
  const down = collect(b, "disconnected");
  const up = collect(b, "connected");
  assert.equal((await hub.admin("POST", `/v1/nodes/${b.nodeId}/kick`)).status, 200);
  const d = await down.next();
  assert.equal(d.code, 4012);
  assert.equal(d.willRetry, true);
  for (const t of ["x1", "x2", "x3"]) await a.publish("js/since", t);
  await up.next();
  await a.publish("js/since", "after");
  await eventually(() => got.items.length === 5, 8000, "5 messages");
  assert.deepEqual(got.items.map((m) => m.text), ["before", "x1", "x2", "x3", "after"]);
  const seqs = got.items.map((m) => m.seq);
  assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y));
  // a second kick within the minute: §9 "stop if it repeats"
  const closed = collect(b, "closed");
  await hub.admin("POST", `/v1/nodes/${b.nodeId}/kick`);
  assert.equal((await closed.next()).code, 4012);
  assert.equal(b.state, "closed");
});

test("replaced (4010): the old session does not reconnect", async () => {
  const id = await Identity.generate();
  const first = await node({ identity: id, backoffMinMs: 100 });
  const closed = collect(first, "closed");
  const second = await node({ identity: id });
  const c = await closed.next();
  assert.equal(c.code, 4010);
  await sleep(800);
  assert.equal(first.state, "closed");
  assert.equal(second.state, "connected");
  assert.deepEqual(await second.presence([id.nodeId]), { [id.nodeId]: true });
  await assert.rejects(first.send(id.nodeId, "x"), (e) => e instanceof ConnectionLost && e.final);
});

test("banned (4003): closed, no reconnect; a banned node's connect is an AuthError", async () => {
  const id = await Identity.generate();
  const c = await node({ identity: id, backoffMinMs: 100 });
  const closed = collect(c, "closed");
  assert.equal((await hub.admin("POST", `/v1/nodes/${id.nodeId}/ban`)).status, 200);
  assert.equal((await closed.next()).code, 4003);
  await sleep(500);
  assert.equal(c.state, "closed");
  const again = new Client(hub.url, { identity: id });
  await assert.rejects(again.connect(), (e) => e instanceof AuthError && e.code === "forbidden" && e.closeCode === 4003);
});

test("presence and watch: snapshot, online/offline events, a topic's subscribers", async () => {
  const a = await node();
  const bid = await Identity.generate();
  assert.deepEqual(await a.presence([bid.nodeId]), { [bid.nodeId]: false });
  const w = await a.watch([bid.nodeId]);
  assert.deepEqual(w.online, { [bid.nodeId]: false });
  const events = w[Symbol.asyncIterator]();
  const b = await node({ identity: bid });
  const on = (await events.next()).value;
  assert.deepEqual([on.node, on.online, on.snapshot], [bid.nodeId, true, false]);
  assert.equal(w.online[bid.nodeId], true);
  const tw = await a.watch([], { topic: "js/watched" });
  const tev = tw[Symbol.asyncIterator]();
  await b.subscribe("js/watched");
  const sub = (await tev.next()).value;
  assert.deepEqual([sub.node, sub.online, sub.topic], [bid.nodeId, true, "js/watched"]);
  await b.close();
  const off = (await events.next()).value;
  assert.deepEqual([off.node, off.online], [bid.nodeId, false]);
  const left = (await tev.next()).value;
  assert.deepEqual([left.node, left.online, left.topic], [bid.nodeId, false, "js/watched"]);
  await w.close();
  await tw.close();
});

test("request and reply (§4.3): handler result, handler error, timeout", async () => {
  const a = await node();
  const b = await node({
    onRequest: (m) => {
      if (m.text === "fail") throw new Error("no such thing");
      return "echo:" + m.text;
    },
  });
  const r = await a.request(b.nodeId, "ping");
  assert.equal(r.text, "echo:ping");
  assert.ok(r.replyTo);
  const r1 = await a.request(b.nodeId, "ping1", { qos: 1 });
  assert.equal(r1.text, "echo:ping1");
  await assert.rejects(a.request(b.nodeId, "fail"), (e) => e instanceof RemoteError && /no such thing/.test(e.err));
  const c = await node(); // no handler: the request is an ordinary message, answered with reply()
  let late;
  c.on("message", (m) => (m.text === "late" ? (late = m) : c.reply(m, "by hand")));
  assert.equal((await a.request(c.nodeId, "manual")).text, "by hand");
  await assert.rejects(a.request(c.nodeId, "late", { timeoutMs: 300 }), RequestTimeout);
  // A reply after the request gave up is dropped, not queued for a client that only asks.
  await c.reply(late, "too late");
  await c.send(a.nodeId, "plain");
  const first = await a[Symbol.asyncIterator]().next();
  assert.deepEqual([first.value.text, first.value.replyTo], ["plain", undefined]);
});

test("maxQueue: past it the oldest unread message is dropped", async () => {
  const a = await node();
  const b = await node({ maxQueue: 2 });
  for (const text of ["1", "2", "3"]) await a.send(b.nodeId, text);
  await new Promise((r) => setTimeout(r, 300)); // all three read by b, none by the app
  const it = b[Symbol.asyncIterator]();
  assert.deepEqual([(await it.next()).value.text, (await it.next()).value.text], ["2", "3"]);
});

test("§12: signed and encrypted direct messages and topics", async () => {
  const a = await node();
  const b = await node();
  const got = collect(b, "message");
  await a.send(b.nodeId, "signed", { sign: true });
  await a.send(b.nodeId, "sealed", { encrypt: true, sign: true, qos: 1 });
  await a.send(b.nodeId, "plain");
  const [s, e, p] = [await got.next(), await got.next(), await got.next()];
  assert.deepEqual([s.text, s.verified, s.enc], ["signed", true, undefined]);
  assert.deepEqual([e.text, e.verified, e.enc, e.decrypted], ["sealed", true, "box", true]);
  assert.notEqual(new TextDecoder().decode(e.raw), "sealed");
  assert.equal(p.verified, undefined);
  // topic under a group key, signed; a subscriber without the key cannot read it
  const key = crypto.getRandomValues(new Uint8Array(32));
  const gk = new GroupKeys();
  gk.add("js/secret", "k1", key);
  a.groupKeys.add("js/secret", "k1", key);
  const c = await node({ groupKeys: gk });
  const d = await node();
  await c.subscribe("js/secret");
  await d.subscribe("js/secret");
  const cg = collect(c, "message");
  const dg = collect(d, "message");
  await a.publish("js/secret", "for members", { sign: true });
  const cm = await cg.next();
  assert.deepEqual([cm.text, cm.enc, cm.decrypted, cm.verified], ["for members", "secretbox", true, true]);
  assert.equal(cm.meta.kid, "k1");
  const dm = await dg.next();
  assert.equal(dm.decrypted, false);
  assert.throws(() => dm.body, DecryptError);
  assert.equal(dm.verified, true);
});

test("history (§5.2): the last N, oldest first, paging with before", async () => {
  const a = await node();
  for (const t of ["h1", "h2", "h3"]) await a.publish("js/hist", t, { meta: { n: t } });
  const page = await a.history("js/hist", { limit: 2 });
  assert.equal(page.seq, 3);
  assert.deepEqual(page.messages.map((m) => m.text), ["h2", "h3"]);
  assert.equal(page.messages[0].meta.n, "h2");
  assert.equal(page.more, true);
  const older = await a.history("js/hist", { limit: 2, before: page.messages[0].seq });
  assert.deepEqual(older.messages.map((m) => m.text), ["h1"]);
  assert.equal(older.more, false);
});

test("limits: a body over max_body_bytes is refused before sending", async () => {
  const a = await node();
  await assert.rejects(a.send(a.nodeId, new Uint8Array(65537)), (e) => e instanceof HubError && e.code === "too_large");
  assert.equal(a.state, "connected");
});

test("batches (§1): a client that asks for them gets them, in order; a token from a function", async () => {
  const a = await node();
  let calls = 0;
  const b = await node({ batch: true, token: async () => (calls++, hub.token("js-batch-node")) });
  assert.equal(calls, 1);
  assert.equal(b.nodeId, "js-batch-node");
  const got = collect(b, "message");
  await Promise.all(Array.from({ length: 50 }, (_, i) => a.send(b.nodeId, `m${i}`, { qos: i % 2 })));
  await eventually(() => got.items.length === 50, 8000, "50 messages");
  assert.deepEqual(got.items.map((m) => m.text), Array.from({ length: 50 }, (_, i) => `m${i}`));
  await a.flush(5000);
  assert.equal(a.outboxSize, 0);
});

test("stored messages that arrive while a reconnect resubscribes are acked at once", async () => {
  const a = await node();
  const bid = await Identity.generate();
  const b = await node({ identity: bid, backoffMinMs: 1000, backoffMaxMs: 1500 });
  for (let i = 0; i < 5; i++) await b.subscribe(`js/resume/${i}`);
  const got = collect(b, "message");
  const down = collect(b, "disconnected");
  await hub.admin("POST", `/v1/nodes/${bid.nodeId}/kick`);
  await down.next();
  const mids = [];
  for (let i = 0; i < 3; i++) mids.push(await a.send(bid.nodeId, `stored ${i}`, { qos: 1 }));
  await eventually(() => got.items.length === 3, 8000, "3 stored messages");
  assert.deepEqual(got.items.map((m) => m.mid), mids);
  await eventually(() => got.items.every((m) => m.acked), 2000, "acked");
  await sleep(300);
  await b.close();
  const again = await node({ identity: bid });
  assert.equal(again.welcome.pending, 0);
});
