// A second device joins a user through a link code made on the first; both
// devices then see the same conversation, in both directions.

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

test("a linked second device shares the user's conversations", { timeout: 180_000 }, h.diagnose(async () => {
  const phone = await h.openPage(browser, demo.url("alice-phone"));
  const aliceCode = await h.createUser(phone, "Alice");
  const bob = await h.openPage(browser, demo.url("bob"));
  const bobCode = await h.createUser(bob, "Bob");
  await h.addContact(phone, "Bob", bobCode);
  await h.addContact(bob, "Alice", aliceCode);
  await h.sendText(phone, "from my phone");
  await h.waitMessageState(phone, "from my phone", ["read"]);

  // The phone makes a link code; a laptop (another browser profile) pastes it.
  await phone.click("[data-testid=link-code-button]");
  await phone.waitForFunction(() => document.querySelector("[data-testid=link-code]")?.textContent.startsWith("hush-link:"), null, { timeout: 30_000 });
  const linkCode = (await phone.textContent("[data-testid=link-code]")).trim();
  await h.screenshot(phone, "40-link-code");

  const laptop = await h.openPage(browser, demo.url("alice-laptop"));
  await laptop.waitForSelector("[data-testid=link-input]", { state: "visible", timeout: 30_000 });
  await laptop.fill("[data-testid=link-input]", linkCode);
  await laptop.click("[data-testid=link-device]");
  await h.waitReady(laptop);
  assert.equal(await laptop.textContent("[data-testid=who]"), "Alice");
  // The same identity: the laptop shows the same contact code's user.
  const laptopCode = await h.contactCode(laptop);
  assert.match(laptopCode, /^hush-contact:/);

  // The laptop learns about Bob from the phone.
  await laptop.waitForSelector('[data-testid=conversation][data-name="Bob"]', { timeout: 60_000 });
  await h.openConversation(laptop, "Bob");

  // What the laptop sends reaches Bob, and shows on the phone as Alice's own.
  await h.sendText(laptop, "answering from the laptop");
  await h.waitMessage(bob, "answering from the laptop", 60_000);
  await phone.waitForSelector('[data-testid=message][data-direction=out] >> text="answering from the laptop"', { timeout: 60_000 });
  await h.waitMessageState(laptop, "answering from the laptop", ["read"], 60_000);

  // Bob's answer reaches both of Alice's devices.
  await h.sendText(bob, "hi Alice, wherever you are");
  await h.waitMessage(phone, "hi Alice, wherever you are", 60_000);
  await h.waitMessage(laptop, "hi Alice, wherever you are", 60_000);
  await h.screenshot(laptop, "41-linked-laptop");
  assert.deepEqual(
    (await h.shownTexts(bob)).slice(-2),
    ["answering from the laptop", "hi Alice, wherever you are"],
  );
}));
