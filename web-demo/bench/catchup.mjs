// Browser catch-up benchmark: N × 1 KiB messages into a fresh browser device
// (WASM decrypt + IndexedDB writes) in headless Chromium.
//
//   cargo build --release -p hush-relay --bin hush-relay
//   cargo build --release -p hush-tests --bin bulk_send
//   node web-demo/bench/catchup.mjs [N] [--senders=K] [--profile] [--demo]
//        [--events=message|messages] [--trace] [--timeout=SECONDS]
//
// 1. A release relay (send rate unlimited, inbox quota above N) starts.
// 2. Device B is created in a bare page (bench/catchup.html: the client
//    only, no chat UI), adds the sender and closes.
// 3. K native senders (tests/src/bin/bulk_send.rs, default 10) send N × 1 KiB
//    texts in total to B (N / K each) and wait until the relay stored all.
// 4. B's page is opened again; the clock runs from Client.open until B has
//    stored all N (message events follow the IndexedDB commit).
//    --demo uses the demo chat page (index.html, served by the relay)
//    instead: B is created through its form, and the clock runs from page
//    load until its sync progress reports all N done.
//    --events=messages counts the per-step `messages` summaries instead of
//    per-message `message` events (the bulk path: no per-message objects).
//    --trace counts the page's IndexedDB puts, stream reads and writes
//    (calls and bytes; adds overhead, so not for timed runs).
//    The CPU line (Linux) is the CPU time this Chromium used during the
//    catch-up: on a busy machine it moves much less than the wall time.
//    The line after it splits the CPU of every process the bench started
//    (the relay included) by kind: renderer, network service, browser...
//    --profile also samples the page's CPU (Chrome DevTools profiler) and
//    prints where the main thread's time went.
//
// Timed here, never in tests.

import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { existsSync, readFile as readFileCb, readFileSync, readdirSync } from "node:fs";
import { join, extname, normalize, sep, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { promisify } from "node:util";
import { loadavg } from "node:os";

const readFile = promisify(readFileCb);

const args = process.argv.slice(2);
const COUNT = Number(args.find((a) => /^\d+$/.test(a)) ?? 100_000);
const PROFILE = args.includes("--profile");
const TRACE = args.includes("--trace");
const DEMO = args.includes("--demo");
const SENDERS = Number(args.find((a) => a.startsWith("--senders="))?.slice(10) ?? 10);
const EVENTS = args.find((a) => a.startsWith("--events="))?.slice(9) ?? "message";
const TIMEOUT_MS = 1000 * Number(args.find((a) => a.startsWith("--timeout="))?.slice(10) ?? 900);

const DEMO_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const REPO = resolve(DEMO_DIR, "..");
const RELAY = process.env.HUSH_RELAY_BIN || join(REPO, "target", "release", "hush-relay");
const SENDER = process.env.HUSH_BULK_SEND_BIN || join(REPO, "target", "release", "bulk_send");
for (const bin of [RELAY, SENDER]) {
  if (!existsSync(bin)) throw new Error(`missing ${bin}: build it first (see the top of this file)`);
}
// The harness reads HUSH_RELAY_BIN when it loads: set it first.
process.env.HUSH_RELAY_BIN = RELAY;
const h = await import("../tests/harness.mjs");

const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".wasm": "application/wasm" };

