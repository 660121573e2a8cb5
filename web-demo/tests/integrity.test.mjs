// The page a relay serves is code from its operator. Every file the page
// loads is pinned by its SHA-384 (Subresource Integrity) in index.html, so a
// user who checked the page's own hash against a release runs exactly that
// release: these tests check that the pins match what is served, that
// nothing executable is loaded without a pin, and that Chromium refuses a
// tampered script, package glue, wasm module or stylesheet (the page does
// not use it, and does not start).
// They also check that opening a client ran the AEAD self-test.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import * as h from "./harness.mjs";

let relay;
let demo;
let browser;

before(async () => {
  h.ensureBuilt();
  relay = await h.startRelay();
  demo = await h.demoUrl(relay);
  browser = await h.launchBrowser();
});

after(h.cleanup);

/** What `curl URL | openssl dgst -sha384 -binary | base64` gives, as SRI writes it. */
const sri = (bytes) => `sha384-${createHash("sha384").update(bytes).digest("base64")}`;

/** The page's base URL (where `/` is). */
const base = () => new URL("/", demo.url("x")).href;

async function served(path) {
  const res = await fetch(new URL(path, base()), { cache: "no-store" });
  assert.equal(res.status, 200, `GET ${path}`);
  return Buffer.from(await res.arrayBuffer());
}

/**
 * Every pin of a page: path (relative to `/`) → integrity value, from the
 * `<script src>` / `<link href>` tags and the import map's `integrity`
 * table. Throws on an external script or stylesheet without a pin.
 */
function pins(html) {
  const out = new Map();
  for (const [tag, name, attrs] of html.matchAll(/<(script|link)\b([^>]*)>/g)) {
    const url = /\s(?:src|href)="([^"]+)"/.exec(attrs)?.[1];
    if (!url || url.startsWith("data:")) continue; // inline, or the data: icon
    const integrity = /\sintegrity="([^"]+)"/.exec(attrs)?.[1];
    assert.ok(integrity, `the page loads ${url} without an integrity attribute: ${tag}`);
    assert.ok(name === "script" || /\srel="stylesheet"/.test(attrs), `unexpected tag ${tag}`);
    out.set(new URL(url, "http://page/").pathname.slice(1), integrity);
  }
  const map = /<script type="importmap">([\s\S]*?)<\/script>/.exec(html);
  assert.ok(map, "the page has an import map");
  for (const [url, integrity] of Object.entries(JSON.parse(map[1]).integrity ?? {})) {
    out.set(new URL(url, "http://page/").pathname.slice(1), integrity);
  }
  return out;
}

test("the served page pins every file it loads, the pins match the served bytes, and a normal start runs the AEAD self-test", { timeout: 120_000 }, h.diagnose(async () => {
  const html = (await served("/")).toString("utf8");
  const pinned = pins(html);
  for (const path of ["app.js", "style.css", "pkg/hush_client.js", "pkg/hush_client_bg.wasm"]) {
    assert.ok(pinned.has(path), `index.html pins ${path} (pins: ${[...pinned.keys()].join(", ")})`);
  }
  for (const [path, integrity] of pinned) {
    assert.match(integrity, /^sha384-[A-Za-z0-9+/]{64}$/, path);
    assert.equal(sri(await served(`/${path}`)), integrity, `the served ${path} matches its pin (stale page? run \`cargo xtask page\`)`);
  }

  // integrity.json (what a release publishes) lists the page itself and
  // every pinned file with the same hashes.
  const published = JSON.parse((await served("/integrity.json")).toString("utf8"));
  assert.equal(published.algorithm, "sha384");
  assert.equal(published.files["/index.html"], sri(Buffer.from(html, "utf8")), "integrity.json has the page's own hash");
  for (const [path, integrity] of pinned) {
    assert.equal(published.files[`/${path}`], integrity, `integrity.json pins ${path} like the page`);
  }

  // A normal start: everything the page executes was pinned, and opening a
  // client ran the self-test.
  const ctx = await browser.newContext();
  const loaded = [];
  ctx.on("request", (req) => {
    const url = new URL(req.url());
    const code = ["script", "stylesheet"].includes(req.resourceType()) || url.pathname.endsWith(".wasm");
    if (code && url.origin === new URL(base()).origin) loaded.push(url.pathname.slice(1));
  });
  const page = await h.openPage(browser, demo.url("integrity-ok"), { context: ctx });
  await h.createUser(page, "Ivy");
  for (const path of loaded) assert.ok(pinned.has(path), `the page loaded ${path}, which it does not pin`);
  for (const path of ["app.js", "style.css", "pkg/hush_client.js", "pkg/hush_client_bg.wasm"]) {
    assert.ok(loaded.includes(path), `the page loaded ${path} (loaded: ${loaded.join(", ")})`);
  }
  const status = await page.evaluate(() => window.hushDemo.client.status());
  assert.equal(status.selfTest, "passed", `status() reports the self-test: ${JSON.stringify(status)}`);
  await ctx.close();
}));

/** Executable changes an operator might make to each file. */
const TAMPER = {
  // Runs first thing if the browser executes it.
  "app.js": (b) => Buffer.concat([Buffer.from('window.hushTampered = "app.js";\n'), b]),
  "pkg/hush_client.js": (b) => Buffer.concat([b, Buffer.from('\nwindow.hushTampered = "pkg/hush_client.js";\n')]),
  // Still a valid module: one more custom section ("x", one byte).
  "pkg/hush_client_bg.wasm": (b) => Buffer.concat([b, Buffer.from([0x00, 0x03, 0x01, 0x78, 0x21])]),
  // Styles can hide what the page warns about.
  "style.css": (b) => Buffer.concat([b, Buffer.from("\n.notice, .gap-banner { display: none !important; }\n")]),
};

/**
 * Open the page with `path` served through `change` (the operator's
 * version). Resolves to the page once it started or failed to.
 */
async function pageWith(path, change, storage) {
  const ctx = await browser.newContext();
  await ctx.route(`**/${path}`, async (route) => {
    const res = await route.fetch();
    await route.fulfill({ response: res, body: change(await res.body()) });
  });
  const page = await h.openPage(browser, demo.url(storage), { context: ctx });
  await page.waitForSelector("[data-testid=user-name]:visible, [data-testid=loading][data-failed=true]", { timeout: 30_000 });
  return page;
}

for (const [path, tamper] of Object.entries(TAMPER)) {
  test(`a tampered ${path} is refused and the page does not start`, { timeout: 90_000 }, h.diagnose(async () => {
    // Control: the same interception with the real bytes starts normally,
    // so the refusal below is the hash check and not the interception.
    const control = await pageWith(path, (b) => b, `integrity-control-${path.replace(/\W/g, "-")}`);
    assert.equal(await control.isVisible("[data-testid=user-name]"), true, "the untampered page starts");
    assert.equal(await control.evaluate(() => typeof window.hushDemo?.Client), "function");
    await control.context().close();

    const page = await pageWith(path, tamper, `integrity-tampered-${path.replace(/\W/g, "-")}`);
    assert.equal(await page.getAttribute("[data-testid=loading]", "data-failed"), "true", "the page did not start");
    assert.equal(await page.isVisible("[data-testid=user-name]"), false, "no onboarding form");
    assert.equal(await page.evaluate(() => window.hushTampered), undefined, "the tampered code did not run");
    assert.equal(await page.evaluate(() => typeof window.hushDemo?.Client), "undefined", "no client package was loaded");
    const text = await page.textContent("#loading-text");
    assert.match(text, /integrity|refused/i, `the status line says why: ${text}`);
    await page.context().close();
  }));
}
