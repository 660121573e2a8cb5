// A browser without WebTransport (removed before the page's scripts run)
// chats through the demo over the WebSocket fallback, with a normal
// Chromium page (WebTransport) and with the `hush` CLI; its page says it
// uses the WebSocket.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import * as h from "./harness.mjs";

let relay;
let demo;
let browser;

before(async () => {
  h.ensureBuilt({ cli: true });
  relay = await h.startRelay();
  demo = await h.demoUrl(relay);
  browser = await h.launchBrowser();
});

after(h.cleanup);

/** A page in a context where `WebTransport` does not exist. */
async function pageWithoutWebTransport(url) {
  const context = await browser.newContext({ viewport: { width: 1180, height: 760 } });
  await context.addInitScript(() => {
    delete window.WebTransport;
  });
  return h.openPage(browser, url, { context });
}

test("a page without WebTransport chats over the WebSocket with a WebTransport page and the CLI", { timeout: 240_000 }, h.diagnose(async () => {
  const ws = await pageWithoutWebTransport(demo.url("wsuser"));
  assert.equal(await ws.evaluate(() => typeof window.WebTransport), "undefined");
  const wsCode = await h.createUser(ws, "Wendy");
  await ws.waitForSelector("[data-testid=connection][data-state=live][data-transport=websocket]", { timeout: 30_000 });
  assert.equal(await ws.evaluate(() => window.hushDemo.client.status().transport), "websocket");
  assert.match(await ws.textContent("[data-testid=connection]"), /WebSocket/);

  const wt = await h.openPage(browser, demo.url("wtuser"));
  const wtCode = await h.createUser(wt, "Tom");
  await wt.waitForSelector("[data-testid=connection][data-state=live][data-transport=webtransport]", { timeout: 30_000 });

  await h.addContact(ws, "Tom", wtCode);
  await h.addContact(wt, "Wendy", wsCode);
  const there = "From a browser without WebTransport";
  await h.sendText(ws, there);
  await h.waitMessage(wt, there, 60_000);
  const back = "Back over WebTransport";
  await h.sendText(wt, back);
  await h.waitMessage(ws, back, 60_000);

  // The CLI (QUIC) and the WebSocket page.
  const carol = h.cliUser();
  await carol.run("init", "--relay", relay.quic, "--cert-hash", relay.certHash, "--name", "Carol");
  const carolCode = (await carol.run("code")).trim().split("\n").find((l) => l.startsWith("hush-contact:"));
  await h.addContact(ws, "Carol", carolCode);
  await carol.run("contact", "add", "Wendy", wsCode);
  await carol.run("send", "Wendy", "hello from the command line");
  await h.waitMessage(ws, "hello from the command line", 60_000);
  const toCli = "and back to the command line";
  await h.sendText(ws, toCli);
  await h.waitMessageState(ws, toCli, ["stored", "delivered", "read"]);
  const seen = [];
  const got = await h.waitUntil(
    async () => {
      seen.push(...h.jsonLines(await carol.run("sync", "--json")));
      return seen.find((m) => m.type === "message" && m.text === toCli);
    },
    { timeout: 60_000, interval: 250, what: "the CLI to receive the WebSocket page's message" },
  );
  assert.equal(got.text, toCli);
  assert.equal(await ws.evaluate(() => window.hushDemo.client.status().transport), "websocket");
}));
