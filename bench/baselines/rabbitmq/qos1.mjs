// The RabbitMQ baseline of `python -m bench qos1 --targets hub,rabbitmq` (bench/rabbitmq.py
// runs it): the hub's qos1 shape over AMQP 0-9-1. Each of `--pairs` pairs has one durable
// classic queue, a publisher connection whose confirm-mode channel keeps `--window`
// persistent (deliveryMode 2) publishes unconfirmed, and a consumer connection that acks
// with `multiple` once per delivery batch (what one socket read handed over), as the hub's
// receivers send one `ack` per read. It is Node.js with amqplib so that the generator, not
// a slow client, is not the limit.
//
//   node qos1.mjs --pairs 50 --window 32 --body-bytes 64 --seconds 10 --warmup 2
//
// The broker URL comes from --url, else $BENCH_AMQP_URL (bench passes it that way so the
// password is not on the command line), else RabbitMQ's guest account on 127.0.0.1.
// Progress goes to stderr: "warm-up", "measuring" and "measured" mark the window, so the
// caller can read the server's CPU over exactly that window. Stdout gets one JSON object.

import { randomBytes } from "node:crypto";
import { performance } from "node:perf_hooks";
import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";
import amqp from "amqplib";

const { values: flags } = parseArgs({
  options: {
    url: { type: "string" },
    pairs: { type: "string", default: "50" },
    window: { type: "string", default: "32" },
    "body-bytes": { type: "string", default: "64" },
    seconds: { type: "string", default: "10" },
    warmup: { type: "string", default: "2" },
    prefetch: { type: "string" },
  },
});
const url = flags.url ?? process.env.BENCH_AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/";
const pairs = Number.parseInt(flags.pairs, 10);
const window = Number.parseInt(flags.window, 10);
const bodyBytes = Number.parseInt(flags["body-bytes"], 10);
const seconds = Number(flags.seconds);
const warmup = Number(flags.warmup);
// Twice the publisher's window: the consumer's unacked limit must never be what paces it.
const prefetch = flags.prefetch ? Number.parseInt(flags.prefetch, 10) : window * 2;
// Abandoned queues (a killed run) go away by themselves; a running bench uses them all along.
const QUEUE_EXPIRES_MS = 10 * 60 * 1000;

const prefix = `openred-bench-${randomBytes(4).toString("hex")}`;
const body = randomBytes(bodyBytes);
const errors = {};
const note = (what) => {
  errors[what] = (errors[what] ?? 0) + 1;
};
let running = true;
let acked = 0;
let confirmMs = [];

async function openPair(i) {
  const queue = `${prefix}-${i}`;
  const [pubConn, subConn] = await Promise.all([amqp.connect(url), amqp.connect(url)]);
  for (const conn of [pubConn, subConn]) {
    conn.on("error", (err) => note(`connection error: ${err.message}`));
    conn.on("blocked", (reason) => note(`connection blocked: ${reason}`));
  }
  const pub = await pubConn.createConfirmChannel();
  let pubClosed = false;
  pub.on("close", () => {
    pubClosed = true;
  });
  pub.on("error", (err) => note(`publisher channel: ${err.message}`));
  await pub.assertQueue(queue, {
    durable: true,
    arguments: { "x-queue-type": "classic", "x-expires": QUEUE_EXPIRES_MS },
  });
  const sub = await subConn.createChannel();
  sub.on("error", (err) => note(`consumer channel: ${err.message}`));
  await sub.prefetch(prefetch);
  let last = null;
  let batch = 0;
  let subClosing = false;
  const flushAcks = () => {
    if (subClosing) return; // the server requeues what was not acked
    sub.ack(last, true);
    acked += batch;
    last = null;
    batch = 0;
  };
  await sub.consume(
    queue,
    (msg) => {
      if (msg === null) {
        if (running) note("consumer cancelled by the server");
        return;
      }
      // Deliveries parsed from one read arrive back to back; setImmediate runs after them.
      if (last === null) setImmediate(flushAcks);
      last = msg;
      batch += 1;
    },
    { noAck: false },
  );

  const publishOne = () => {
    const t0 = performance.now();
    pub.publish("", queue, body, { persistent: true }, (err) => {
      if (err) {
        if (running) note(`publish not confirmed: ${err.message ?? err}`);
      } else {
        confirmMs.push(performance.now() - t0);
      }
      if (running && !pubClosed) publishOne();
    });
  };
  return {
    start: () => {
      for (let k = 0; k < window; k += 1) publishOne();
    },
    async close() {
      // Outstanding confirms first (bounded; an unref'd timer, so it cannot hold the
      // process open once all is closed), then the queue, then both connections.
      await Promise.race([
        pub.waitForConfirms().catch(() => {}),
        sleep(10_000, undefined, { ref: false }),
      ]);
      subClosing = true;
      await subConn.close().catch(() => {});
      if (!pubClosed) await pub.deleteQueue(queue).catch((err) => note(`delete: ${err.message}`));
      await pubConn.close().catch(() => {});
    },
    server: pubConn.connection.serverProperties,
  };
}

// Nearest rank, as bench/report.py `percentiles`.
function pct(sorted, q) {
  if (sorted.length === 0) return null;
  return Math.round(sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] * 1000) / 1000;
}

// One line on stderr and exit code 1 (not a stack trace) when the run cannot go on: bench
// shows the last stderr lines as the reason. Queues left behind expire (QUEUE_EXPIRES_MS).
function fail(err) {
  console.error(`error: ${err?.message ?? err}`);
  process.exit(1);
}
process.on("uncaughtException", fail);

async function main() {
  const open = await Promise.all(Array.from({ length: pairs }, (_, i) => openPair(i)));
  for (const p of open) p.start();
  console.error("warm-up");
  await sleep(warmup * 1000);
  confirmMs = [];
  const n0 = acked;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  console.error("measuring");
  await sleep(seconds * 1000);
  const elapsed = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const messages = acked - n0;
  const lat = Float64Array.from(confirmMs).sort();
  console.error("measured");
  running = false;
  await Promise.all(open.map((p) => p.close()));

  const props = open[0]?.server ?? {};
  console.log(
    JSON.stringify({
      msgs_per_s: Math.round(messages / elapsed),
      messages,
      seconds: Math.round(elapsed * 100) / 100,
      confirms: lat.length,
      confirm_p50_ms: pct(lat, 0.5),
      confirm_p99_ms: pct(lat, 0.99),
      generator_cpu: Math.round(((cpu.user + cpu.system) / 1e6 / elapsed) * 1000) / 1000,
      errors,
      queues: pairs,
      prefetch,
      ack: "multiple, once per delivery batch",
      server: `${props.product ?? "?"} ${props.version ?? "?"}`,
    }),
  );
}

main().catch(fail);
