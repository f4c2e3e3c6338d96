// Unit tests: protocol §15 test vectors, codec, reconnect policy, crypto, key files.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, statSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  Identity, authMessage, bodySigMessage, topicSigMessage, decodeFrames, encodeFrame, fromHex, toHex,
  isFinalClose, backoffDelay, reconnectDelay, NO_RECONNECT_CODES, ed25519PublicToX25519,
  secretboxSeal, secretboxOpen, verifySignature, forceSoftwareEd25519, publicKeyOf, isNodeId, isTopic,
} from "../dist/index.js";
import { loadKeyFile, saveKeyFile, loadOrCreateIdentity, outboxStorage } from "../dist/platform-node.js";
import { HUB_BIN, PYTHON } from "./hub.mjs";

const SEED = Uint8Array.from({ length: 32 }, (_, i) => i);
const NONCE = Uint8Array.from({ length: 32 }, (_, i) => 0x20 + i);
const V = {
  pub: "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8",
  signed: "6f70656e7265642d6875622f76312f61757468006f70656e72656400202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
  sig: "6d03efd8ff40f08f26ffba21c214aef020acaaa40c5889a3b26fa2655c0e3958ef0b1a5012d141a97e17eec4b61176d408150be67362988e6c125747a86ad103",
  challenge: "84a174a96368616c6c656e6765a17601a3687562a76f70656e726564a56e6f6e6365c420202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
  hello: "84a174a568656c6c6fa17601a36b6579c42003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8a3736967c4406d03efd8ff40f08f26ffba21c214aef020acaaa40c5889a3b26fa2655c0e3958ef0b1a5012d141a97e17eec4b61176d408150be67362988e6c125747a86ad103",
  send: "86a174a473656e64a2696401a2746fa3626f62a4626f6479c4026869a3716f7301a3636964a3632d31",
  bodySig: "f13b7a2f8745c2703ff5fca96f708e1a1573fec85c4583fb2d0e96ca467defb2d2284904507e938997cd3b9534b89f84d08da64a935c79a85a89b4b613644606",
  // PyNaCl crypto_sign_ed25519_pk_to_curve25519 / sk_to_curve25519 of the same key
  xpub: "4701d08488451f545a409fb58ae3e58581ca40ac3f7f114698cd71deac73ca01",
};

test("§15 vectors: node id, signed message, sig, frames (WebCrypto Ed25519)", async () => {
  const id = await Identity.fromSeed(SEED);
  assert.equal(id.nodeId, V.pub);
  const challenge = decodeFrames(fromHex(V.challenge))[0];
  assert.deepEqual(challenge, { t: "challenge", v: 1, hub: "openred", nonce: NONCE });
  const msg = authMessage(challenge.hub, challenge.nonce);
  assert.equal(toHex(msg), V.signed);
  assert.equal(msg.length, 60);
  const sig = await id.sign(msg);
  assert.equal(toHex(sig), V.sig);
  assert.equal(toHex(encodeFrame({ t: "hello", v: 1, key: id.publicKey, sig })), V.hello);
  assert.equal(toHex(encodeFrame({ t: "send", id: 1, to: "bob", body: new TextEncoder().encode("hi"), qos: 1, cid: "c-1" })), V.send);
  assert.equal(toHex(await id.sign(bodySigMessage("bob", new TextEncoder().encode("hi")))), V.bodySig);
  assert.ok(await verifySignature(fromHex(V.sig), fromHex(V.signed), fromHex(V.pub)));
  assert.ok(!(await verifySignature(fromHex(V.sig), fromHex(V.signed).fill(1, 0, 1), fromHex(V.pub))));
});

test("§15 vectors on the @noble/ed25519 fallback", async () => {
  forceSoftwareEd25519(true);
  try {
    const id = await Identity.fromSeed(SEED);
    assert.equal(toHex(await id.sign(fromHex(V.signed))), V.sig);
    assert.ok(await verifySignature(fromHex(V.sig), fromHex(V.signed), fromHex(V.pub)));
    assert.ok(!(await verifySignature(fromHex(V.bodySig), fromHex(V.signed), fromHex(V.pub))));
  } finally {
    forceSoftwareEd25519(false);
  }
});

test("non-extractable identity signs like the extractable one, has no seed", async () => {
  const a = await Identity.fromSeed(SEED, { extractable: false });
  assert.equal(a.seed, undefined);
  assert.equal(a.extractable, false);
  assert.equal(toHex(await a.sign(fromHex(V.signed))), V.sig);
});

test("codec: batches, garbage, trailing bytes, ids, topics, keys", () => {
  const two = encodeFrame([{ t: "ok", id: 1 }, { t: "msg", mid: "m" }]);
  assert.deepEqual(decodeFrames(two).map((f) => f.t), ["ok", "msg"]);
  assert.throws(() => decodeFrames(Uint8Array.of(0x81)));
  assert.throws(() => decodeFrames(Uint8Array.of(0x80, 0x80)));
  assert.ok(isNodeId("a.b:c-d_e") && !isNodeId("") && !isNodeId("x".repeat(129)) && !isNodeId("$admin"));
  assert.ok(isTopic("room/1") && !isTopic("room 1") && !isTopic("x".repeat(201)));
  assert.equal(toHex(publicKeyOf(V.pub)), V.pub);
  assert.equal(publicKeyOf("alice"), undefined);
  assert.equal(toHex(topicSigMessage("t", Uint8Array.of(1))), toHex(new TextEncoder().encode("openred-hub/v1/topic\0t\0\x01")));
});