/** A static server over web-demo/ (bench/ and pkg/). */
async function staticServer() {
  const server = createServer(async (req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    const file = normalize(join(DEMO_DIR, path));
    if (!file.startsWith(DEMO_DIR + sep) || file.includes(`${sep}node_modules${sep}`)) {
      res.writeHead(404).end();
      return;
    }
    try {
      const body = await readFile(file);
      res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  h.onCleanup(() => new Promise((r) => { server.close(r); server.closeAllConnections(); }));
  return `127.0.0.1:${server.address().port}`;
}

/** The native sender, driven over stdio. */
function startSender(relay, count) {
  const proc = spawn(SENDER, ["--relay", relay.quic, "--cert-hash", relay.certHash, "--messages", String(count), "--senders", String(SENDERS)], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  h.onCleanup(() => { if (proc.exitCode === null) proc.kill("SIGKILL"); });
  const lines = createInterface({ input: proc.stdout });
  const waiting = [];
  const queued = [];
  lines.on("line", (l) => (waiting.length ? waiting.shift()(l) : queued.push(l)));
  proc.once("exit", (code) => { for (const w of waiting.splice(0)) w(`exit ${code}`); });
  const next = () => (queued.length ? Promise.resolve(queued.shift()) : new Promise((r) => waiting.push(r)));
  return { proc, next };
}

/**
 * CPU seconds used so far by this script's Chromium (Linux /proc; null
 * elsewhere): every process and thread, and the renderers' main threads
 * (where the page, the wasm client and its JS glue run). On a shared, busy
 * machine these move far less than the wall time does.
 */
function chromiumCpu() {
  try {
    const tick = 100; // USER_HZ
    const parent = new Map();
    const stat = new Map();
    for (const d of readdirSync("/proc")) {
      if (!/^\d+$/.test(d)) continue;
      try {
        const s = readFileSync(`/proc/${d}/stat`, "utf8");
        const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
        parent.set(Number(d), Number(f[1]));
        stat.set(Number(d), f);
      } catch {}
    }
    const ours = (pid) => {
      for (let p = pid, i = 0; p > 1 && i < 64; p = parent.get(p) ?? 0, i++) if (p === process.pid) return true;
      return false;
    };
    let all = 0;
    let renderer = 0;
    // Per kind of process: the relay (a child of this script too, so
    // apart from Chromium's), Chromium's browser process (IndexedDB's
    // backend runs there or in the storage service), and each `--type`
    // (with its utility sub-type: the network service carries the
    // WebTransport session).
    const kinds = {};
    for (const [pid, f] of stat) {
      if (pid === process.pid || !ours(pid)) continue;
      const secs = (Number(f[11]) + Number(f[12])) / tick;
      let cmd = "";
      try { cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8"); } catch {}
      // Chromium rewrites its children's command lines as one string.
      const args = cmd.split(/[\0 ]/);
      const kind = args[0].endsWith("hush-relay")
        ? "relay"
        : (args.find((a) => a.startsWith("--utility-sub-type="))?.slice(19).replace(/\.mojom\.\w+$/, "") ??
          args.find((a) => a.startsWith("--type="))?.slice(7) ??
          "browser");
      kinds[kind] = (kinds[kind] ?? 0) + secs;
      if (kind === "relay") continue;
      all += secs;
      if (cmd.includes("--type=renderer")) {
        const t = readFileSync(`/proc/${pid}/task/${pid}/schedstat`, "utf8");
        renderer += Number(t.split(" ")[0]) / 1e9;
      }
    }
    // The whole machine's CPU ticks: the hypervisor's steal share says how
    // much of the CPU another tenant took meanwhile.
    const ticks = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
    return { all, renderer, kinds, ticks };
  } catch {
    return null;
  }
}

/** The CPU line printed after a catch-up, from two `chromiumCpu()` readings. */
function cpuLine(thread, cpu0, cpu1) {
  const d = cpu1.ticks.map((t, i) => t - (cpu0.ticks[i] ?? 0));
  const total = d.reduce((a, b) => a + b, 0) || 1;
  const steal = Math.round((100 * (d[7] ?? 0)) / total);
  const kinds = Object.keys(cpu1.kinds)
    .map((k) => [k, cpu1.kinds[k] - (cpu0.kinds[k] ?? 0)])
    .filter(([, v]) => v >= 0.005)
    .sort((a, b) => b[1] - a[1])
    .map(([k, v]) => `${k} ${v.toFixed(2)}`)
    .join(", ");
  return `  CPU: renderer ${thread} ${(cpu1.renderer - cpu0.renderer).toFixed(2)} s, all of Chromium ${(cpu1.all - cpu0.all).toFixed(2)} s (host: CPU steal ${steal}%, load average ${loadavg().map((l) => l.toFixed(2)).join(" ")})\n  CPU by process (s): ${kinds}`;
}

/** Self time per function (ms) from a DevTools CPU profile, largest first. */
function selfTimes(profile) {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const ms = new Map();
  for (let i = 0; i < profile.samples.length; i++) {
    const node = byId.get(profile.samples[i]);
    const f = node.callFrame;
    const where = f.url ? ` ${f.url.split("/").pop()}:${f.lineNumber + 1}` : "";
    const wasm = f.url.includes("wasm") && !f.url.endsWith(".js");
    const name = `${f.functionName || "(anonymous)"}${wasm ? " [wasm]" : f.functionName.startsWith("(") ? "" : where}`;
    ms.set(name, (ms.get(name) ?? 0) + (profile.timeDeltas[i] ?? 0) / 1000);
  }
  return [...ms.entries()].sort((a, b) => b[1] - a[1]);
}

function classify(name) {
  if (name === "(idle)") return "idle (waiting: IndexedDB, network)";
  if (name === "(garbage collector)") return "garbage collector";
  if (name === "(program)") return "browser internals (program)";
  if (name.endsWith("[wasm]") || name.startsWith("wasm-function")) {
    if (/chacha|poly1305|sha2|sha256|hmac|hkdf|x25519|curve25519|ed25519|aead|compress|ChaCha|Poly|Sha|Hmac|scalar|field|Field|Edwards|Montgomery/i.test(name)) return "wasm: crypto";
    return "wasm: engine/other";
  }
  return "JavaScript (glue, IndexedDB calls, events)";
}

/** Start the DevTools sampling profiler on a page (1 ms interval). */
async function startProfile(context, page) {
  const cdp = await context.newCDPSession(page);
  await cdp.send("Profiler.enable");
  await cdp.send("Profiler.setSamplingInterval", { interval: 1000 });
  await cdp.send("Profiler.start");
  return cdp;
}

/** Stop the profiler and print where the page's main thread spent its time. */
async function printProfile(cdp) {
  const { profile } = await cdp.send("Profiler.stop");
  const times = selfTimes(profile);
  const groups = new Map();
  let total = 0;
  for (const [name, ms] of times) {
    const g = classify(name);
    groups.set(g, (groups.get(g) ?? 0) + ms);
    total += ms;
  }
  console.log(`  renderer main thread, ${(total / 1000).toFixed(2)} s sampled:`);
  for (const [g, ms] of [...groups.entries()].sort((a, b) => b[1] - a[1])) {
    console.log(`    ${g.padEnd(45)} ${(ms / 1000).toFixed(2)} s  ${Math.round((100 * ms) / total)}%`);
  }
  console.log("  top functions (self time):");
  for (const [name, ms] of times.slice(0, 25)) console.log(`    ${(ms / 1000).toFixed(3)} s  ${name}`);
}

/** The same run through the demo chat page. */
async function demoRun(relay, browser) {
  const demo = await h.demoUrl(relay);
  const context = await browser.newContext({ viewport: { width: 1180, height: 760 } });
  let page = await h.openPage(browser, demo.url("bob"), { context });
  const bCode = await h.createUser(page, "Bob");
  const sender = startSender(relay, COUNT);
  for (let i = 0; i < SENDERS; i++) {
    const codeLine = await sender.next();
    if (!codeLine.startsWith("code ")) throw new Error(`sender: ${codeLine}`);
    await h.addContact(page, `Sender ${i}`, codeLine.slice(5));
  }
  await page.close({ runBeforeUnload: true });
  sender.proc.stdin.write(`${bCode}\n`);
  const stored = await sender.next();
  console.log(`sender: ${stored}`);
  const t0 = Date.now();
  page = await context.newPage();
  h.attachLog(page);
  const cdp = PROFILE ? await startProfile(context, page) : null;
  const cpu0 = chromiumCpu();
  await page.goto(demo.url("bob"));
  await page.waitForFunction(
    (n) => {
      const p = window.hushDemo?.log.progress.at(-1);
      return p && p.total >= n && p.done >= p.total;
    },
    COUNT,
    { timeout: TIMEOUT_MS, polling: 50 },
  );
  const secs = (Date.now() - t0) / 1000;
  const cpu1 = chromiumCpu();
  const shown = await page.locator("[data-testid=message][data-direction=in]").count();
  console.log(
    `demo page catch-up: ${COUNT} messages × 1 KiB synced (progress done) in ${secs.toFixed(2)} s from page load = ${Math.round(COUNT / secs)} msg/s (${shown} rendered)`,
  );
  if (cpu0 && cpu1) {
    console.log(cpuLine("main threads", cpu0, cpu1));
  }
  console.log(`  counters: ${JSON.stringify(await page.evaluate(() => window.hushDemo.client.counters()))}`);
  if (cdp) await printProfile(cdp);
}

try {
  const relay = await h.startRelay({
    extraArgs: ["--send-rate", "0", "--inbox-max-messages", String(COUNT + 10_000), "--inbox-max-bytes", "8G"],
  });
  const options = { relayUrl: `https://${relay.quic}/`, certHash: relay.certHash, storage: "bench-b" };
  const base = `http://${await staticServer()}/bench/catchup.html${TRACE ? "?trace" : ""}`;
  const browser = await h.launchBrowser();
  if (DEMO) {
    await demoRun(relay, browser);
  } else {
    await bareRun(relay, browser, base, options);
  }
} finally {
  await h.cleanup();
}

/** The run in the bare page (bench/catchup.html). */
async function bareRun(relay, browser, base, options) {
  const context = await browser.newContext();

  // B: a fresh device, which knows the sender before the burst.
  let page = await h.openPage(browser, base, { context });
  await page.waitForSelector("body[data-ready='true']", { timeout: 60_000 });
  const bCode = await page.evaluate((o) => window.bench.create(o, "Bob"), options);
  const sender = startSender(relay, COUNT);
  for (let i = 0; i < SENDERS; i++) {
    const codeLine = await sender.next();
    if (!codeLine.startsWith("code ")) throw new Error(`sender: ${codeLine}`);
    await page.evaluate(([n, c]) => window.bench.addContact(n, c), [`Sender ${i}`, codeLine.slice(5)]);
  }
  await page.evaluate(() => window.bench.close());
  await page.close();

  // The burst, while B is away.
  sender.proc.stdin.write(`${bCode}\n`);
  const stored = await sender.next();
  const m = /^stored (\d+) ([\d.]+)$/.exec(stored);
  if (!m) throw new Error(`sender: ${stored}`);
  console.log(`senders (${SENDERS}): ${m[1]} × 1 KiB stored at the relay in ${m[2]} s (${Math.round(Number(m[1]) / Number(m[2]))} msg/s)`);

  // B comes back.
  page = await h.openPage(browser, base, { context });
  await page.waitForSelector("body[data-ready='true']", { timeout: 60_000 });
  const cdp = PROFILE ? await startProfile(context, page) : null;
  const cpu0 = chromiumCpu();
  const r = await page.evaluate(([o, n, t, e]) => window.bench.catchup(o, n, t, e), [options, COUNT, TIMEOUT_MS, EVENTS]);
  const cpu1 = chromiumCpu();
  const secs = r.totalMs / 1000;
  console.log(JSON.stringify(r));
  console.log(
    `catch-up (${EVENTS} events): ${r.received} of ${COUNT} messages × 1 KiB stored by a fresh browser device in ${secs.toFixed(2)} s = ${Math.round(r.received / secs)} msg/s`,
  );
  console.log(
    `  open ${Math.round(r.openMs)} ms; IndexedDB read-write transactions: ${r.idbTransactions}, ${(r.idbBusyMs / 1000).toFixed(2)} s busy (${Math.round((100 * r.idbBusyMs) / r.totalMs)}% of the wall time)`,
  );
  if (cpu0 && cpu1) {
    console.log(cpuLine("main thread", cpu0, cpu1));
  }
  if (cdp) await printProfile(cdp);
  if (r.received < COUNT) {
    process.exitCode = 1;
    console.error(h.pageLog(page));
    console.error(`only ${r.received} of ${COUNT} messages arrived`);
  }
}
