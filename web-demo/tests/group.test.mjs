// A three-member group through the demo page: Alice creates it from her
// contacts, all three write (two of them at the same time), and every
// member's page shows the same messages in the same order; Alice sees the
// delivery state of her message per member.

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

/** Tick contacts in the New group form and create the group. */
async function createGroup(page, name, members) {
  await page.fill("[data-testid=group-name]", name);
  for (const m of members) await page.check(`[data-testid=group-pick][data-name="${m}"]`);
  await page.click("[data-testid=create-group]");
  await page.waitForSelector(`[data-testid=conversation][data-kind=group][data-name="${name}"]`, { timeout: 30_000 });
  await page.waitForFunction((n) => document.querySelector("[data-testid=chat-title]")?.textContent === n, name, { timeout: 30_000 });
}

test("three members of a group see the same messages in the same order", { timeout: 240_000 }, h.diagnose(async () => {
  const alice = await h.openPage(browser, demo.url("alice"));
  const aliceCode = await h.createUser(alice, "Alice");
  const bob = await h.openPage(browser, demo.url("bob"));
  const bobCode = await h.createUser(bob, "Bob");
  const carol = await h.openPage(browser, demo.url("carol"));
  const carolCode = await h.createUser(carol, "Carol");

  await h.addContact(alice, "Bob", bobCode);
  await h.addContact(alice, "Carol", carolCode);
  await h.addContact(bob, "Alice", aliceCode);
  await h.addContact(bob, "Carol", carolCode);
  await h.addContact(carol, "Alice", aliceCode);
  await h.addContact(carol, "Bob", bobCode);

  await createGroup(alice, "Team", ["Bob", "Carol"]);
  const members = await alice.$$eval("[data-testid=group-member]", (els) => els.map((e) => e.textContent).sort());
  assert.deepEqual(members, ["Bob", "Carol", "you"]);
  await h.screenshot(alice, "group-01-created");

  // Bob and Carol are told of the group by Alice's devices.
  for (const page of [bob, carol]) {
    await page.waitForSelector('[data-testid=conversation][data-kind=group][data-name="Team"]', { timeout: 30_000 });
    await h.openConversation(page, "Team");
  }

  await h.sendText(alice, "Welcome to the team");
  await h.waitMessage(bob, "Welcome to the team");
  await h.waitMessage(carol, "Welcome to the team");
  // Bob and Carol answer at the same time: concurrent messages.
  await Promise.all([h.sendText(bob, "Thanks Alice"), h.sendText(carol, "Hi all")]);
  // Alice answers once she has read both.
  await h.waitMessage(alice, "Thanks Alice");
  await h.waitMessage(alice, "Hi all");
  await h.sendText(alice, "Meeting at 10");

  const all = ["Welcome to the team", "Thanks Alice", "Hi all", "Meeting at 10"];
  for (const page of [alice, bob, carol]) {
    for (const t of all) await h.waitMessage(page, t, 60_000);
  }
  // The group order settles to one order on every page (a page may briefly
  // show its own message last until the others' positions are known).
  let shown;
  await h.waitUntil(
    async () => {
      shown = await Promise.all([alice, bob, carol].map((p) => h.shownTexts(p)));
      return shown.every((s) => JSON.stringify(s) === JSON.stringify(shown[0]));
    },
    { timeout: 30_000, what: "the same order on every page" },
  );
  assert.equal(shown[0].length, 4, `each message once: ${JSON.stringify(shown)}`);
  assert.deepEqual([...shown[0]].sort(), [...all].sort());
  assert.equal(shown[0][0], "Welcome to the team", "what everyone saw first stays first");
  assert.equal(shown[0][3], "Meeting at 10", "Alice wrote it after seeing both answers");
  // Every history agrees too (not only the pages).
  const ids = await Promise.all(
    [alice, bob, carol].map((p) =>
      p.evaluate(async () => {
        const d = window.hushDemo;
        return (await d.client.history(d.state.current)).map((e) => e.id);
      }),
    ),
  );
  assert.deepEqual(ids[1], ids[0]);
  assert.deepEqual(ids[2], ids[0]);

  // Authors are named on received messages.
  const authors = await carol.$$eval("[data-testid=message][data-direction=in]", (els) =>
    els.map((m) => [m.querySelector("[data-testid=message-author]")?.textContent, m.querySelector("[data-testid=message-text]").textContent]),
  );
  assert.deepEqual(Object.fromEntries(authors.map(([a, t]) => [t, a])), {
    "Welcome to the team": "Alice",
    "Thanks Alice": "Bob",
    "Meeting at 10": "Alice",
  });

  // Alice sees her first message's state per member: both pages stored
  // it, and both had the group open, so it becomes read by each.
  await alice.waitForFunction(
    () => {
      const m = [...document.querySelectorAll("[data-testid=message][data-direction=out]")].find(
        (x) => x.querySelector("[data-testid=message-text]").textContent === "Welcome to the team",
      );
      const states = [...(m?.querySelectorAll("[data-testid=member-states] [data-state]") ?? [])].map((s) => `${s.dataset.name}:${s.dataset.state}`).sort();
      return states.join(",") === "Bob:read,Carol:read";
    },
    null,
    { timeout: 60_000 },
  );
  await h.screenshot(alice, "group-02-alice");
  await h.screenshot(carol, "group-03-carol");

  for (const page of [alice, bob, carol]) {
    const counters = await page.evaluate(() => window.hushDemo.client.counters());
    assert.equal(counters.unrecoverable, 0, "nothing lost");
    assert.deepEqual(await page.evaluate(() => window.hushDemo.log.errors), []);
  }
}));
