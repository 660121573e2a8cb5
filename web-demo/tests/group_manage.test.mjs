// Managing a group from the demo page's group header, in a real Chromium:
// Alice adds Dave (he sees messages from his joining on), removes Carol
// (her page says she is no longer a member, and nothing sent afterwards
// reaches her: not a message, not the new name), Bob renames the group;
// then pages of the group's history, through the page's "Show earlier
// messages" and through `groupHistory`, fit together into one order that
// is the same on Alice's and Bob's devices; last, Dave leaves with the
// header's button.

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

const title = (page) => page.locator("[data-testid=chat-title]").textContent();

async function waitTitle(page, name) {
  await page.waitForFunction((n) => document.querySelector("[data-testid=chat-title]")?.textContent === n, name, { timeout: 30_000 });
}

async function waitMembers(page, names) {
  await page.waitForFunction(
    (want) => {
      const got = [...document.querySelectorAll("[data-testid=group-member]")].map((e) => e.dataset.name).sort();
      return JSON.stringify(got) === JSON.stringify(want);
    },
    [...names].sort(),
    { timeout: 30_000 },
  );
}

/** The open group's whole history (ids and texts) through the wasm API, in pages of `limit`, newest page first. */
async function pagedHistory(page, limit) {
  return page.evaluate(async (limit) => {
    const d = window.hushDemo;
    const pages = [];
    let before;
    for (let i = 0; i < 1000; i++) {
      const p = await d.client.groupHistory(d.state.current, before ? { before, limit } : { limit });
      if (p.length === 0) break;
      pages.unshift(p);
      before = p[0].id;
      if (p.length < limit) break;
    }
    return pages.flat().map((e) => [e.id, e.text]);
  }, limit);
}

