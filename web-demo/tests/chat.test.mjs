// Two people in two browser contexts chat through a real relay over
// WebTransport, on the page the relay serves.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
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

/** The latest ratchet epoch the page shows for the open conversation. */
async function epoch(page) {
  const v = await page.getAttribute("[data-testid=epoch]", "data-epoch");
  return Number(v);
}

test("two browser users chat both ways; receipts reach read once the chat is viewed", { timeout: 180_000 }, h.diagnose(async () => {
  const alice = await h.openPage(browser, demo.url("alice"));
  await alice.waitForSelector("[data-testid=user-name]", { state: "visible", timeout: 30_000 });
  await h.screenshot(alice, "01-onboarding");
  const aliceCode = await h.createUser(alice, "Alice");
  assert.match(aliceCode, /^hush-contact:/);
  await alice.waitForSelector("[data-testid=connection][data-state=live]", { timeout: 30_000 });

  const bob = await h.openPage(browser, demo.url("bob"));
  const bobCode = await h.createUser(bob, "Bob");
  const carol = await h.openPage(browser, demo.url("carol"));
  const carolCode = await h.createUser(carol, "Carol");
  assert.notEqual(aliceCode, bobCode);

  await h.addContact(alice, "Bob", bobCode);
  await h.addContact(bob, "Alice", aliceCode);
  // Bob also knows Carol and looks at her conversation, not Alice's.
  await h.addContact(bob, "Carol", carolCode);
  await h.openConversation(bob, "Carol");
  await h.screenshot(alice, "02-contact-added");

  // Alice writes while Bob looks elsewhere: delivered to his device, unread there.
  const first = "Hi Bob 👋 this is end-to-end encrypted";
  await h.sendText(alice, first);
  await h.waitMessageState(alice, first, ["delivered"]);
  await bob.waitForSelector('[data-testid=conversation][data-name="Alice"] [data-testid=unread]', { timeout: 30_000 });
  assert.equal(await bob.textContent('[data-testid=conversation][data-name="Alice"] [data-testid=unread]'), "1");
  assert.notEqual(
    await alice.locator("[data-testid=message][data-direction=out]").last().getAttribute("data-state"),
    "read",
    "not read before Bob opened the conversation",
  );
  await h.screenshot(bob, "03-unread-badge");

  // Bob opens the conversation: he sees it and Alice's badge turns to read.
  await h.openConversation(bob, "Alice");
  await h.waitMessage(bob, first);
  await h.waitMessageState(alice, first, ["read"]);
  assert.equal(await bob.locator('[data-testid=conversation][data-name="Alice"] [data-testid=unread]').count(), 0);
  const states = await alice.evaluate(() => window.hushDemo.log.states.map((s) => s.state));
  const order = ["sending", "stored", "delivered", "read"];
  const seen = order.filter((s) => states.includes(s));
  assert.deepEqual(seen, order, `Alice saw every state (${states.join(", ")})`);
  assert.ok(
    states.indexOf("stored") < states.lastIndexOf("delivered") && states.lastIndexOf("delivered") < states.lastIndexOf("read"),
    `states in order: ${states.join(", ")}`,
  );

  // The ratchet turns with the conversation: Bob's reply brings a new epoch.
  await alice.waitForSelector("[data-testid=epoch]:not([hidden])", { timeout: 30_000 });
  const epochBefore = await epoch(alice);
  const reply = "Hello Alice! Got it loud and clear.";
  await h.sendText(bob, reply);
  await h.waitMessage(alice, reply);
  await h.waitMessageState(bob, reply, ["read"]);
  await alice.waitForFunction(
    (e) => Number(document.querySelector("[data-testid=epoch]").dataset.epoch) > e,
    epochBefore,
    { timeout: 30_000 },
  );

  // One more turn each way, then both histories agree.
  await h.sendText(alice, "Great, see you at 6?");
  await h.waitMessage(bob, "Great, see you at 6?");
  await h.sendText(bob, "See you 🙂");
  await h.waitMessageState(bob, "See you 🙂", ["read"]);
  const expected = [first, reply, "Great, see you at 6?", "See you 🙂"];
  assert.deepEqual(await h.shownTexts(alice), expected);
  assert.deepEqual(await h.shownTexts(bob), expected);
  await h.screenshot(alice, "04-chat-alice-read");
  await h.screenshot(bob, "05-chat-bob");

  // Nothing was lost or duplicated on the way.
  for (const page of [alice, bob]) {
    const counters = await page.evaluate(() => window.hushDemo.client.counters());
    assert.equal(counters.gapsDetected, 0, "no gaps");
    assert.equal(counters.unrecoverable, 0, "nothing lost");
  }
  assert.deepEqual(await alice.evaluate(() => window.hushDemo.log.errors), []);
  assert.deepEqual(await bob.evaluate(() => window.hushDemo.log.errors), []);
}));
