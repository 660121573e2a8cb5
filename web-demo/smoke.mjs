// Smoke check of the browser package without a relay:
//   cargo xtask build-wasm && node web-demo/smoke.mjs
//
// Serves web-demo/ on an ephemeral 127.0.0.1 port (a secure context),
// opens smoke.html in Debian's Chromium through playwright-core and waits
// (bounded) for the page's verdict. Prints the page log and the contact
// code; exits non-zero on failure. HUSH_CHROMIUM overrides the browser path.

import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { dirname, extname, join, normalize, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = dirname(fileURLToPath(import.meta.url));
const VERDICT_MS = 30_000;
const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".wasm": "application/wasm",
  ".json": "application/json",
  ".css": "text/css",
  ".ts": "text/plain",
};

function chromiumPath() {
  if (process.env.HUSH_CHROMIUM) return process.env.HUSH_CHROMIUM;
  try {
    return execFileSync("sh", ["-c", "command -v chromium"], { encoding: "utf8" }).trim();
  } catch {
    throw new Error("chromium is not on PATH (apt-get install -y chromium) and HUSH_CHROMIUM is not set");
  }
}

function serve() {
  const server = createServer(async (req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    const file = normalize(join(ROOT, path === "/" ? "smoke.html" : path));
    if (!file.startsWith(ROOT + sep)) {
      res.writeHead(403).end();
      return;
    }
    try {
      const body = await readFile(file);
      res.writeHead(200, { "content-type": TYPES[extname(file)] || "application/octet-stream" });
      res.end(body);
    } catch {
      res.writeHead(404).end("not found\n");
    }
  });
  return new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(server)));
}

async function main() {
  if (!existsSync(resolve(ROOT, "pkg", "hush_client.js"))) {
    throw new Error("web-demo/pkg/ is missing: run `cargo xtask build-wasm` first");
  }
  const server = await serve();
  const browser = await chromium.launch({
    executablePath: chromiumPath(),
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage();
    page.on("pageerror", (e) => console.error("page error:", e.message));
    const url = `http://127.0.0.1:${server.address().port}/smoke.html${process.argv[2] ?? ""}`;
    await page.goto(url);
    await page.waitForFunction(() => document.body.dataset.result, null, { timeout: VERDICT_MS });
    const result = await page.evaluate(() => document.body.dataset.result);
    console.log(await page.textContent("#log"));
    console.log("contact code:", await page.textContent("#contact-code"));
    console.log("smoke:", result);
    if (result !== "ok") process.exitCode = 1;
  } finally {
    await browser.close();
    server.close();
  }
}

main().catch((e) => {
  console.error("smoke failed:", e.message);
  process.exitCode = 1;
});
