// Compiled (not run) by `npm test`: the published declarations as an application sees them.
import {
  Client, Identity, GroupKeys, HubError, ConnectionLost, Message, Subscription, PresenceWatch,
  loadOrCreateIdentity, type History, type TopicGap, type StateEvent,
} from "@openred/client";

export async function app(url: string, peer: string): Promise<void> {
  const node = new Client(url, { identity: await loadOrCreateIdentity("node.key"), groupKeys: new GroupKeys() });
  node.on("state", (e: StateEvent) => (e.type === "disconnected" ? e.willRetry : e.type));
  node.on("message", (m: Message) => m.text.length);
  node.on("gap", (g: TopicGap) => g.toSeq - g.fromSeq);
  await node.connect();
  const mid: string = await node.send(peer, "hi", { qos: 1, sign: true, encrypt: true, meta: { a: "b" } });
  const { seq }: { mid: string; seq: number } = await node.publish("room/1", new Uint8Array([1]));
  const sub: Subscription = await node.subscribe("room/1", { since: seq });
  for await (const item of sub) if (item instanceof Message) item.ack();
  const w: PresenceWatch = await node.watch([peer], { topic: "room/1" });
  const online: boolean | undefined = w.online[peer];
  const h: History = await node.history("room/1", { limit: 10 });
  const reply: Message = await node.request(peer, "q", { timeoutMs: 1000 });
  try {
    await node.send(peer, "x");
  } catch (e) {
    if (e instanceof HubError) e.code.toUpperCase();
    if (e instanceof ConnectionLost && e.final) e.code.toFixed();
  }
  const id: Identity = await Identity.generate({ extractable: false });
  void [mid, online, h.more, reply.requestId, id.nodeId];
  await node.close();
}
