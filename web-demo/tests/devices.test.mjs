// The "My devices" panel: a user lists the devices of their account, removes
// a linked one, and the removed browser learns it and gets nothing a contact
// sends afterwards.

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

const MS = 30_000;

/** The rows of the devices panel, as the page shows them. */
function deviceRows(page) {
  return page.$$eval("[data-testid=device-list] [data-testid=device]", (rows) =>
    rows.map((r) => ({
      device: r.dataset.device,
      self: r.dataset.self === "true",
      text: r.textContent,
      removable: r.querySelector("[data-testid=remove-device]") !== null,
    })),
  );
}

async function waitDeviceCount(page, n) {
  await page.waitForFunction(
    (count) => document.querySelectorAll("[data-testid=device-list] [data-testid=device]").length === count,
    n,
    { timeout: MS },
  );
}

test("a user removes a linked device from the devices panel", { timeout: 55_000 }, h.diagnose(async () => {
  const main = await h.openPage(browser, demo.url("alice-main"));
  const aliceCode = await h.createUser(main, "Alice");
  const bob = await h.openPage(browser, demo.url("bob"));
  const bobCode = await h.createUser(bob, "Bob");
  await h.addContact(main, "Bob", bobCode);
  await h.addContact(bob, "Alice", aliceCode);

  // A second browser of Alice's joins through a link code.
  await main.click("[data-testid=link-code-button]");
  await main.waitForFunction(() => document.querySelector("[data-testid=link-code]")?.textContent.startsWith("hush-link:"), null, { timeout: MS });
  const linkCode = (await main.textContent("[data-testid=link-code]")).trim();
  const other = await h.openPage(browser, demo.url("alice-other"));
  await other.waitForSelector("[data-testid=link-input]", { state: "visible", timeout: MS });
  await other.fill("[data-testid=link-input]", linkCode);
  await other.click("[data-testid=link-device]");
  await h.waitReady(other);
  const mainId = await main.evaluate(() => window.hushDemo.client.status().device);
  const otherId = await other.evaluate(() => window.hushDemo.client.status().device);
  assert.notEqual(mainId, otherId);

  // Bob hears from the second browser, then writes to both of Alice's
  // browsers.
  await other.waitForSelector('[data-testid=conversation][data-name="Bob"]', { timeout: MS });
  await h.openConversation(other, "Bob");
  await h.sendText(other, "from the other browser");
  await h.waitMessage(bob, "from the other browser", MS);
  await h.sendText(bob, "before the removal");
  await h.waitMessage(main, "before the removal", MS);
  await h.waitMessage(other, "before the removal", MS);
  await bob.waitForFunction(() => document.querySelector("#chat-sub")?.textContent.startsWith("2 devices"), null, { timeout: MS });

  // The panel on the first browser lists both, this one marked and not removable.
  await main.click("[data-testid=devices-toggle]");
  await waitDeviceCount(main, 2);
  const rows = await deviceRows(main);
  assert.deepEqual(rows.map((r) => r.device).sort(), [mainId, otherId].sort());
  const mine = rows.find((r) => r.device === mainId);
  const theirs = rows.find((r) => r.device === otherId);
  assert.equal(mine.self, true);
  assert.match(mine.text, /this browser/);
  assert.equal(mine.removable, false);
  assert.equal(theirs.self, false);
  assert.doesNotMatch(theirs.text, /this browser/);
  assert.equal(theirs.removable, true);
  await h.screenshot(main, "50-devices-panel");

  // Remove the other browser (the page asks first; the person confirms).
  main.once("dialog", (d) => d.accept());
  await main.click(`[data-testid=device][data-device="${otherId}"] [data-testid=remove-device]`);
  await waitDeviceCount(main, 1);
  assert.deepEqual((await deviceRows(main)).map((r) => r.device), [mainId]);
  await main.waitForFunction(() => /Device removed/.test(document.querySelector("[data-testid=notice]")?.textContent ?? ""), null, { timeout: MS });
  await h.screenshot(main, "51-device-removed");

  // The removed browser is told at once: the relay cuts its open session
  // with `DeviceRemoved` (and would refuse every later login).
  await other.waitForFunction(
    () => /removed from your account/.test(document.querySelector("[data-testid=notice]")?.textContent ?? ""),
    null,
    { timeout: MS },
  );
  // It stops connecting (the relay would refuse it every time) and says so
  // instead of "retrying".
  await other.waitForSelector("[data-testid=connection][data-removed=true]", { timeout: MS });
  assert.equal((await other.textContent("[data-testid=connection]")).trim(), "Removed from this account");
  assert.equal(await other.isVisible("[data-testid=offline-toggle]"), false);
  assert.equal(await other.evaluate(() => window.hushDemo.client.status().online), false);
  await h.screenshot(other, "52-this-device-removed");

  // Bob writes (his copy of Alice's list may still name the removed
  // browser until he refreshes it): it reaches Alice's remaining browser
  // only, since the relay refuses the removed one.
  await h.sendText(bob, "after the removal");
  await h.waitMessage(main, "after the removal", MS);
  await h.waitMessageState(bob, "after the removal", ["delivered", "read"], MS);
  assert.ok(!(await h.shownTexts(other)).includes("after the removal"), "the removed browser shows a message sent after its removal");
  const status = await other.evaluate(() => window.hushDemo.client.status());
  assert.notEqual(status.state, "live", `the relay still serves the removed browser: ${JSON.stringify(status)}`);
}));
