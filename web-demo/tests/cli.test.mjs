// A browser user and a `hush` CLI user in one conversation, both directions.

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

/** Every message the CLI has printed so far, over repeated `sync --json` runs. */
function cliInbox(carol) {
  const seen = [];
  return {
    seen,
    async sync() {
      const out = await carol.run("sync", "--json");
      for (const ev of h.jsonLines(out)) if (ev.type === "message" && !ev.outgoing) seen.push(ev);
      return seen;
    },
  };
}

test("a browser user and a CLI user talk both ways", { timeout: 180_000 }, h.diagnose(async () => {
  const alice = await h.openPage(browser, demo.url("alice"));
  const aliceCode = await h.createUser(alice, "Alice");

  const carol = h.cliUser();
  await carol.run("init", "--relay", relay.quic, "--cert-hash", relay.certHash, "--name", "Carol");
  const carolCode = (await carol.run("code")).trim().split("\n").find((l) => l.startsWith("hush-contact:"));
  assert.ok(carolCode, "the CLI prints its contact code");

  await h.addContact(alice, "Carol", carolCode);
  await carol.run("contact", "add", "Alice", aliceCode);

  // Browser → CLI.
  const hello = "Hello Carol, from a browser tab";
  await h.sendText(alice, hello);
  await h.waitMessageState(alice, hello, ["stored", "delivered", "read"]);
  const inbox = cliInbox(carol);
  const got = await h.waitUntil(
    async () => (await inbox.sync()).find((m) => m.text === hello),
    { timeout: 60_000, interval: 250, what: "the CLI to receive the browser's message" },
  );
  assert.equal(got.text, hello);

  // CLI → browser.
  const answer = "Hi Alice, Carol here (on the command line)";
  await carol.run("send", "Alice", answer);
  await h.waitMessage(alice, answer, 60_000);
  // The CLI's device stored Alice's message and said so; reading it there
  // turns Alice's badge to read.
  await h.waitMessageState(alice, hello, ["delivered", "read"], 60_000);
  await carol.run("read", "Alice");
  await h.waitMessageState(alice, hello, ["read"], 60_000);
  // Alice's page has the CLI's message open: the CLI learns it was read.
  await h.waitUntil(
    async () => {
      await inbox.sync();
      const out = await carol.run("history", "Alice", "--json");
      return h.jsonLines(out).find((m) => m.text === answer && m.state === "read");
    },
    { timeout: 60_000, interval: 250, what: "the CLI's message to show as read" },
  );

  // A second round, to show the ratchet keeps turning across implementations.
  await h.sendText(alice, "Round two 🎉");
  await h.waitUntil(
    async () => (await inbox.sync()).some((m) => m.text === "Round two 🎉"),
    { timeout: 60_000, interval: 250, what: "the CLI to receive round two" },
  );
  await carol.run("send", "Alice", "Round two received");
  await h.waitMessage(alice, "Round two received", 60_000);

  assert.deepEqual(await h.shownTexts(alice), [hello, answer, "Round two 🎉", "Round two received"]);
  assert.deepEqual(inbox.seen.map((m) => m.text), [hello, "Round two 🎉"], "the CLI got each message once, in order");
  await h.screenshot(alice, "20-browser-and-cli");
}));
