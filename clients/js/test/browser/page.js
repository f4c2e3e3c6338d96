// Two browser nodes on one page: alice (key in IndexedDB, non-extractable) sends bob a
// signed, encrypted QoS 1 message and publishes on a topic bob holds.
import { Client, Identity, loadOrCreateIdentity, loadIdentity } from "/openred.browser.js";

const hub = new URLSearchParams(location.search).get("hub");
const status = document.querySelector("#status");
const log = (text) => document.querySelector("#log").append(Object.assign(document.createElement("li"), { textContent: text }));
window.result = { received: [] };
try {
  const aliceId = await loadOrCreateIdentity("alice");
  const again = await loadIdentity("alice");
  window.result.alice = { nodeId: aliceId.nodeId, extractable: aliceId.extractable, reloaded: again?.nodeId };
  const alice = new Client(hub, { identity: aliceId, outboxFile: "alice" }); // outbox kept in IndexedDB
  const bob = new Client(hub, { identity: await Identity.generate() });
  await alice.connect();
  await bob.connect();
  window.result.connected = [alice.nodeId, bob.nodeId];
  await bob.subscribe("browser/room");
  status.textContent = "ready";
  await new Promise((go) => (window.start = go)); // the test screenshots the empty list first
  const msgs = [];
  const done = new Promise((resolve) => {
    bob.on("message", (m) => {
      msgs.push(m);
      window.result.received.push({ text: m.text, qos: m.qos, topic: m.topic ?? null, verified: m.verified ?? null, enc: m.enc ?? null });
      log(m.topic ? `topic ${m.topic}: ${m.text}` : `direct QoS ${m.qos}: ${m.text}`);
      if (window.result.received.length === 2) resolve();
    });
  });
  window.result.mid = await alice.send(bob.nodeId, "Hello Bob, QoS one", { qos: 1, sign: true, encrypt: true });
  window.result.pub = await alice.publish("browser/room", "Hello room", { sign: true });
  await done;
  await alice.flush();
  window.result.outboxLeft = alice.outboxSize;
  await new Promise((r) => setTimeout(r, 100)); // acked once the listener returned (autoAck)
  window.result.acked = msgs.map((m) => m.acked);
  status.textContent = "done";
  document.body.dataset.done = "yes";
} catch (e) {
  window.result.error = String(e?.stack ?? e);
  status.textContent = "error: " + e;
  document.body.dataset.done = "error";
}