test("reconnect policy: close codes (§9), backoff, retry_ms", () => {
  for (const c of [4001, 4003, 4010, 1002, 1003, 1007]) assert.ok(isFinalClose(c), String(c));
  for (const c of [1000, 1001, 1006, 1008, 1009, 1011, 1012, 4002, 4009, 4011, 4099]) assert.ok(!isFinalClose(c), String(c));
  assert.ok(!isFinalClose(4012) && isFinalClose(4012, 4012), "4012 stops when it repeats");
  assert.ok(NO_RECONNECT_CODES.has(4010));
  assert.equal(backoffDelay(0, 200, 30000, () => 1), 200);
  assert.equal(backoffDelay(3, 200, 30000, () => 1), 1600);
  assert.equal(backoffDelay(30, 200, 30000, () => 1), 30000);
  assert.equal(backoffDelay(30, 200, 30000, () => 0), 200);
  assert.equal(reconnectDelay(0, 200, 30000, 1012, 3000, () => 0), 3000);
  assert.ok(reconnectDelay(0, 200, 30000, 1008, undefined, () => 0) >= 10000);
});

test("encryption: ed25519 -> x25519 as libsodium, box both ways, secretbox", async () => {
  const me = await Identity.fromSeed(SEED);
  assert.equal(toHex(ed25519PublicToX25519(me.publicKey)), V.xpub);
  const a = await Identity.generate();
  const b = await Identity.generate({ extractable: false });
  const sealed = await a.boxSeal(b.publicKey, new TextEncoder().encode("secret"));
  assert.equal(sealed.length, 24 + 16 + 6);
  assert.equal(new TextDecoder().decode(await b.boxOpen(a.publicKey, sealed)), "secret");
  const back = await b.boxSeal(a.publicKey, Uint8Array.of(1, 2, 3));
  assert.deepEqual(await a.boxOpen(b.publicKey, back), Uint8Array.of(1, 2, 3));
  const c = await Identity.generate();
  await assert.rejects(c.boxOpen(a.publicKey, sealed));
  const key = new Uint8Array(32).fill(7);
  const s = secretboxSeal(key, Uint8Array.of(9));
  assert.deepEqual(secretboxOpen(key, s), Uint8Array.of(9));
  s[30] ^= 1;
  assert.throws(() => secretboxOpen(key, s));
});

test("key files: the format of openred-hub keygen, both ways, mode 0600", async () => {
  const dir = mkdtempSync(join(tmpdir(), "openred-key-"));
  try {
    const out = execFileSync(HUB_BIN, ["keygen", join(dir, "py.key")], { encoding: "utf8" });
    const id = await loadKeyFile(join(dir, "py.key"));
    assert.ok(out.includes(id.nodeId), `keygen printed ${out}`);
    const mine = await Identity.fromSeed(SEED);
    await saveKeyFile(join(dir, "js.key"), mine);
    assert.equal(statSync(join(dir, "js.key")).mode & 0o777, 0o600);
    assert.match(readFileSync(join(dir, "js.key"), "utf8"), /^-----BEGIN PRIVATE KEY-----/);
    assert.equal((await loadKeyFile(join(dir, "js.key"))).nodeId, V.pub);
    await assert.rejects(saveKeyFile(join(dir, "js.key"), mine), /EEXIST/);
    const created = await loadOrCreateIdentity(join(dir, "new.key"));
    assert.equal((await loadOrCreateIdentity(join(dir, "new.key"))).nodeId, created.nodeId);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("outbox journal file: appends, compaction, torn last record, read by the Python SDK", async () => {
  const dir = mkdtempSync(join(tmpdir(), "openred-journal-"));
  try {
    const path = join(dir, "j.outbox");
    const st = outboxStorage(path);
    assert.deepEqual(await st.load(), []);
    const rec = (i) => ({ cid: `c${i}`, to: "bob", body: new Uint8Array(1000).fill(i % 256), ttl: null, sig: null, receipt: false, meta: null, created_ms: 1700000000000 + i });
    for (let i = 0; i < 200; i++) await st.add(rec(i));
    for (let i = 0; i < 190; i++) await st.remove(`c${i}`);
    const size = statSync(path).size;
    assert.ok(size < 70000, `compacted (205 KB were written): ${size} bytes`);
    assert.equal(statSync(path).mode & 0o777, 0o600);
    const again = await outboxStorage(path).load();
    assert.deepEqual(again.map((r) => r.cid), Array.from({ length: 10 }, (_, i) => `c${190 + i}`));
    const py = execFileSync(PYTHON, ["-c", "import sys; from openred.client import Outbox; print(' '.join(e.cid for e in Outbox(path=sys.argv[1])))", path], { encoding: "utf8" }).trim();
    assert.equal(py, again.map((r) => r.cid).join(" "));
    // a crash in the middle of the last record: that change never happened
    const { appendFileSync } = await import("node:fs");
    appendFileSync(path, Uint8Array.of(0, 0, 1, 0, 1, 2, 3));
    assert.equal((await outboxStorage(path).load()).length, 10);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
