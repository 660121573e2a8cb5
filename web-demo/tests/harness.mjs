// The one shared harness of the browser tests.
//
// - ensureBuilt(): the relay (and CLI) binaries and the wasm package exist and
//   are current (cargo is a no-op when nothing changed).
// - startRelay(): a real `hush-relay` process on ephemeral 127.0.0.1 ports,
//   its addresses and certificate hash parsed from its stdout.
// - demoUrl(): where the page is: the relay's own HTTP listener (`--demo`),
//   or, while a relay binary without the demo is in use, a small static
//   server over web-demo/ with the relay passed as query parameters.
// - launchBrowser(): Debian's Chromium through playwright-core.
// - waitUntil(): the only way tests wait for something outside a page:
//   bounded polling with a deadline and a description for the failure.
//
// Every process and browser started here is registered and torn down by
// the caller's `after` hook through `cleanup()`.

import { spawn, spawnSync, execFileSync } from "node:child_process";
import { createServer } from "node:http";
import { mkdtempSync, rmSync, existsSync, readFileSync, mkdirSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve, dirname, extname, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const DEMO_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const REPO = resolve(DEMO_DIR, "..");
export const SCREENSHOTS = join(DEMO_DIR, "test-output", "screenshots");

const RELAY_BIN = process.env.HUSH_RELAY_BIN || join(REPO, "target", "debug", "hush-relay");
const CLI_BIN = process.env.HUSH_CLI_BIN || join(REPO, "target", "debug", "hush");
const PKG_ENTRY = join(DEMO_DIR, "pkg", "hush_client.js");

/** How long a relay may take to print its addresses. */
const RELAY_START_MS = 30_000;
/** How long a relay may take to stop after SIGTERM before it is killed. */
const RELAY_STOP_MS = 10_000;
/** Longest single CLI command. */
const CLI_MS = 60_000;

const cleanups = [];

/** Register a teardown step; `cleanup()` runs them newest first. */
export function onCleanup(fn) {
  cleanups.push(fn);
}

/** Tear down everything started so far (relays, servers, browsers, dirs). */
export async function cleanup() {
  while (cleanups.length) {
    const fn = cleanups.pop();
    try {
      await fn();
    } catch (e) {
      console.error("cleanup step failed:", e);
    }
  }
}

// ---------------------------------------------------------------------------
// Build check
// ---------------------------------------------------------------------------

function cargo(args) {
  const res = spawnSync("cargo", args, { cwd: REPO, stdio: ["ignore", "inherit", "inherit"], timeout: 20 * 60_000 });
  if (res.status !== 0) {
    throw new Error(`\`cargo ${args.join(" ")}\` failed (status ${res.status ?? res.signal})`);
  }
}

let built = false;

/**
 * The binaries and the wasm package the tests use exist and match the
 * sources. Set HUSH_RELAY_BIN / HUSH_CLI_BIN to test prebuilt binaries
 * (no cargo run then), HUSH_SKIP_BUILD=1 to skip every build step.
 */
export function ensureBuilt({ cli = false } = {}) {
  if (built && (!cli || existsSync(CLI_BIN))) return;
  const skip = process.env.HUSH_SKIP_BUILD === "1";
  if (!skip && !existsSync(PKG_ENTRY)) {
    cargo(["xtask", "build-wasm"]);
  }
  if (!existsSync(PKG_ENTRY)) {
    throw new Error(`the wasm package is missing (${PKG_ENTRY}): run \`cargo xtask build-wasm\``);
  }
  if (!skip && !process.env.HUSH_RELAY_BIN) cargo(["build", "-p", "hush-relay", "--bin", "hush-relay"]);
  if (cli && !skip && !process.env.HUSH_CLI_BIN) cargo(["build", "-p", "hush-cli", "--bin", "hush"]);
  for (const [bin, what] of [[RELAY_BIN, "relay"], ...(cli ? [[CLI_BIN, "CLI"]] : [])]) {
    if (!existsSync(bin)) throw new Error(`the ${what} binary is missing: ${bin}`);
  }
  built = true;
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/**
 * Poll `check` until it returns a truthy value (which is returned) or the
 * deadline passes (then throw, naming `what` and the last value/error).
 */
export async function waitUntil(check, { timeout = 30_000, interval = 100, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() >= deadline) {
      const detail = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`timed out after ${timeout} ms waiting for ${what} (last: ${detail})`);
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}

// ---------------------------------------------------------------------------
// Relay
// ---------------------------------------------------------------------------

/**
 * Start a real relay on ephemeral ports with a development certificate and
 * the demo page. Resolves once it printed its addresses.
 */
export async function startRelay({ retention, extraArgs = [] } = {}) {
  const dataDir = mkdtempSync(join(tmpdir(), "hush-relay-"));
  onCleanup(() => rmSync(dataDir, { recursive: true, force: true }));
  const args = ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--dev-cert", "--demo", "--data", dataDir];
  if (retention) args.push("--retention", retention);
  args.push(...extraArgs);
  const proc = spawn(RELAY_BIN, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn" },
  });
  const relay = { proc, dataDir, quic: null, http: null, certHash: null, output: [] };
  relays.push(relay);
  const exited = new Promise((r) => proc.once("exit", (code, signal) => r({ code, signal })));
  relay.stop = async () => {
    if (proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill("SIGTERM");
    const timer = new Promise((r) => setTimeout(() => r("timeout"), RELAY_STOP_MS));
    if ((await Promise.race([exited, timer])) === "timeout") {
      proc.kill("SIGKILL");
      await exited;
    }
  };
  onCleanup(relay.stop);

  const ready = new Promise((resolveReady, rejectReady) => {
    let buf = "";
    proc.stdout.setEncoding("utf8");
    proc.stdout.on("data", (chunk) => {
      buf += chunk;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        relay.output.push(line);
        let m;
        if ((m = /^hush-relay listening on (\S+)$/.exec(line))) relay.quic = m[1];
        else if ((m = /^http on (\S+)$/.exec(line))) relay.http = m[1];
        else if ((m = /^certificate sha256: ([0-9a-fA-F]{64})$/.exec(line))) relay.certHash = m[1].toLowerCase();
        if (relay.quic && relay.http && relay.certHash) resolveReady();
      }
    });
    proc.stderr.setEncoding("utf8");
    proc.stderr.on("data", (chunk) => relay.output.push(...chunk.trimEnd().split("\n")));
    exited.then(({ code, signal }) =>
      rejectReady(new Error(`hush-relay exited (${code ?? signal}) before it was ready:\n${relay.output.join("\n")}`)),
    );
  });
  let timer;
  const timeout = new Promise((_, rej) => {
    timer = setTimeout(() => rej(new Error(`hush-relay printed no addresses within ${RELAY_START_MS} ms:\n${relay.output.join("\n")}`)), RELAY_START_MS);
  });
  try {
    await Promise.race([ready, timeout]);
  } finally {
    clearTimeout(timer);
  }
  return relay;
}

/** One counter from the relay's Prometheus metrics (summed over labels). */
export async function relayMetric(relay, name) {
  const res = await fetch(`http://${relay.http}/metrics`);
  const text = await res.text();
  let sum = 0;
  let seen = false;
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (m && m[1] === name) {
      sum += Number(m[3]);
      seen = true;
    }
  }
  return seen ? sum : null;
}

