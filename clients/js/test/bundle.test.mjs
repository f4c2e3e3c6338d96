// Bundle size: the browser build of clients/js with every dependency, esbuild --minify, gzipped.
import { test } from "node:test";
import assert from "node:assert/strict";
import { gzipSync } from "node:zlib";
import { build } from "esbuild";
import { fileURLToPath } from "node:url";

const LIMIT = 25 * 1024;

test(`browser bundle <= ${LIMIT} bytes min+gzip, with its dependencies, no Node-only code`, async () => {
  const r = await build({
    entryPoints: [fileURLToPath(new URL("../dist/index.js", import.meta.url))],
    bundle: true,
    minify: true,
    format: "esm",
    platform: "browser",
    target: "es2022",
    write: false,
    metafile: true,
    logLevel: "silent",
  });
  assert.equal(r.outputFiles.length, 1, "one file: nothing left to load lazily");
  const js = r.outputFiles[0].contents;
  const gz = gzipSync(js, { level: 9 }).length;
  const inputs = Object.keys(r.metafile.inputs);
  assert.ok(inputs.some((p) => p.includes("@msgpack/msgpack")), "msgpack is in");
  assert.ok(inputs.some((p) => p.includes("@noble/ed25519")), "noble ed25519 is in");
  assert.ok(inputs.some((p) => p.includes("@noble/ciphers")), "noble ciphers is in");
  assert.ok(inputs.some((p) => p.endsWith("platform-browser.js")) && !inputs.some((p) => p.endsWith("platform-node.js")), "the browser platform");
  assert.ok(!inputs.some((p) => p.includes("node_modules/ws/")), "no ws package");
  console.log(`# browser bundle: ${js.length} bytes minified, ${gz} bytes gzipped (limit ${LIMIT})`);
  assert.ok(gz <= LIMIT, `${gz} bytes gzipped > ${LIMIT}`);
});
