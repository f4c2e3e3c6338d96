// A browser node: its key lives in IndexedDB (a non-extractable WebCrypto key), it holds
// topic room/1, and sends what the form says: QoS 1 to a node id, or a publication.
import { Client, loadOrCreateIdentity } from "../../clients/js/dist/openred.browser.js";

const params = new URLSearchParams(location.search); // ?name= a key of its own per tab
const hub = params.get("hub") ?? "ws://127.0.0.1:8765/v1/ws";
const $ = (sel) => document.querySelector(sel);
const log = (text) => $("#log").append(Object.assign(document.createElement("li"), { textContent: text }));

const node = new Client(hub, { identity: await loadOrCreateIdentity(params.get("name") ?? "example") });
node.on("state", (e) => log(`${e.type}${e.code ? ` (${e.code} ${e.reason})` : ""}`));
node.on("message", (m) => log(`${m.topic ?? "direct"} from ${m.sender.slice(0, 8)}: ${m.text}`));
await node.connect();
$("#me").textContent = node.nodeId;
await node.subscribe("room/1");

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const to = $("#to").value.trim(), text = $("#text").value;
  try {
    if (to) await node.send(to, text, { qos: 1 });
    else await node.publish("room/1", text);
    log(`sent: ${text}`);
  } catch (e) {
    log(`error: ${e.message}`);
  }
});