// ---------------------------------------------------------------------------
// Serving the page
// ---------------------------------------------------------------------------

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".wasm": "application/wasm",
  ".json": "application/json",
  ".ts": "text/plain; charset=utf-8",
};

/** A static file server over web-demo/ on an ephemeral port. */
async function staticServer() {
  const server = createServer(async (req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    const file = normalize(join(DEMO_DIR, path === "/" ? "index.html" : path));
    if (!file.startsWith(DEMO_DIR + sep) || file.includes(`${sep}node_modules${sep}`) || file.includes(`${sep}tests${sep}`)) {
      res.writeHead(404).end();
      return;
    }
    try {
      const body = await readFile(file);
      res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
      res.end(body);
    } catch {
      res.writeHead(404).end("not found\n");
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  onCleanup(
    () =>
      new Promise((r) => {
        server.close(r);
        server.closeAllConnections();
      }),
  );
  return `127.0.0.1:${server.address().port}`;
}

async function fetchText(url) {
  try {
    const res = await fetch(url, { cache: "no-store" });
    return { status: res.status, body: await res.text() };
  } catch (e) {
    return { status: 0, body: String(e) };
  }
}

/**
 * The page's address for this relay, and how it is served:
 * - "relay": the relay serves the page and /relay.json (the real set-up);
 * - "relay+query": the relay serves the page, but has no /relay.json yet, so
 *   the relay's QUIC address and hash come as query parameters;
 * - "static": the relay does not serve the page; a static server does.
 * The relay's copy of the page must match the files on disk: a relay that
 * embeds a stale page fails loudly instead of testing old code.
 */
export async function demoUrl(relay) {
  const index = await fetchText(`http://${relay.http}/`);
  let base;
  let mode;
  if (index.status === 200 && index.body.includes('data-testid="composer"')) {
    for (const f of ["index.html", "app.js", "style.css"]) {
      const served = await fetchText(`http://${relay.http}/${f}`);
      const disk = readFileSync(join(DEMO_DIR, f), "utf8");
      if (served.body !== disk) {
        throw new Error(`the relay serves a stale ${f}: rebuild hush-relay (its embedded demo differs from web-demo/${f})`);
      }
    }
    // The wasm package is embedded too: a stale one speaks an older client.
    const wasm = "pkg/hush_client_bg.wasm";
    const served = await fetch(`http://${relay.http}/${wasm}`).then((r) => (r.ok ? r.arrayBuffer() : null), () => null);
    if (served && !Buffer.from(served).equals(readFileSync(join(DEMO_DIR, wasm)))) {
      throw new Error(`the relay serves a stale ${wasm}: rebuild hush-relay after \`cargo xtask build-wasm\``);
    }
    const info = await fetchText(`http://${relay.http}/relay.json`);
    base = `http://${relay.http}/`;
    mode = info.status === 200 ? "relay" : "relay+query";
  } else {
    base = `http://${await staticServer()}/`;
    mode = "static";
  }
  const query = mode === "relay" ? {} : { relay: relay.quic, hash: relay.certHash };
  return {
    mode,
    /** The page URL for one storage (= one device). */
    url(storage, extra = {}) {
      const q = new URLSearchParams({ ...query, storage, ...extra });
      return `${base}?${q}`;
    },
  };
}

// ---------------------------------------------------------------------------
// Browser
// ---------------------------------------------------------------------------

function chromiumPath() {
  if (process.env.HUSH_CHROMIUM) return process.env.HUSH_CHROMIUM;
  try {
    return execFileSync("sh", ["-c", "command -v chromium"], { encoding: "utf8" }).trim();
  } catch {
    throw new Error("chromium is not installed (apt-get install -y chromium), or set HUSH_CHROMIUM");
  }
}

/** The flags these machines need, for every way of starting Chromium. */
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** Debian's Chromium, headless, with the flags these machines need. */
export async function launchBrowser() {
  const browser = await chromium.launch({
    executablePath: chromiumPath(),
    headless: true,
    timeout: 60_000,
    args: CHROMIUM_ARGS,
  });
  onCleanup(() => browser.close());
  return browser;
}

/**
 * Debian's Chromium on a persistent profile in `userDataDir` (same flags):
 * its storage (IndexedDB included) lives in files there and survives
 * `context.close()`, so a test can read the files or reopen the profile.
 * Resolves to the BrowserContext; pass it to `openPage(null, url, { context })`.
 */
export async function launchPersistent(userDataDir) {
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath(),
    headless: true,
    timeout: 60_000,
    args: CHROMIUM_ARGS,
    viewport: { width: 1180, height: 760 },
  });
  onCleanup(() => context.close());
  return context;
}

/**
 * A page in a fresh browser context (its own IndexedDB: one person), with
 * its console and errors kept for failure reports.
 */
export async function openPage(browser, url, { context } = {}) {
  const ctx = context ?? (await browser.newContext({ viewport: { width: 1180, height: 760 } }));
  const page = await ctx.newPage();
  attachLog(page);
  await page.goto(url);
  return page;
}

const pages = [];
const relays = [];

/**
 * Wrap a test body: on failure, print every page's console and each relay's
 * output before rethrowing, so a failed run explains itself.
 */
export function diagnose(body) {
  return async (...args) => {
    try {
      return await body(...args);
    } catch (e) {
      for (const [i, p] of pages.entries()) {
        const url = p.isClosed() ? "(closed)" : p.url();
        let summary = "";
        if (!p.isClosed()) {
          summary = await p
            .evaluate(() => {
              const d = window.hushDemo;
              const count = (xs) => xs.reduce((m, x) => ((m[x] = (m[x] ?? 0) + 1), m), {});
              return JSON.stringify({
                status: d.client?.status(),
                counters: d.client?.counters(),
                conversations: d.client?.conversations(),
                shown: count([...document.querySelectorAll("[data-testid=message]")].map((m) => `${m.dataset.direction}:${m.dataset.state}`)),
                latestStates: count([...d.state.states.values()]),
                progress: d.log.progress.slice(-5),
                gaps: d.log.gaps,
                connection: d.log.connection,
                errors: d.log.errors,
              });
            })
            .catch((err) => `(no summary: ${err.message})`);
        }
        console.error(`--- page ${i} ${url}\n${summary}\n${pageLog(p)}`);
      }
      for (const r of relays) console.error(`--- relay ${r.quic}\n${r.output.slice(-60).join("\n")}`);
      throw e;
    }
  };
}

/** Keep a page's console output and errors; `pageLog(page)` returns them. */
export function attachLog(page) {
  pages.push(page);
  const lines = [];
  page.on("console", (m) => lines.push(`[${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => lines.push(`[pageerror] ${e.message}`));
  page.__hushLog = lines;
}

export function pageLog(page) {
  return (page.__hushLog ?? []).join("\n");
}

/** Save a screenshot under test-output/screenshots/. */
export async function screenshot(page, name) {
  mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: join(SCREENSHOTS, `${name}.png`), animations: "disabled" });
}

// ---------------------------------------------------------------------------
// Page actions (what a person does)
// ---------------------------------------------------------------------------

const UI_MS = 30_000;

/** The page finished opening its storage (the app is shown). */
export async function waitReady(page, timeout = UI_MS) {
  await page.waitForSelector("body[data-ready='true']", { timeout }).catch(async (e) => {
    const failed = await page.locator("#loading-text").textContent().catch(() => "");
    throw new Error(`the page did not become ready: ${failed}\n${e.message}\n${pageLog(page)}`);
  });
}

/** Create a user on a page showing the onboarding form. */
export async function createUser(page, name) {
  await page.waitForSelector("[data-testid=user-name]", { state: "visible", timeout: UI_MS }).catch(async (e) => {
    const failed = await page.locator("#loading-text").textContent().catch(() => "");
    throw new Error(`no onboarding form: ${failed}\n${e.message}\n${pageLog(page)}`);
  });
  await page.fill("[data-testid=user-name]", name);
  await page.click("[data-testid=create-user]");
  await waitReady(page);
  // Shared once the device is registered at the relay (connected), as a
  // person would after seeing "Connected".
  await page.waitForSelector("[data-testid=connection][data-state=live]", { timeout: UI_MS });
  return contactCode(page);
}

export async function contactCode(page) {
  const code = page.locator("[data-testid=contact-code]");
  await page.waitForFunction(() => document.querySelector("[data-testid=contact-code]")?.textContent.length > 10, null, { timeout: UI_MS });
  return (await code.textContent()).trim();
}

export async function addContact(page, name, code) {
  await page.fill("[data-testid=add-contact-name]", name);
  await page.fill("[data-testid=add-contact-code]", code);
  await page.click("[data-testid=add-contact]");
  await page.waitForSelector(`[data-testid=conversation][data-name="${name}"]`, { timeout: UI_MS });
  await page.waitForFunction((n) => document.querySelector("[data-testid=chat-title]")?.textContent === n, name, { timeout: UI_MS });
}

export async function openConversation(page, name) {
  await page.click(`[data-testid=conversation][data-name="${name}"]`, { timeout: UI_MS });
  await page.waitForFunction((n) => document.querySelector("[data-testid=chat-title]")?.textContent === n, name, { timeout: UI_MS });
}

/**
 * Type and send one message; resolves to its message element's id.
 *
 * The new message is the outgoing one with this text whose id was not shown
 * before: counting outgoing messages would miss it when the page trims its
 * oldest shown message (it keeps at most a few hundred) at the same time.
 */
export async function sendText(page, text) {
  const before = await page.$$eval("[data-testid=message][data-direction=out]", (els) => els.map((e) => e.dataset.id));
  await page.fill("[data-testid=composer]", text);
  await page.click("[data-testid=send]");
  const handle = await page.waitForFunction(
    ({ before, text }) => {
      const seen = new Set(before);
      const mine = [...document.querySelectorAll("[data-testid=message][data-direction=out]")].filter(
        (e) => !seen.has(e.dataset.id) && e.querySelector("[data-testid=message-text]")?.textContent === text,
      );
      return mine.length > 0 ? mine[mine.length - 1].dataset.id : null;
    },
    { before, text },
    { timeout: UI_MS },
  );
  return handle.jsonValue();
}

/** Wait until the message with this text has one of these states. */
export async function waitMessageState(page, text, states, timeout = UI_MS) {
  await page.waitForFunction(
    ([t, ss]) =>
      [...document.querySelectorAll("[data-testid=message]")].some(
        (m) => m.querySelector("[data-testid=message-text]")?.textContent === t && ss.includes(m.dataset.state),
      ),
    [text, states],
    { timeout },
  );
}

/** Wait until a message with this text is shown. */
export async function waitMessage(page, text, timeout = UI_MS) {
  await waitMessageState(page, text, ["sending", "stored", "delivered", "read", "failed"], timeout);
}

/** The texts of the shown messages, in page order. */
export async function shownTexts(page) {
  return page.$$eval("[data-testid=message] [data-testid=message-text]", (els) => els.map((e) => e.textContent));
}

// ---------------------------------------------------------------------------
// The `hush` CLI
// ---------------------------------------------------------------------------

/** A CLI user with its own home directory. */
export function cliUser() {
  const home = mkdtempSync(join(tmpdir(), "hush-cli-"));
  onCleanup(() => rmSync(home, { recursive: true, force: true }));
  return {
    home,
    /** Run `hush --home HOME ...args`; resolves to stdout, throws on failure. */
    run: (...args) => runCli(home, args),
  };
}

function runCli(home, args) {
  return new Promise((resolveRun, rejectRun) => {
    const proc = spawn(CLI_BIN, ["--home", home, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    proc.stdout.setEncoding("utf8").on("data", (c) => (out += c));
    proc.stderr.setEncoding("utf8").on("data", (c) => (err += c));
    const timer = setTimeout(() => proc.kill("SIGKILL"), CLI_MS);
    proc.once("exit", (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolveRun(out);
      else rejectRun(new Error(`hush ${args.join(" ")} failed (${code ?? signal}):\n${err}${out}`));
    });
  });
}

/** Parse `--json` output: one object per line. */
export function jsonLines(text) {
  return text
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l));
}
