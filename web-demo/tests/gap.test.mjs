// Gap repair: the relay drops envelopes it held too long (retention 2 s);
// the returning device notices the hole in the sender's sequence, asks the
// sender (whose page is open) to resend, and ends with the full history.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import * as h from "./harness.mjs";

let relay;
let demo;
let browser;

before(async () => {
  h.ensureBuilt();
  relay = await h.startRelay({ retention: "2s" });
  demo = await h.demoUrl(relay);
  browser = await h.launchBrowser();
});

after(h.cleanup);

async function setOffline(page, offline) {
  const toggle = page.locator("[data-testid=offline-toggle]");
  if ((await toggle.getAttribute("aria-checked")) !== String(offline)) await toggle.click();
  const want = offline ? "[data-state=offline]" : "[data-state=live]";
  await page.waitForSelector(`[data-testid=connection]${want}`, { timeout: 30_000 });
}

test("messages the relay expired are recovered from their sender", { timeout: 180_000 }, h.diagnose(async () => {
  const alice = await h.openPage(browser, demo.url("alice"));
  const aliceCode = await h.createUser(alice, "Alice");
  const bob = await h.openPage(browser, demo.url("bob"));
  const bobCode = await h.createUser(bob, "Bob");
  await h.addContact(alice, "Bob", bobCode);
  await h.addContact(bob, "Alice", aliceCode);
  await h.sendText(alice, "before the trip");
  await h.waitMessageState(alice, "before the trip", ["read"]);
  await h.sendText(bob, "bye for now");
  await h.waitMessageState(bob, "bye for now", ["read"]);

  // Bob goes offline; Alice writes three messages the relay will expire.
  await setOffline(bob, true);
  await h.screenshot(bob, "30-offline");
  const lost = ["lost on the relay 1", "lost on the relay 2", "lost on the relay 3"];
  const expiredBefore = (await h.relayMetric(relay, "hush_expired_total")) ?? 0;
  for (const t of lost) await h.sendText(alice, t);
  for (const t of lost) await h.waitMessageState(alice, t, ["stored"]);
  await h.waitUntil(
    async () => ((await h.relayMetric(relay, "hush_expired_total")) ?? 0) >= expiredBefore + lost.length,
    { timeout: 30_000, interval: 250, what: "the relay to expire the three envelopes" },
  );

  // One more, which Bob will get; Alice is briefly offline so that Bob's
  // request waits for her and the "asked Alice" state can be seen.
  await h.sendText(alice, "after the gap");
  await h.waitMessageState(alice, "after the gap", ["stored"]);
  await setOffline(alice, true);
  await setOffline(bob, false);
  await bob.waitForSelector("[data-testid=gap-banner][data-kind=detected]:not([hidden])", { timeout: 30_000 });
  const asking = await bob.textContent("[data-testid=gap-banner]");
  assert.match(asking, /3 missing messages — asked Alice to resend/);
  await h.screenshot(bob, "31-gap-detected");

  // Alice is back: her page answers the request, Bob recovers everything.
  await setOffline(alice, false);
  await bob.waitForSelector("[data-testid=gap-banner][data-kind=recovered]:not([hidden])", { timeout: 60_000 });
  assert.match(await bob.textContent("[data-testid=gap-banner]"), /3 missing messages recovered/);
  await h.waitMessage(bob, "after the gap");
  assert.deepEqual(await h.shownTexts(bob), ["before the trip", "bye for now", ...lost, "after the gap"]);
  // The page's own counters say the same.
  await bob.click("[data-testid=health-toggle]");
  await bob.waitForFunction(() => document.querySelector("#fact-recovered").textContent === "3", null, { timeout: 10_000 });
  await h.screenshot(bob, "32-gap-recovered");

  const counters = await bob.evaluate(() => window.hushDemo.client.counters());
  assert.ok(counters.gapsDetected >= 1, "Bob's engine counted the gap");
  assert.equal(counters.recovered, 3);
  assert.equal(counters.unrecoverable, 0);
  const aliceCounters = await alice.evaluate(() => window.hushDemo.client.counters());
  assert.equal(aliceCounters.resent, 3, "Alice re-sent exactly the missing three");
}));
