// Test helpers: a real hub (openred-hub serve) in a temporary directory, on free ports.
import { spawn, execFile } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const VENV = process.env.OPENRED_VENV ?? join(ROOT, ".venv");
export const PYTHON = join(VENV, "bin/python");
export const HUB_BIN = join(VENV, "bin/openred-hub");
export const ADMIN_TOKEN = "test-admin-secret-0123456789abcdef";
export const JWT_SECRET = "test-jwt-secret-0123456789abcdef-0123456789";

export function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.unref();
    s.on("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

function portOpen(port) {
  return new Promise((res) => {
    const s = connect(port, "127.0.0.1");
    s.on("connect", () => { s.destroy(); res(true); });
    s.on("error", () => res(false));
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Poll `pred` until it is truthy (or throw after `ms`). */
export async function eventually(pred, ms = 5000, what = "condition") {
  const end = Date.now() + ms;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

/**
 * A hub process. `env` adds OPENRED_HUB_* settings; the store is SQLite in the working
 * directory, kept across `restart()`.
 */
export class Hub {
  constructor(env = {}) {
    this.env = env;
    this.dir = mkdtempSync(join(tmpdir(), "openred-js-"));
    this.proc = null;
    this.log = "";
  }

  async start() {
    this.wsPort ??= await freePort();
    this.adminPort ??= await freePort();
    const env = {
      ...process.env,
      OPENRED_HUB_LOG_LEVEL: "warning",
      OPENRED_HUB_SERVER_SHUTDOWN_GRACE_S: "1",
      OPENRED_HUB_ADMIN_TOKENS: `test:admin:${ADMIN_TOKEN}`,
      OPENRED_HUB_AUTH_JWT_SECRET: JWT_SECRET,
      ...this.env,
    };
    this.proc = spawn(HUB_BIN, ["serve", "--ws-port", String(this.wsPort), "--admin-port", String(this.adminPort)], {
      cwd: this.dir,
      env,
      stdio: ["ignore", "pipe", "pipe"],
    });
    const keep = (d) => { this.log = (this.log + d).slice(-20000); };
    this.proc.stdout.on("data", keep);
    this.proc.stderr.on("data", keep);
    const proc = this.proc;
    const exited = new Promise((r) => proc.once("exit", r));
    this.exited = exited;
    await eventually(async () => {
      if (proc.exitCode !== null) throw new Error(`hub exited ${proc.exitCode}: ${this.log}`);
      return (await portOpen(this.wsPort)) && (await portOpen(this.adminPort));
    }, 20000, "the hub to listen");
    return this;
  }

  get url() {
    return `ws://127.0.0.1:${this.wsPort}/v1/ws`;
  }

  get adminUrl() {
    return `http://127.0.0.1:${this.adminPort}`;
  }

  /** SIGTERM (graceful: `bye shutdown` with `retry_ms`) and wait for the exit. */
  async stop(signal = "SIGTERM") {
    if (!this.proc || this.proc.exitCode !== null) return;
    this.proc.kill(signal);
    await this.exited;
  }

  async restart() {
    await this.stop();
    await this.start();
  }

  async admin(method, path, body) {
    const r = await fetch(this.adminUrl + path, {
      method,
      headers: { Authorization: `Bearer ${ADMIN_TOKEN}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await r.text();
    return { status: r.status, body: text ? JSON.parse(text) : null };
  }

  /** A node token from `openred-hub token` (HS256 with the test secret). */
  token(sub, extra = []) {
    return new Promise((res, rej) => {
      execFile(HUB_BIN, ["token", "--sub", sub, ...extra], {
        cwd: this.dir,
        env: { ...process.env, OPENRED_HUB_AUTH_JWT_SECRET: JWT_SECRET, ...this.env },
      }, (err, stdout, stderr) => (err ? rej(new Error(stderr || err.message)) : res(stdout.trim())));
    });
  }

  async close() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Collect a client's events of one type; `next(pred)` waits for the next matching one. */
export function collect(client, type) {
  const items = [];
  const waiters = [];
  client.on(type, (ev) => {
    ev.__at = Date.now(); // when it was emitted
    items.push(ev);
    for (const w of [...waiters]) if (w.pred(ev)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(ev); }
  });
  return {
    items,
    next(pred = () => true, ms = 8000) {
      const seen = items.find((x) => pred(x) && !x.__taken);
      if (seen) { seen.__taken = true; return Promise.resolve(seen); }
      return new Promise((resolve, reject) => {
        const w = { pred, resolve: (ev) => { clearTimeout(t); ev.__taken = true; resolve(ev); } };
        const t = setTimeout(() => { waiters.splice(waiters.indexOf(w), 1); reject(new Error(`no ${type} event within ${ms} ms`)); }, ms);
        waiters.push(w);
      });
    },
  };
}

/** A Python SDK peer (test/py/peer.py) run with the repository's venv; JSON lines out. */
export class PyPeer {
  constructor(args) {
    this.lines = [];
    this.waiters = [];
    this.stderr = "";
    this.proc = spawn(PYTHON, [join(ROOT, "clients/js/test/py/peer.py"), ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let buf = "";
    this.proc.stdout.on("data", (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (!line.trim()) continue;
        const obj = JSON.parse(line);
        this.lines.push(obj);
        for (const w of [...this.waiters]) if (w.pred(obj)) { this.waiters.splice(this.waiters.indexOf(w), 1); w.resolve(obj); }
      }
    });
    this.proc.stderr.on("data", (d) => { this.stderr = (this.stderr + d).slice(-8000); });
    this.exit = new Promise((r) => this.proc.once("exit", (code) => r(code)));
  }

  next(pred = () => true, ms = 15000) {
    const seen = this.lines.find((x) => pred(x) && !x.__taken);
    if (seen) { seen.__taken = true; return Promise.resolve(seen); }
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`python peer: nothing matching within ${ms} ms; stderr: ${this.stderr}`)), ms);
      this.waiters.push({ pred, resolve: (o) => { clearTimeout(t); o.__taken = true; resolve(o); } });
      this.exit.then((code) => { if (code !== 0) { clearTimeout(t); reject(new Error(`python peer exited ${code}: ${this.stderr}`)); } });
    });
  }

  async done(ms = 15000) {
    const code = await Promise.race([this.exit, sleep(ms).then(() => "timeout")]);
    if (code !== 0) {
      this.proc.kill("SIGKILL");
      throw new Error(`python peer exited ${code}: ${this.stderr}`);
    }
  }
}

/**
 * A TCP proxy in front of the hub that can lose a reply: `loseNextReply()` lets the next
 * bytes from the client through to the hub, drops whatever the hub answers, and then cuts
 * the connection (as a network failure after the hub acted on a frame would).
 */
export class CuttingProxy {
  constructor(target) {
    this.target = target;
    this.armed = null;
    this.conns = new Set();
  }

  async start() {
    this.port = await freePort();
    this.server = createServer((client) => {
      const upstream = connect(this.target, "127.0.0.1");
      const pair = { client, upstream, dropping: false };
      this.conns.add(pair);
      const end = () => {
        client.destroy();
        upstream.destroy();
        this.conns.delete(pair);
      };
      client.on("data", (d) => {
        upstream.write(d);
        if (this.armed && pair.upgraded) {
          const done = this.armed;
          this.armed = null;
          pair.dropping = true;
          setTimeout(() => { end(); done(); }, 500);
        }
      });
      upstream.on("data", (d) => {
        if (!pair.dropping) client.write(d);
        if (d.includes("101 Switching Protocols")) pair.upgraded = true;
      });
      client.on("error", end);
      upstream.on("error", end);
      client.on("close", end);
      upstream.on("close", end);
    });
    await new Promise((r) => this.server.listen(this.port, "127.0.0.1", r));
    return this;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/v1/ws`;
  }

  /** Resolves once the connection carrying the next client frame has been cut. */
  loseNextReply() {
    return new Promise((r) => (this.armed = r));
  }

  close() {
    for (const p of this.conns) { p.client.destroy(); p.upstream.destroy(); }
    this.server?.close();
  }
}