test("members are added, removed and the group renamed from the group header", { timeout: 420_000 }, h.diagnose(async () => {
  const names = ["Alice", "Bob", "Carol", "Dave"];
  const pages = {};
  const codes = {};
  for (const n of names) {
    pages[n] = await h.openPage(browser, demo.url(n.toLowerCase()));
    codes[n] = await h.createUser(pages[n], n);
  }
  const { Alice: alice, Bob: bob, Carol: carol, Dave: dave } = pages;
  // Alice knows everyone; the others know each other as far as the group needs.
  for (const n of ["Bob", "Carol", "Dave"]) await h.addContact(alice, n, codes[n]);
  for (const [who, other] of [["Bob", "Alice"], ["Bob", "Carol"], ["Bob", "Dave"], ["Carol", "Alice"], ["Carol", "Bob"], ["Dave", "Alice"], ["Dave", "Bob"]]) {
    await h.addContact(pages[who], other, codes[other]);
  }

  await alice.fill("[data-testid=group-name]", "Crew");
  for (const m of ["Bob", "Carol"]) await alice.check(`[data-testid=group-pick][data-name="${m}"]`);
  await alice.click("[data-testid=create-group]");
  await waitTitle(alice, "Crew");
  for (const p of [bob, carol]) {
    await p.waitForSelector('[data-testid=conversation][data-kind=group][data-name="Crew"]', { timeout: 30_000 });
    await h.openConversation(p, "Crew");
  }
  await h.sendText(alice, "before Dave");
  await h.waitMessage(bob, "before Dave");
  await h.waitMessage(carol, "before Dave");

  // --- Add: Alice ticks Dave in the header's manage panel.
  await alice.click("[data-testid=group-manage-toggle]");
  assert.deepEqual(
    await alice.$$eval("[data-testid=add-member-pick]", (els) => els.map((e) => e.dataset.name)),
    ["Dave"],
    "only contacts who are not members are offered",
  );
  await alice.check('[data-testid=add-member-pick][data-name="Dave"]');
  await alice.click("[data-testid=add-members]");
  await waitMembers(alice, ["Bob", "Carol", "Dave", "me"]);
  await waitMembers(bob, ["Alice", "Carol", "Dave", "me"]);
  await dave.waitForSelector('[data-testid=conversation][data-kind=group][data-name="Crew"]', { timeout: 30_000 });
  await h.openConversation(dave, "Crew");
  await h.sendText(alice, "welcome Dave");
  for (const p of [bob, carol, dave]) await h.waitMessage(p, "welcome Dave");
  assert.ok(!(await h.shownTexts(dave)).includes("before Dave"), "a member who joins sees messages from the join on");
  await h.screenshot(alice, "group-manage-01-added");

  // --- Remove: Alice removes Carol with the ✕ on her chip (and confirms).
  alice.once("dialog", (d) => d.accept());
  await alice.click('[data-testid=remove-member][data-name="Carol"]');
  await waitMembers(alice, ["Bob", "Dave", "me"]);
  await waitMembers(bob, ["Alice", "Dave", "me"]);
  await waitMembers(dave, ["Alice", "Bob", "me"]);
  // Carol's page says so, and she can no longer write to the group.
  await carol.waitForFunction(() => document.querySelector("#chat-sub")?.textContent.includes("no longer a member"), null, { timeout: 30_000 });
  assert.equal(await carol.locator("[data-testid=composer]").isDisabled(), true, "a removed member cannot write");
  assert.equal(await carol.locator("[data-testid=group-manage]").isVisible(), false);
  assert.equal(await carol.locator("[data-testid=leave-group]").isVisible(), false);
  assert.equal(await carol.locator("[data-testid=remove-member]").count(), 0);
  const carolActive = await carol.evaluate(() => window.hushDemo.client.groups().map((g) => [g.name, g.active]));
  assert.deepEqual(carolActive, [["Crew", false]]);
  await h.screenshot(carol, "group-manage-02-removed");

  const afterId = await h.sendText(alice, "after Carol left");
  await h.waitMessage(bob, "after Carol left");
  await h.waitMessage(dave, "after Carol left");
  // Alice's message is addressed to the remaining members only, and both
  // stored it.
  await alice.waitForFunction(
    (id) => {
      const s = window.hushDemo.client.memberStates(id).map((x) => `${x.name}:${["delivered", "read"].includes(x.state)}`).sort();
      return s.join(",") === "Bob:true,Dave:true";
    },
    afterId,
    { timeout: 60_000 },
  );

  // --- Rename: Bob (a member, not the creator) renames the group.
  await bob.click("[data-testid=group-manage-toggle]");
  await bob.fill("[data-testid=group-rename]", "Crew 2");
  await bob.click("[data-testid=rename-group]");
  await waitTitle(bob, "Crew 2");
  await waitTitle(alice, "Crew 2");
  await waitTitle(dave, "Crew 2");
  await alice.waitForSelector('[data-testid=conversation][data-kind=group][data-name="Crew 2"]', { timeout: 30_000 });
  await h.sendText(dave, "Dave after the rename");
  await h.waitMessage(alice, "Dave after the rename");
  await h.waitMessage(bob, "Dave after the rename");
  await h.screenshot(bob, "group-manage-03-renamed");

  // Carol's device is online and synced throughout (her relay connection
  // is live), and has had everything the remaining members exchanged since
  // (Dave's message came after Alice's and the rename): none of it reached
  // her. Her page still shows the old name and none of the later texts.
  await carol.waitForSelector("[data-testid=connection][data-state=live]", { timeout: 30_000 });
  assert.equal(await title(carol), "Crew", "the rename after the removal did not reach Carol");
  const carolTexts = await carol.evaluate(async () => {
    const d = window.hushDemo;
    return (await d.client.groupHistory(d.state.current, { limit: 500 })).map((e) => e.text);
  });
  assert.deepEqual(carolTexts, ["before Dave", "welcome Dave"], "nothing sent after the removal reached Carol");
  assert.deepEqual(await h.shownTexts(carol), ["before Dave", "welcome Dave"]);

  // --- Paging: enough messages for more than one page of the demo (100).
  await alice.evaluate(async () => {
    const d = window.hushDemo;
    for (let i = 0; i < 110; i++) await d.client.send(d.state.current, `bulk ${i}`);
  });
  await h.waitMessage(bob, "bulk 109", 120_000);
  const aliceAll = await pagedHistory(alice, 500);
  assert.equal(aliceAll.length, 114, "every message once");
  // Bob ends with the same group order as Alice once his list has settled.
  let bobAll;
  await h.waitUntil(
    async () => {
      bobAll = await pagedHistory(bob, 500);
      return JSON.stringify(bobAll) === JSON.stringify(aliceAll);
    },
    { timeout: 60_000, what: "the same group order on Alice's and Bob's devices" },
  );
  // Small pages, each read back from the previous one's first message, fit
  // together into the same order: nothing twice, nothing left out.
  assert.deepEqual(await pagedHistory(bob, 7), aliceAll);
  assert.deepEqual(await pagedHistory(alice, 1), aliceAll);

  // The page shows the newest 100, and "Show earlier messages" the rest.
  await h.openConversation(bob, "Alice");
  await h.openConversation(bob, "Crew 2");
  await bob.waitForFunction(() => document.querySelectorAll("[data-testid=message]").length === 100, null, { timeout: 30_000 });
  assert.deepEqual(await h.shownTexts(bob), aliceAll.slice(-100).map(([, t]) => t));
  assert.equal(await bob.locator("[data-testid=load-earlier]").isVisible(), true, "earlier pages are offered for a group");
  await bob.click("[data-testid=load-earlier]");
  await bob.waitForFunction(() => document.querySelectorAll("[data-testid=message]").length === 114, null, { timeout: 30_000 });
  assert.deepEqual(await h.shownTexts(bob), aliceAll.map(([, t]) => t), "the earlier page joins the shown one in the group order");
  await bob.waitForSelector("[data-testid=load-earlier]", { state: "hidden", timeout: 10_000 });
  // A message arriving now keeps the earlier page on the list.
  await h.sendText(dave, "after paging");
  await h.waitMessage(bob, "after paging");
  await bob.waitForFunction(() => document.querySelectorAll("[data-testid=message]").length === 115, null, { timeout: 30_000 });
  assert.equal((await h.shownTexts(bob))[0], "before Dave");

  // --- Leave: Dave leaves with the header's button (and confirms).
  dave.once("dialog", (d) => d.accept());
  await dave.click("[data-testid=leave-group]");
  await dave.waitForFunction(() => document.querySelector("#chat-sub")?.textContent.includes("no longer a member"), null, { timeout: 30_000 });
  assert.equal(await dave.locator("[data-testid=composer]").isDisabled(), true);
  await waitMembers(alice, ["Bob", "me"]);
  await waitMembers(bob, ["Alice", "me"]);

  for (const p of [alice, bob, carol, dave]) {
    const counters = await p.evaluate(() => window.hushDemo.client.counters());
    assert.equal(counters.unrecoverable, 0, "nothing lost");
    assert.deepEqual(await p.evaluate(() => window.hushDemo.log.errors), []);
  }
}));
