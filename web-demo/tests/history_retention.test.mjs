// Retention classes and a full inbox, in the browser.
//
// 1. On a relay that keeps normal messages 2 s, a message sent with the
//    composer's "keep 30 days" toggle waits for an offline recipient while
//    the normal one beside it expires: the recipient gets the important one
//    from the relay and has to ask the sender only for the normal one.
// 2. On a relay whose inboxes hold 3 envelopes, the sender's page shows
//    "recipient's inbox is full, will retry" for what does not fit, and
//    the messages turn delivered once the recipient comes back and drains.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import * as h from "./harness.mjs";

let shortRetention;
let tinyInbox;
let browser;

before(async () => {
  h.ensureBuilt();
  const relays = await Promise.all([
    h.startRelay({ retention: "2s" }),
    h.startRelay({ extraArgs: ["--inbox-max-messages", "3"] }),
  ]);
  shortRetention = { relay: relays[0], demo: await h.demoUrl(relays[0]) };
  tinyInbox = { relay: relays[1], demo: await h.demoUrl(relays[1]) };
  browser = await h.launchBrowser();
});

after(h.cleanup);

async function setOffline(page, offline) {
  const toggle = page.locator("[data-testid=offline-toggle]");
  if ((await toggle.getAttribute("aria-checked")) !== String(offline)) await toggle.click();
  const want = offline ? "[data-state=offline]" : "[data-state=live]";
  await page.waitForSelector(`[data-testid=connection]${want}`, { timeout: 30_000 });
}

async function pair(demo) {
  const alice = await h.openPage(browser, demo.url("alice"));
  const aliceCode = await h.createUser(alice, "Alice");
  const bob = await h.openPage(browser, demo.url("bob"));
  const bobCode = await h.createUser(bob, "Bob");
  await h.addContact(alice, "Bob", bobCode);
  await h.addContact(bob, "Alice", aliceCode);
  await h.sendText(alice, "hello Bob");
  await h.waitMessageState(alice, "hello Bob", ["read"]);
  await h.sendText(bob, "hello Alice");
  await h.waitMessageState(bob, "hello Alice", ["read"]);
  return { alice, bob };
}

test("an important message outlives the normal retention", { timeout: 180_000 }, h.diagnose(async () => {
  const { relay, demo } = shortRetention;
  const { alice, bob } = await pair(demo);
  await setOffline(bob, true);
  const expiredBefore = (await h.relayMetric(relay, "hush_expired_total")) ?? 0;

  await h.sendText(alice, "normal one");
  await alice.check("[data-testid=important-toggle]");
  await h.sendText(alice, "important one");
  for (const t of ["normal one", "important one"]) await h.waitMessageState(alice, t, ["stored"]);
  await h.screenshot(alice, "60-important-sent");

  // The relay expires the normal one (and only it: the important one is
  // kept for 30 days).
  await h.waitUntil(
    async () => ((await h.relayMetric(relay, "hush_expired_total")) ?? 0) >= expiredBefore + 1,
    { timeout: 30_000, interval: 250, what: "the relay to expire the normal message" },
  );

  // Bob returns: the important one comes from the relay, the normal one
  // from Alice (gap repair), and nothing else needed re-sending.
  await setOffline(bob, false);
  await h.waitMessage(bob, "important one", 60_000);
  await h.waitMessage(bob, "normal one", 60_000);
  assert.deepEqual(await h.shownTexts(bob), ["hello Bob", "hello Alice", "normal one", "important one"]);
  const bobCounters = await bob.evaluate(() => window.hushDemo.client.counters());
  assert.equal(bobCounters.recovered, 1, "only the normal message had to be recovered");
  const aliceCounters = await alice.evaluate(() => window.hushDemo.client.counters());
  assert.equal(aliceCounters.resent, 1);
  await h.waitMessageState(alice, "important one", ["delivered", "read"], 60_000);
}));

test("a full inbox shows on the sender's page and delivery follows the drain", { timeout: 180_000 }, h.diagnose(async () => {
  const { demo } = tinyInbox;
  const { alice, bob } = await pair(demo);
  await setOffline(bob, true);

  // Bob's inbox holds 3 envelopes: sending 5 fills it.
  const texts = ["one", "two", "three", "four", "five"];
  for (const t of texts) await h.sendText(alice, t);
  await h.waitMessageState(alice, "four", ["recipient-inbox-full"], 60_000);
  const badge = alice.locator('[data-testid=message][data-state="recipient-inbox-full"] [data-testid=state-badge]').last();
  assert.match(await badge.textContent(), /recipient's inbox is full, will retry/);
  await h.screenshot(alice, "61-inbox-full");
  const full = await alice.$$eval('[data-testid=message][data-state="recipient-inbox-full"]', (els) => els.length);
  // At most 3 fit (fewer if another envelope, such as a receipt, waits too).
  assert.ok(full >= 2 && full < texts.length, `${full} messages wait for room`);
  await h.waitMessageState(alice, "one", ["stored"]);
  const counters = await alice.evaluate(() => window.hushDemo.client.counters());
  assert.ok(counters.inboxFullRefusals >= 1, JSON.stringify(counters));

  // Bob drains his inbox; Alice's retries get in and are delivered, once.
  await setOffline(bob, false);
  for (const t of texts) await h.waitMessageState(alice, t, ["delivered", "read"], 90_000);
  await h.waitMessage(bob, "five", 60_000);
  assert.deepEqual(await h.shownTexts(bob), ["hello Bob", "hello Alice", ...texts]);
  assert.equal(
    await alice.$$eval('[data-testid=message][data-state="recipient-inbox-full"]', (els) => els.length),
    0,
  );
}));
