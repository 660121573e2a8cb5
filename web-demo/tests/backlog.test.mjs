// A device that was away comes back to a backlog of 1,200 messages (more
// than one page of 1,000, so the sync takes several steps): the page shows
// sync progress, ends with all of them in order, and keeps them across a
// reload.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import * as h from "./harness.mjs";

const COUNT = 1200;

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

/** Click "show earlier" until the whole conversation is on the page. */
async function showAll(page) {
  for (let i = 0; i < 50; i++) {
    const more = page.locator("[data-testid=load-earlier]");
    if (!(await more.isVisible())) return;
    const before = await page.locator("[data-testid=message]").count();
    await more.click();
    await page.waitForFunction(
      (n) => document.querySelectorAll("[data-testid=message]").length > n || document.querySelector("[data-testid=load-earlier]").hidden,
      before,
      { timeout: 30_000 },
    );
  }
  throw new Error("history never ended");
}

function expectedTexts() {
  return Array.from({ length: COUNT }, (_, i) => `backlog message ${String(i + 1).padStart(3, "0")}`);
}

test(`a ${COUNT}-message backlog syncs with progress, in order, and survives a reload`, { timeout: 300_000 }, h.diagnose(async () => {
  const alice = await h.openPage(browser, demo.url("alice"));
  const aliceCode = await h.createUser(alice, "Alice");
  const bobContext = await browser.newContext({ viewport: { width: 1180, height: 760 } });
  let bob = await h.openPage(browser, demo.url("bob"), { context: bobContext });
  const bobCode = await h.createUser(bob, "Bob");
  await h.addContact(alice, "Bob", bobCode);
  await h.addContact(bob, "Alice", aliceCode);
  await h.sendText(bob, "I'm going away for a while");
  await h.waitMessageState(bob, "I'm going away for a while", ["read"]);

  // Bob's tab is closed (his device keeps its storage in its context).
  await bob.close({ runBeforeUnload: true });

  // Alice writes 500 messages through the page's client, as fast as it takes them.
  const texts = expectedTexts();
  await alice.evaluate(async (all) => {
    for (const t of all) await window.hushDemo.client.send("Bob", t);
  }, texts);
  // All of them are durably at the relay before Bob returns.
  await alice.waitForFunction(
    (n) => {
      const states = window.hushDemo.state.states;
      let stored = 0;
      for (const s of states.values()) if (s !== "sending" && s !== "failed") stored += 1;
      return stored >= n;
    },
    COUNT,
    { timeout: 120_000, polling: 250 },
  );

  // Bob comes back: the bar shows "syncing N of M" while the backlog drains.
  bob = await h.openPage(browser, demo.url("bob"), { context: bobContext });
  await bob.waitForSelector("[data-testid=sync-progress]:not([hidden])", { timeout: 60_000 });
  await h.screenshot(bob, "10-backlog-syncing");
  await bob.waitForFunction(
    (n) => {
      const bar = document.querySelector("[data-testid=sync-progress]");
      return Number(bar.dataset.total) >= n && bar.dataset.phase === "done";
    },
    COUNT,
    { timeout: 120_000 },
  );
  const progress = await bob.evaluate(() => window.hushDemo.log.progress);
  assert.ok(progress.length >= 2, `several progress updates (${JSON.stringify(progress)})`);
  assert.ok(
    progress.some((p) => p.done > 0 && p.done < p.total),
    `a partial step was shown ("syncing N of M"): ${JSON.stringify(progress)}`,
  );
  for (let i = 1; i < progress.length; i++) {
    if (progress[i].total === progress[i - 1].total) {
      assert.ok(progress[i].done >= progress[i - 1].done, "progress never goes backwards within one sync");
    }
  }

  // Everything arrives, exactly once and in order.
  await bob.waitForFunction(
    (n) => document.querySelectorAll("[data-testid=message][data-direction=in]").length >= Math.min(n, 100) &&
      document.querySelector("[data-testid=message]:last-child [data-testid=message-text]")?.textContent === `backlog message ${n}`,
    COUNT,
    { timeout: 120_000 },
  );
  await showAll(bob);
  const shown = await h.shownTexts(bob);
  assert.deepEqual(shown, ["I'm going away for a while", ...texts]);
  await h.screenshot(bob, "11-backlog-done");
  // Bob viewed them: Alice's last message reaches read.
  await h.waitMessageState(alice, texts[COUNT - 1], ["read"], 60_000);

  // A reload keeps all of them.
  await bob.reload();
  await h.waitReady(bob);
  await showAll(bob);
  assert.deepEqual(await h.shownTexts(bob), ["I'm going away for a while", ...texts]);
  const counters = await bob.evaluate(() => window.hushDemo.client.counters());
  assert.equal(counters.unrecoverable, 0);
  await h.screenshot(bob, "12-backlog-after-reload");
}));
