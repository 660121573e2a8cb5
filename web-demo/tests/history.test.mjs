// History transfer with the browser on both sides: a page with a few
// hundred messages makes a link code, a second page links with it and asks
// for the history; the first page exports, seals and uploads it, the second
// shows "Importing your history: N of M" and then the same messages in the
// same order. Messages after the link follow the imported ones. And a `hush`
// CLI device linked to a page imports the page's history.

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

/** Messages Bob writes before the link: more than one archive chunk (256). */
const FROM_BOB = 300;

/** Every message of a conversation as the page's client reads it, oldest first. */
async function whole(page, name) {
  return page.evaluate(async (n) => {
    const c = window.hushDemo.client;
    let out = [];
    let before;
    for (;;) {
      const entries = await c.history(n, before === undefined ? { limit: 500 } : { before, limit: 500 });
      out = entries.concat(out);
      if (entries.length < 500) break;
      before = entries[0].order;
    }
    return out.map((e) => ({ id: e.id, text: e.text, outgoing: e.outgoing, read: e.read }));
  }, name);
}

test("a linked browser imports a browser's history in order", { timeout: 240_000 }, h.diagnose(async () => {
  const phone = await h.openPage(browser, demo.url("alice-phone"));
  const aliceCode = await h.createUser(phone, "Alice");
  const bob = await h.openPage(browser, demo.url("bob"));
  const bobCode = await h.createUser(bob, "Bob");
  await h.addContact(phone, "Bob", bobCode);
  await h.addContact(bob, "Alice", aliceCode);
  await h.sendText(phone, "hello Bob");
  await h.waitMessageState(phone, "hello Bob", ["delivered", "read"]);

  // Bob writes a few hundred messages (through his client, not the UI).
  await bob.evaluate(async (n) => {
    const c = window.hushDemo.client;
    for (let i = 0; i < n; i++) await c.send("Alice", `bob ${i}`);
  }, FROM_BOB);
  await h.waitUntil(async () => (await whole(phone, "Bob")).length === FROM_BOB + 1, {
    timeout: 120_000,
    interval: 500,
    what: `the phone to hold ${FROM_BOB + 1} messages`,
  });
  await h.sendText(phone, "got them all");
  await h.waitMessageState(phone, "got them all", ["delivered", "read"]);
  const old = await whole(phone, "Bob");
  assert.equal(old.length, FROM_BOB + 2);

  // Link a laptop; the phone's page stays open and exports.
  await phone.click("[data-testid=link-code-button]");
  await phone.waitForFunction(() => document.querySelector("[data-testid=link-code]")?.textContent.startsWith("hush-link:"), null, { timeout: 30_000 });
  const linkCode = (await phone.textContent("[data-testid=link-code]")).trim();
  const laptop = await h.openPage(browser, demo.url("alice-laptop"));
  await laptop.waitForSelector("[data-testid=link-input]", { state: "visible", timeout: 30_000 });
  // Every text the notice line shows, in order.
  await laptop.evaluate(() => {
    const el = document.querySelector("#notice-text");
    window.noticesSeen = [];
    new MutationObserver(() => window.noticesSeen.push(el.textContent)).observe(el, {
      childList: true,
      characterData: true,
      subtree: true,
    });
  });
  await laptop.fill("[data-testid=link-input]", linkCode);
  await laptop.click("[data-testid=link-device]");
  await h.waitReady(laptop);

  // Progress: "Importing your history: N of M" while it runs, then done.
  const total = old.length;
  await laptop.waitForFunction(
    (t) => window.hushDemo.log.history.some((e) => e.total === t && e.done < t),
    total,
    { timeout: 90_000 },
  );
  await laptop.waitForFunction(
    (t) => window.hushDemo.log.history.some((e) => e.total === t && e.done === t),
    total,
    { timeout: 90_000 },
  );
  const log = await laptop.evaluate(() => window.hushDemo.log.history);
  const dones = log.map((e) => e.done);
  assert.deepEqual([...dones].sort((a, b) => a - b), dones, "progress only grows");
  assert.ok(log.some((e) => e.done > 0 && e.done < total), `a step between 0 and ${total}: ${JSON.stringify(log)}`);
  assert.equal(await laptop.textContent("#notice-text"), `History imported: ${total} messages.`);
  const seen = await laptop.evaluate(() => window.noticesSeen);
  const shown = seen.filter((t) => t.startsWith("Importing your history"));
  assert.ok(shown.length > 0, `no progress line among ${JSON.stringify(seen)}`);
  for (const t of shown) assert.match(t, new RegExp(`^Importing your history: \\d+ of ${total} messages…$`));
  const exported = await phone.evaluate(() => window.hushDemo.log.errors);
  assert.deepEqual(exported, [], "the phone reported no error");

  // The laptop shows the same messages in the same order, nothing twice.
  await laptop.waitForSelector('[data-testid=conversation][data-name="Bob"]', { timeout: 60_000 });
  const imported = await whole(laptop, "Bob");
  assert.deepEqual(imported.map((m) => m.id), old.map((m) => m.id));
  assert.deepEqual(imported, old);
  await h.openConversation(laptop, "Bob");
  await h.waitMessage(laptop, "got them all");
  await h.screenshot(laptop, "50-history-imported");

  // Messages after the link follow the imported history (the laptop writes
  // first, which introduces it to Bob, as in link.test.mjs; through the
  // client, as the page may still be redrawing the imported list).
  await laptop.evaluate(() => window.hushDemo.client.send("Bob", "from the laptop"));
  await h.waitMessage(bob, "from the laptop", 60_000);
  await h.sendText(bob, "after the link");
  await h.waitMessage(laptop, "after the link", 60_000);
  const after = await whole(laptop, "Bob");
  assert.deepEqual(after.slice(total).map((m) => m.text), ["from the laptop", "after the link"]);
  assert.deepEqual(after.slice(0, total).map((m) => m.id), old.map((m) => m.id));
}));

test("a CLI device linked to a page imports the page's history", { timeout: 180_000 }, h.diagnose(async () => {
  const dana = await h.openPage(browser, demo.url("dana"));
  const danaCode = await h.createUser(dana, "Dana");
  const erin = await h.openPage(browser, demo.url("erin"));
  const erinCode = await h.createUser(erin, "Erin");
  await h.addContact(dana, "Erin", erinCode);
  await h.addContact(erin, "Dana", danaCode);
  await erin.evaluate(async () => {
    for (let i = 0; i < 40; i++) await window.hushDemo.client.send("Dana", `erin ${i}`);
  });
  await h.sendText(dana, "thanks Erin");
  await h.waitMessageState(dana, "thanks Erin", ["delivered", "read"], 60_000);
  const old = await whole(dana, "Erin");
  assert.equal(old.length, 41);

  await dana.click("[data-testid=link-code-button]");
  await dana.waitForFunction(() => document.querySelector("[data-testid=link-code]")?.textContent.startsWith("hush-link:"), null, { timeout: 30_000 });
  const linkCode = (await dana.textContent("[data-testid=link-code]")).trim();
  const cli = h.cliUser();
  const out = await cli.run("init", "--relay", relay.quic, "--cert-hash", relay.certHash, "--link", linkCode, "--wait", "50");
  assert.match(out, /history imported/);
  const shown = h.jsonLines(await cli.run("history", "Erin", "--json", "--limit", "500"));
  assert.deepEqual(
    shown.map((m) => [m.id, m.text, m.outgoing]),
    old.map((m) => [m.id, m.text, m.outgoing]),
  );
  assert.deepEqual(await dana.evaluate(() => window.hushDemo.log.errors), []);
}));
