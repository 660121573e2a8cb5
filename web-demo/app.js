// Hush demo chat page.
//
// Plain ES module on top of the `hush-client` WebAssembly package in ./pkg/.
// Everything the engine does (encryption, ordering, gap repair, receipts)
// happens inside the package; this file only turns its events into a page.
//
// Where the relay is: `GET /relay.json` ({"quic": "host:port",
// "certificateSha256": "hex"}) or `GET /certificate.sha256` on this page's
// origin (what `hush-relay --http ADDR --demo` serves), or the query
// parameters `?relay=host:port&hash=hex`.
// `?storage=NAME` picks the browser storage (one storage = one device), so
// two tabs with different names are two devices.

const PAGE_SIZE = 100;
const UNREAD_SCAN = 500;
/**
 * Most messages kept on the page for the open conversation. New messages
 * arriving while the view follows the end push the oldest out (they stay
 * one "Show earlier messages" away), so a backlog of 100,000 costs the page
 * a few hundred elements, not 100,000.
 */
const MAX_SHOWN = 300;
/** How far back a tail refresh looks for the last message already shown. */
const TAIL_SCAN = 3;
/** How many pages back a group refresh reads to reach the oldest message shown. */
const GROUP_REFRESH_PAGES = 3;
/** While a backlog syncs, the open conversation is re-read at most this often. */
const SYNC_TAIL_MS = 400;

const $ = (id) => document.getElementById(id);

const params = new URLSearchParams(location.search);
const storage = params.get("storage") || "default";
const prefsKey = (what) => `hush-demo:${storage}:${what}`;

/** Everything the page knows, in one place. */
const state = {
  client: null,
  config: null,
  offline: false,
  connection: "offline",
  /**
   * conversation id → { conversation, name, user, devices, unread, epoch, gap },
   * and for groups also { group: true, members: [{ user, name }], active }.
   */
  conversations: new Map(),
  current: null,
  /** Messages shown for the current conversation: id → { entry, el }. */
  shown: new Map(),
  oldestOrder: null,
  /** A group: the id of the oldest message shown (pages go back from it). */
  groupOldest: null,
  /** Latest delivery state seen per message id (events may beat `send`'s promise). */
  states: new Map(),
  /** While a conversation's history loads, events for it wait here. */
  loading: null,
  /** device id → user id (persisted: rotation events name only the device). */
  deviceOwner: loadPref("devices", {}),
  /** device id → epoch of rotations whose owner is not known yet. */
  pendingRotations: new Map(),
  epochs: loadPref("epochs", {}),
  readTimer: null,
  progressHide: null,
  /** The open conversation's newest messages need reading from history. */
  tailDirty: false,
  tailRunning: false,
  tailAt: 0,
  /** What the next animation frame redraws. */
  dirty: { conversations: false, progress: false, health: false, epoch: false },
  frameQueued: false,
  epochBump: false,
  /** The latest sync progress, drawn once per frame. */
  progress: null,
};

/** A record of what happened, for people debugging and for the browser tests. */
const log = { progress: [], history: [], gaps: [], rotations: [], connection: [], states: [], errors: [] };

window.hushDemo = { state, log, get client() { return state.client; } };

function loadPref(what, fallback) {
  try {
    const raw = localStorage.getItem(prefsKey(what));
    return raw ? JSON.parse(raw) : fallback;
  } catch {
    return fallback;
  }
}

function savePref(what, value) {
  try {
    localStorage.setItem(prefsKey(what), JSON.stringify(value));
  } catch {
    // Private mode or a full quota: the page still works, it only forgets.
  }
}

// ---------------------------------------------------------------------------
// Small view helpers
// ---------------------------------------------------------------------------

function show(el, visible) {
  el.hidden = !visible;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

// Formatters made once (toLocale*String builds one per call).
const TIME_FORMAT = new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit" });
const DATE_FORMAT = new Intl.DateTimeFormat([], { month: "short", day: "numeric" });

function formatTime(ms) {
  const d = new Date(ms);
  const now = new Date();
  const sameDay = d.toDateString() === now.toDateString();
  const time = TIME_FORMAT.format(d);
  return sameDay ? time : `${DATE_FORMAT.format(d)} ${time}`;
}

function notice(text, kind = "error") {
  $("notice-text").textContent = text;
  $("notice").dataset.kind = kind;
  show($("notice"), true);
  if (kind === "error") log.errors.push(text);
}

function describeError(e) {
  if (e && typeof e === "object" && "message" in e) {
    return e.code ? `${e.message} (${e.code})` : e.message;
  }
  return String(e);
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard permission: select the text so Ctrl-C works.
    const range = document.createRange();
    range.selectNodeContents(button.previousElementSibling);
    const sel = getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }
  button.classList.add("done");
  button.textContent = "Copied";
  setTimeout(() => {
    button.classList.remove("done");
    button.textContent = "Copy";
  }, 1200);
}

// ---------------------------------------------------------------------------
// Start-up: find the relay, load the package, open the storage
// ---------------------------------------------------------------------------

/** The relay's WebTransport URL and certificate hash. */
async function relayConfig() {
  let address = params.get("relay");
  let hash = params.get("hash");
  // The WebSocket fallback: a page on http:// (the demo's own listener)
  // takes the plain ws:// upgrade of its origin, which needs no trusted
  // certificate; a page on https:// takes wss://.
  let websocketUrl = params.get("ws") || undefined;
  if (!address) {
    try {
      const res = await fetch("/relay.json", { cache: "no-store" });
      if (res.ok) {
        const info = await res.json();
        address = info.quic || null;
        hash = hash || info.certificateSha256 || null;
        websocketUrl =
          websocketUrl ||
          (location.protocol === "https:" ? info.websocket : info.websocketPlain || info.websocket) ||
          undefined;
      }
    } catch {
      // Served by something other than the relay: fall through.
    }
  }
  if (!hash) {
    try {
      const res = await fetch("/certificate.sha256", { cache: "no-store" });
      if (res.ok) hash = (await res.text()).trim();
    } catch {
      // No hash: only works with a certificate the browser already trusts.
    }
  }
  if (!address && hash && !params.get("hash")) {
    // Served by a relay that does not describe itself: try its default port.
    address = `${location.hostname}:4433`;
    console.warn(`hush: no /relay.json; trying the relay's default address ${address}`);
  }
  if (!address) {
    throw new Error(
      "Cannot find the relay: this page was not served by hush-relay (no /relay.json). " +
        "Add ?relay=HOST:PORT&hash=HEX to the address.",
    );
  }
  // A relay bound to every interface names itself 0.0.0.0: reach it the way
  // this page was reached.
  address = address.replace(/^(0\.0\.0\.0|\[::\])(?=:\d+$)/, location.hostname);
  return { relayUrl: `https://${address}/`, relay: address, certHash: hash || undefined, websocketUrl };
}

/** The package's WebAssembly module, relative to this page. */
const WASM_PATH = "./pkg/hush_client_bg.wasm";

/**
 * The Subresource Integrity hash the page pins for `path`: the import map's
 * `integrity` table (which also pins the package's JS glue for `import()`).
 */
function pinnedIntegrity(path) {
  const map = document.querySelector('script[type="importmap"]');
  const value = map && JSON.parse(map.textContent).integrity?.[path];
  if (!value) {
    throw new Error(`this page pins no integrity hash for ${path}: build it with \`cargo xtask build-wasm\``);
  }
  return value;
}

async function start() {
  $("storage-name").textContent = storage;
  // The browser refused a file the page pins (index.html): do not start
  // on a page that is not the one its hashes describe. Module scripts do
  // not wait for stylesheets, so wait for the stylesheet's verdict first.
  await window.hushStylesChecked;
  if (window.hushRefusedFiles?.length) return;
  let Client;
  try {
    // Both fetches are checked against the page's hashes: the import map
    // pins the JS glue, and the .wasm is fetched with its integrity.
    const wasm = fetch(WASM_PATH, { integrity: pinnedIntegrity(WASM_PATH) });
    const pkg = await import("./pkg/hush_client.js");
    await pkg.default({ module_or_path: wasm });
    Client = pkg.Client;
  } catch (e) {
    failStart(
      `The Hush client package did not load, or its bytes do not match this page's integrity hashes ` +
        `(${describeError(e)}). Build it with \`cargo xtask build-wasm\`.`,
    );
    return;
  }
  window.hushDemo.Client = Client;
  try {
    state.config = await relayConfig();
  } catch (e) {
    failStart(describeError(e));
    return;
  }
  $("relay-name").textContent = state.config.relay;

  // An existing device opens without a name; an empty storage refuses, and
  // the page asks who the user is.
  try {
    const client = await Client.open({ ...connectOptions() });
    await enter(client);
  } catch (e) {
    if (e && e.code === "invalid_argument" && /holds no device/.test(e.message)) {
      showOnboarding();
    } else if (e && e.code === "self_test") {
      failStart(`This browser's copy of Hush failed its encryption self-test, so it refuses to run: ${describeError(e)}`);
    } else if (e && e.code === "locked") {
      failStart(`Storage “${storage}” is open in another tab. Close it, or use ?storage=another-name.`);
    } else {
      failStart(`Could not open storage “${storage}”: ${describeError(e)}`);
    }
  }
}

function connectOptions() {
  return {
    storage,
    relayUrl: state.config.relayUrl,
    certHash: state.config.certHash,
    websocketUrl: state.config.websocketUrl,
  };
}

function failStart(text) {
  $("loading-text").textContent = text;
  $("loading").classList.add("failed");
  $("loading").dataset.failed = "true";
}

function showOnboarding() {
  show($("loading"), false);
  show($("onboarding"), true);
  $("user-name").focus();
}

async function createUser(event) {
  event.preventDefault();
  const name = $("user-name").value.trim();
  if (!name) return;
  await withBusy(event.submitter, async () => {
    const client = await window.hushDemo.Client.open({ ...connectOptions(), name });
    await enter(client);
  });
}

async function linkDevice(event) {
  event.preventDefault();
  const code = $("link-input").value.trim();
  if (!code) return;
  await withBusy(event.submitter, async () => {
    const client = await window.hushDemo.Client.link({ ...connectOptions(), code });
    await enter(client);
  });
}

async function withBusy(button, fn) {
  if (button) button.disabled = true;
  try {
    await fn();
  } catch (e) {
    notice(describeError(e));
  } finally {
    if (button) button.disabled = false;
  }
}

/** The client is open: wire its events and show the app. */
async function enter(client) {
  state.client = client;
  // `messages` (one summary per engine step), not `message`: the page reads
  // what it shows from history, once per animation frame, so a backlog of
  // any size costs it the same few reads.
  client.on("messages", onMessages);
  client.on("state", onState);
  client.on("removed", onRemoved);
  client.on("read", onReadSynced);
  client.on("progress", onProgress);
  client.on("gap", onGap);
  client.on("rotation", onRotation);
  client.on("connection", (ev) => setConnection(ev.state));
  client.on("contact", () => refreshConversations());
  client.on("group", onGroup);
  client.on("devices", onDevices);
  client.on("linked", (ev) => {
    if (ev.self) notice("This browser is now linked to your account.", "info");
    else notice("A new device joined your account.", "info");
    refreshConversations();
  });
  client.on("history", onHistory);
  client.on("device_removed", onThisDeviceRemoved);
  client.on("retired", () => notice("This browser had been away long enough to be retired: messages sent meanwhile did not reach it.", "info"));
  client.on("warning", (ev) => console.warn("hush:", ev.message));
  for (const kind of ["messages", "state", "removed", "read", "gap", "connection", "devices", "linked", "error"]) {
    client.on(kind, scheduleHealth);
  }
  client.on("error", (ev) => {
    if (ev.fatal) notice(`The client stopped: ${ev.message}`);
    else console.warn("hush: recovered from", ev.code, ev.message);
  });

  const status = client.status();
  $("who").textContent = status.name;
  $("who").title = `device ${status.device.slice(0, 12)}… on ${status.relay}`;
  show($("who"), true);
  $("contact-code").textContent = client.contactCode();
  state.offline = status.online === false;
  setConnection(status.state);
  show($("conn"), true);
  show($("offline-toggle"), true);
  renderOfflineToggle();

  show($("loading"), false);
  show($("onboarding"), false);
  show($("app"), true);
  document.title = `${status.name} — Hush`;

  await refreshConversations();
  const first = [...state.conversations.keys()][0];
  const wanted = params.get("chat");
  const pick = [...state.conversations.values()].find((c) => c.name === wanted)?.conversation ?? first;
  if (pick) await selectConversation(pick);
  document.body.dataset.ready = "true";
}

// ---------------------------------------------------------------------------
// Connection, offline toggle, sync progress
// ---------------------------------------------------------------------------

const CONNECTION_TEXT = {
  offline: "Offline",
  connecting: "Connecting…",
  syncing: "Syncing…",
  live: "Connected",
};

function setConnection(s) {
  state.connection = s;
  log.connection.push(s);
  const pill = $("conn");
  pill.dataset.state = s;
  let text = CONNECTION_TEXT[s] ?? s;
  if (s === "offline") text = state.offline ? "Offline (paused)" : "Offline, retrying…";
  // The relay refuses a removed device for good: no retrying to show.
  if (state.removed) text = "Removed from this account";
  pill.dataset.removed = String(state.removed === true);
  // Which transport won the race (WebTransport or the WebSocket fallback).
  let transport = null;
  try {
    transport = s === "offline" ? null : (state.client?.status().transport ?? null);
  } catch {
    // A closed client has no status.
  }
  pill.dataset.transport = transport ?? "";
  if (transport) text += transport === "websocket" ? " · WebSocket" : " · WebTransport";
  pill.querySelector(".conn-text").textContent = text;
  if (s === "live") {
    renderProgress();
    finishProgress();
    scheduleMarkRead();
  }
}

/**
 * This browser was removed by another device of its user: the relay will
 * refuse every connection from now on, so stop trying and say so.
 */
function onThisDeviceRemoved() {
  state.removed = true;
  state.offline = true;
  try {
    state.client.setOnline(false);
  } catch {
    // A closed client does not connect anyway.
  }
  show($("offline-toggle"), false);
  setConnection(state.connection);
  notice("This browser was removed from your account: it receives nothing new.", "error");
}

function renderOfflineToggle() {
  const t = $("offline-toggle");
  t.setAttribute("aria-checked", String(state.offline));
  t.querySelector(".switch-label").textContent = state.offline ? "Offline" : "Go offline";
  t.title = state.offline ? "Reconnect to the relay" : "Cut the connection to the relay";
}

function toggleOffline() {
  if (!state.client) return;
  state.offline = !state.offline;
  try {
    state.client.setOnline(!state.offline);
  } catch (e) {
    state.offline = !state.offline;
    notice(describeError(e));
  }
  renderOfflineToggle();
  setConnection(state.connection);
}

/** History import on a newly linked browser: "importing N of M". */
function onHistory({ done, total }) {
  log.history.push({ done, total });
  notice(
    done < total
      ? `Importing your history: ${done} of ${total} messages…`
      : `History imported: ${total} messages.`,
    "info",
  );
  if (done >= total) refreshConversations();
}

function onProgress({ done, total }) {
  log.progress.push({ done, total });
  state.progress = { done, total };
  redraw("progress");
}

/** Draw the latest progress (once per frame, however many events came). */
function renderProgress() {
  if (!state.progress) return;
  const { done, total } = state.progress;
  state.progress = null;
  const bar = $("sync-progress");
  clearTimeout(state.progressHide);
  bar.dataset.done = String(done);
  bar.dataset.total = String(total);
  bar.setAttribute("aria-valuemax", String(total));
  bar.setAttribute("aria-valuenow", String(done));
  const pct = total > 0 ? Math.min(100, (done / total) * 100) : 0;
  $("sync-fill").style.width = `${pct}%`;
  if (done < total) {
    bar.dataset.phase = "syncing";
    $("sync-text").textContent = `syncing ${done} of ${total}`;
    show(bar, true);
  } else {
    if (bar.hidden && total > 0) {
      // The whole backlog drained between two frames (a fast sync, or a
      // page busy decrypting it): no "syncing" step was drawn, but the
      // user is still told what arrived.
      bar.dataset.phase = "syncing";
      show(bar, true);
    }
    finishProgress();
  }
}

/** The backlog is drained: say so briefly, then fold the bar away. */
function finishProgress() {
  const bar = $("sync-progress");
  if (bar.hidden || bar.dataset.phase === "done") return;
  const total = Number(bar.dataset.total);
  bar.dataset.phase = "done";
  bar.dataset.done = String(total);
  $("sync-fill").style.width = "100%";
  $("sync-text").textContent = `caught up: ${plural(total, "message", "messages")} synced`;
  clearTimeout(state.progressHide);
  state.progressHide = setTimeout(() => show(bar, false), 4000);
}

// ---------------------------------------------------------------------------
// Conversations
// ---------------------------------------------------------------------------

async function refreshConversations() {
  const list = state.client.conversations();
  for (const c of list) {
    const known = state.conversations.get(c.conversation);
    if (known) {
      Object.assign(known, { name: c.name, user: c.user, devices: c.devices });
    } else {
      state.conversations.set(c.conversation, {
        ...c,
        unread: 0,
        epoch: state.epochs[c.conversation] ?? null,
        gap: null,
      });
      countUnread(c.conversation);
    }
  }
  for (const g of state.client.groups()) {
    const fields = { name: g.name, group: true, members: g.members, active: g.active, devices: 0 };
    const known = state.conversations.get(g.group);
    if (known) {
      Object.assign(known, fields);
    } else {
      state.conversations.set(g.group, { conversation: g.group, ...fields, unread: 0, epoch: null, gap: null });
      countUnread(g.group);
    }
  }
  applyPendingRotations();
  renderConversations();
  renderChatHeader();
  renderGroupPicks();
}

function renderChatHeader() {
  const c = state.conversations.get(state.current);
  if (!c) return;
  $("chat-title").textContent = c.name;
  show($("group-members"), Boolean(c.group));
  show($("group-manage"), Boolean(c.group && c.active));
  show($("leave-group"), Boolean(c.group && c.active));
  $("composer").disabled = Boolean(c.group && !c.active);
  $("chat").dataset.kind = c.group ? "group" : "contact";
  if (c.group) {
    $("chat-sub").textContent = c.active
      ? `group of ${plural(c.members.length, "member", "members")} · end-to-end encrypted to each`
      : "you are no longer a member · history stays here";
    $("group-members").replaceChildren(...c.members.map((m) => memberChip(c, m)));
    renderGroupManage(c);
    return;
  }
  $("chat-sub").textContent =
    c.devices > 0 ? `${plural(c.devices, "device", "devices")} · end-to-end encrypted` : "end-to-end encrypted";
}

/** A member as shown: "you", the contact's name, or a short key. */
function memberName(m) {
  if (m.name === "me") return "you";
  return m.name ?? `user ${m.user.slice(0, 8)}…`;
}

/** Unread = received and not yet read, counted over the newest messages. */
async function countUnread(conv) {
  try {
    const entries = await state.client.history(conv, { limit: UNREAD_SCAN });
    const c = state.conversations.get(conv);
    if (!c) return;
    c.unread = conv === state.current && pageIsSeen() ? 0 : entries.filter((e) => !e.outgoing && !e.read).length;
    for (const e of entries) if (!e.outgoing) noteDevice(e.fromDevice, e.fromUser);
    renderConversations();
  } catch (e) {
    console.warn("hush: unread count failed", e);
  }
}

function renderConversations() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of state.conversations.values()) {
    const gapPending = c.gap && c.gap.kind === "detected";
    const item = el(
      "li",
      {},
      el(
        "button",
        {
          type: "button",
          class: `conversation${c.conversation === state.current ? " active" : ""}`,
          "data-testid": "conversation",
          "data-name": c.name,
          "data-kind": c.group ? "group" : "contact",
          "data-conversation": c.conversation,
          "aria-current": c.conversation === state.current ? "true" : null,
          onclick: () => selectConversation(c.conversation),
        },
        el("span", { class: `avatar${c.group ? " group" : ""}`, "aria-hidden": "true", text: c.group ? "#" : initials(c.name) }),
        el("span", { class: "conversation-name", text: c.name }),
        gapPending ? el("span", { class: "gap-dot", title: "Missing messages are being recovered", text: "⚠" }) : null,
        c.unread > 0
          ? el("span", { class: "unread", "data-testid": "unread", "aria-label": `${c.unread} unread`, text: String(c.unread) })
          : null,
      ),
    );
    ul.append(item);
  }
  show($("no-conversations"), state.conversations.size === 0);
}

function initials(name) {
  return (name || "?").trim().split(/\s+/).map((w) => w[0]).join("").slice(0, 2).toUpperCase();
}

async function selectConversation(conv) {
  const c = state.conversations.get(conv);
  if (!c) return;
  state.current = conv;
  state.shown.clear();
  state.tailDirty = false;
  state.oldestOrder = null;
  state.groupOldest = null;
  $("messages").replaceChildren();
  show($("chat-empty"), false);
  show($("chat"), true);
  renderChatHeader();
  renderEpoch(false);
  renderGap();
  renderConversations();

  // Messages stored while the page is read are picked up by a tail
  // refresh afterwards.
  state.loading = { conv };
  try {
    // A group pages through its group order (the same on every member's
    // device), a contact through arrival order.
    const entries = c.group
      ? await state.client.groupHistory(conv, { limit: PAGE_SIZE })
      : await state.client.history(conv, { limit: PAGE_SIZE });
    if (state.current !== conv) return;
    for (const e of entries) {
      if (!e.outgoing) noteDevice(e.fromDevice, e.fromUser);
      appendMessage(e);
    }
    state.oldestOrder = entries.length ? entries[0].order : null;
    state.groupOldest = c.group && entries.length ? entries[0].id : null;
    show($("load-earlier"), entries.length === PAGE_SIZE);
  } catch (e) {
    notice(`Could not read the history: ${describeError(e)}`);
  } finally {
    if (state.loading?.conv === conv) state.loading = null;
  }
  if (state.tailDirty) scheduleTail();
  scrollToEnd();
  c.unread = 0;
  renderConversations();
  scheduleMarkRead();
  $("composer").focus();
}

async function loadEarlier() {
  const conv = state.current;
  if (state.conversations.get(conv)?.group) return loadEarlierGroup(conv);
  if (!conv || state.oldestOrder == null) return;
  const scroller = $("messages-scroll");
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  const entries = await state.client.history(conv, { before: state.oldestOrder, limit: PAGE_SIZE });
  if (state.current !== conv) return;
  const first = $("messages").firstElementChild;
  for (const e of entries) {
    if (state.shown.has(e.id)) continue;
    const node = messageElement(e);
    state.shown.set(e.id, { entry: e, el: node });
    $("messages").insertBefore(node, first);
  }
  state.oldestOrder = entries.length ? entries[0].order : state.oldestOrder;
  show($("load-earlier"), entries.length === PAGE_SIZE);
  scroller.scrollTop = scroller.scrollHeight - fromBottom;
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

function messageState(entry) {
  if (entry.outgoing) return state.states.get(entry.id) ?? entry.state ?? "sending";
  // Received messages: delivered here, and read once seen.
  return entry.read ? "read" : "delivered";
}

const STATE_LABEL = {
  sending: "sending",
  stored: "stored on relay",
  delivered: "delivered",
  read: "read",
  failed: "failed",
  "recipient-inbox-full": "recipient's inbox is full, will retry",
};
const STATE_ICON = {
  sending: "◌",
  stored: "✓",
  delivered: "✓✓",
  read: "✓✓",
  failed: "!",
  "recipient-inbox-full": "⏸",
};

function messageElement(entry) {
  const s = messageState(entry);
  const li = el("li", {
    class: `message ${entry.outgoing ? "out" : "in"}`,
    "data-testid": "message",
    "data-id": entry.id,
    "data-state": s,
    "data-direction": entry.outgoing ? "out" : "in",
  });
  const bubble = el("div", { class: "bubble" });
  const inGroup = state.conversations.get(entry.conversation)?.group;
  if (inGroup && !entry.outgoing) {
    bubble.append(el("span", { class: "author", "data-testid": "message-author", text: entry.from ?? `user ${(entry.fromUser ?? "").slice(0, 8)}…` }));
  }
  bubble.append(el("p", { class: "text", "data-testid": "message-text", text: entry.text }));
  const meta = el("div", { class: "meta" }, el("time", { datetime: new Date(entry.sentAt).toISOString(), text: formatTime(entry.sentAt) }));
  if (entry.outgoing) {
    meta.append(
      el("span", { class: "badge", "data-testid": "state-badge", title: STATE_LABEL[s], text: `${STATE_ICON[s]} ${STATE_LABEL[s]}` }),
    );
  }
  bubble.append(meta);
  if (inGroup && entry.outgoing) bubble.append(memberStatesElement(entry.id));
  const actions = el("div", { class: "actions" });
  if (entry.outgoing) {
    actions.append(
      el("button", { type: "button", class: "retry", "data-testid": "retry", hidden: s !== "failed", onclick: () => retry(entry.id) }, "Retry"),
      el("button", { type: "button", class: "ghost", title: "Delete for everyone", onclick: () => recall(entry.id) }, "Recall"),
    );
  }
  actions.append(el("button", { type: "button", class: "ghost", title: "Delete on my devices", onclick: () => deleteMessage(entry.id) }, "Delete"));
  li.append(bubble, actions);
  return li;
}

/** Per-member states of one of this user's group messages: "✓✓ Bob · ✓ Carol". */
function memberStatesElement(id) {
  const span = el("span", { class: "member-states", "data-testid": "member-states" });
  fillMemberStates(span, id);
  return span;
}

function fillMemberStates(span, id) {
  let states = [];
  try {
    states = state.client.memberStates(id);
  } catch {
    // Not known yet (the send is still being stored): filled on its first state event.
  }
  span.dataset.states = states.map((m) => `${m.name ?? m.user}:${m.state}`).join(",");
  span.replaceChildren(
    ...states.map((m) =>
      el("span", { class: `member-state ${m.state}`, "data-name": m.name ?? "", "data-state": m.state, title: `${memberName(m)}: ${STATE_LABEL[m.state]}`, text: `${STATE_ICON[m.state]} ${memberName(m)}` }),
    ),
  );
}

function appendMessage(entry) {
  if (state.shown.has(entry.id)) return;
  const node = messageElement(entry);
  state.shown.set(entry.id, { entry, el: node });
  $("messages").append(node);
}

function setMessageState(id, s) {
  const shown = state.shown.get(id);
  if (!shown || !shown.entry.outgoing) return;
  const li = shown.el;
  li.dataset.state = s;
  const badge = li.querySelector(".badge");
  if (badge) {
    badge.textContent = `${STATE_ICON[s]} ${STATE_LABEL[s]}`;
    badge.title = STATE_LABEL[s];
  }
  const retryButton = li.querySelector(".retry");
  if (retryButton) retryButton.hidden = s !== "failed";
}

function scrollToEnd() {
  const scroller = $("messages-scroll");
  scroller.scrollTop = scroller.scrollHeight;
}

function nearEnd() {
  const s = $("messages-scroll");
  return s.scrollHeight - s.scrollTop - s.clientHeight < 120;
}

function pageIsSeen() {
  return document.visibilityState === "visible";
}

/** One engine step stored messages: count them, redraw on the next frame. */
function onMessages(ev) {
  let unknown = false;
  for (const c of ev.conversations) {
    const conv = state.conversations.get(c.conversation);
    if (!conv) {
      // A contact added on another device of this user.
      unknown = true;
    } else if (c.conversation === state.current) {
      scheduleTail();
    } else if (c.incoming > 0) {
      conv.unread += c.incoming;
      redraw("conversations");
    }
  }
  if (unknown) refreshConversations();
}

function onState(ev) {
  log.states.push(ev);
  state.states.set(ev.id, ev.state);
  setMessageState(ev.id, ev.state);
  const span = state.shown.get(ev.id)?.el.querySelector("[data-testid=member-states]");
  if (span) fillMemberStates(span, ev.id);
  if (ev.conversation === state.current && !state.shown.has(ev.id)) {
    // Sent by this device but not through the composer (another part of
    // the app, the console): pick it up from history.
    scheduleTail();
  }
}

/** Read the open conversation's newest messages on the next frame. */
function scheduleTail() {
  state.tailDirty = true;
  redraw();
}

/**
 * Merge the newest history into the list: walk back from the newest entry
 * until one already shown with a known position, then insert what is
 * missing in order. If more arrived than a few pages (a backlog), the list
 * restarts from the newest page; the rest is one "Show earlier" away.
 */
async function refreshTail() {
  const conv = state.current;
  if (!conv || !state.client || state.loading || state.tailRunning) return;
  if (state.conversations.get(conv)?.group) return refreshGroup(conv);
  state.tailDirty = false;
  state.tailRunning = true;
  const collected = []; // newest first, shown entries included as anchors
  let anchored = false;
  let before;
  try {
    walk: for (let i = 0; i < TAIL_SCAN; i++) {
      const page = await state.client.history(conv, { before, limit: PAGE_SIZE });
      if (state.current !== conv) return;
      for (let j = page.length - 1; j >= 0; j--) {
        const e = page[j];
        const shown = state.shown.get(e.id);
        if (shown) {
          const placed = shown.entry.order != null;
          shown.entry.order = e.order;
          if (placed) {
            anchored = true;
            break walk;
          }
        }
        collected.push(e);
        if (state.oldestOrder != null && e.order <= state.oldestOrder) {
          anchored = true;
          break walk;
        }
      }
      if (page.length < PAGE_SIZE) {
        anchored = true;
        break;
      }
      before = page[0].order;
    }
  } catch (e) {
    console.warn("hush: history refresh failed", e);
    return;
  } finally {
    state.tailRunning = false;
    if (state.tailDirty) redraw();
  }
  const stick = nearEnd();
  if (!anchored) {
    // A backlog: show its newest page only.
    state.shown.clear();
    $("messages").replaceChildren();
    collected.length = Math.min(collected.length, PAGE_SIZE);
  }
  let next = null; // the node the entry being placed goes before (null: the end)
  const bulk = collected.length > 10;
  for (const e of collected) {
    const shown = state.shown.get(e.id);
    if (shown) {
      next = shown.el;
      continue;
    }
    if (!e.outgoing) noteDevice(e.fromDevice, e.fromUser);
    const node = messageElement(e);
    // Dozens of bubbles popping in at once are noise, and style work.
    if (bulk) node.classList.add("quiet");
    state.shown.set(e.id, { entry: e, el: node });
    $("messages").insertBefore(node, next);
    next = node;
  }
  if (!anchored) {
    state.oldestOrder = collected.length ? collected[collected.length - 1].order : null;
    show($("load-earlier"), collected.length > 0);
  }
  if (stick || !anchored) {
    trimShown();
    scrollToEnd();
  }
  if (collected.some((e) => !e.outgoing)) scheduleMarkRead();
}

/**
 * A group's newest messages, re-read whole back to the oldest one shown: a
 * message may take its place before others already shown (the group order
 * is causal, the same on every member's device), so the list is rebuilt in
 * the group order, keeping the elements already shown. Pages read back
 * from the newest through `groupHistory` fit together; if the oldest shown
 * message is more than GROUP_REFRESH_PAGES pages back (a backlog), the
 * list restarts from the newest page.
 */
async function refreshGroup(conv) {
  state.tailDirty = false;
  state.tailRunning = true;
  let entries;
  let restarted = false;
  try {
    entries = await state.client.groupHistory(conv, { limit: PAGE_SIZE });
    const oldest = state.groupOldest;
    let pages = 1;
    while (oldest && entries.length && !entries.some((e) => e.id === oldest)) {
      if (pages === GROUP_REFRESH_PAGES) {
        entries = entries.slice(-PAGE_SIZE);
        restarted = true;
        break;
      }
      const earlier = await state.client.groupHistory(conv, { before: entries[0].id, limit: PAGE_SIZE });
      if (state.current !== conv) return;
      if (earlier.length === 0) break;
      entries = earlier.concat(entries);
      pages += 1;
    }
    // Keep the list starting where it started (what is before it is one
    // "Show earlier" away).
    const at = oldest ? entries.findIndex((e) => e.id === oldest) : -1;
    if (at > 0) entries = entries.slice(at);
  } catch (e) {
    console.warn("hush: group history refresh failed", e);
    return;
  } finally {
    state.tailRunning = false;
    if (state.tailDirty) redraw();
  }
  if (state.current !== conv) return;
  const stick = nearEnd();
  const shown = new Map();
  const nodes = [];
  let incoming = false;
  for (const e of entries) {
    const old = state.shown.get(e.id);
    const node = old ? old.el : messageElement(e);
    if (old) Object.assign(old.entry, { order: e.order });
    else if (!e.outgoing) incoming = true;
    shown.set(e.id, old ?? { entry: e, el: node });
    nodes.push(node);
  }
  state.shown = shown;
  $("messages").replaceChildren(...nodes);
  state.oldestOrder = null;
  if (!state.groupOldest || restarted) {
    state.groupOldest = entries.length ? entries[0].id : null;
    show($("load-earlier"), entries.length >= PAGE_SIZE);
  }
  if (stick || restarted) scrollToEnd();
  if (incoming) scheduleMarkRead();
}

/** "Show earlier" in a group: the page just before the oldest shown, in the group order. */
async function loadEarlierGroup(conv) {
  if (!state.groupOldest) return;
  const scroller = $("messages-scroll");
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  let entries;
  try {
    entries = await state.client.groupHistory(conv, { before: state.groupOldest, limit: PAGE_SIZE });
  } catch (e) {
    notice(`Could not read the history: ${describeError(e)}`);
    return;
  }
  if (state.current !== conv) return;
  const first = $("messages").firstElementChild;
  for (const e of entries) {
    if (state.shown.has(e.id)) continue;
    if (!e.outgoing) noteDevice(e.fromDevice, e.fromUser);
    const node = messageElement(e);
    state.shown.set(e.id, { entry: e, el: node });
    $("messages").insertBefore(node, first);
  }
  if (entries.length) state.groupOldest = entries[0].id;
  show($("load-earlier"), entries.length === PAGE_SIZE);
  scroller.scrollTop = scroller.scrollHeight - fromBottom;
}

/**
 * A member's chip in a group's header; others get a ✕ to remove them (drawn
 * by CSS, so the chip's text stays the member's name).
 */
function memberChip(c, m) {
  const chip = el("li", { class: "group-member", "data-testid": "group-member", "data-name": m.name ?? "", "data-user": m.user, text: memberName(m) });
  if (c.active && m.name !== "me") {
    const who = memberName(m);
    const button = el("button", { type: "button", class: "remove-member", "data-testid": "remove-member", "data-name": m.name ?? "", title: `Remove ${who}`, "aria-label": `Remove ${who}` });
    button.addEventListener("click", () => removeMember(c.conversation, m));
    chip.append(button);
  }
  return chip;
}

/** The group header's manage panel: rename, and contacts to add. */
function renderGroupManage(c) {
  if (!c.active) return;
  const rename = $("group-rename");
  if (document.activeElement !== rename) rename.value = c.name;
  const box = $("add-member-picks");
  const picked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  const members = new Set(c.members.map((m) => m.user));
  const contacts = [...state.conversations.values()].filter((x) => !x.group && !members.has(x.user));
  box.querySelectorAll("label").forEach((l) => l.remove());
  for (const x of contacts) {
    const input = el("input", { type: "checkbox", value: x.user, "data-testid": "add-member-pick", "data-name": x.name });
    input.checked = picked.has(x.user);
    box.append(el("label", { class: "pick" }, input, el("span", { text: x.name })));
  }
  show($("no-add-contacts"), contacts.length === 0);
}

async function addMembers(event) {
  event.preventDefault();
  const conv = state.current;
  const members = [...$("add-member-picks").querySelectorAll("input:checked")].map((i) => i.value);
  if (!state.conversations.get(conv)?.group) return;
  if (members.length === 0) {
    notice("Pick at least one contact to add.");
    return;
  }
  await withBusy($("add-members-form").querySelector("button"), async () => {
    try {
      await state.client.addMembers(conv, members);
      $("add-member-picks").querySelectorAll("input:checked").forEach((i) => (i.checked = false));
      await refreshConversations();
    } catch (e) {
      notice(`Could not add to the group: ${describeError(e)}`);
    }
  });
}

async function removeMember(conv, m) {
  const c = state.conversations.get(conv);
  if (!c?.group || !confirm(`Remove ${memberName(m)} from ${c.name}? They will receive nothing sent from now on.`)) return;
  try {
    await state.client.removeMembers(conv, [m.user]);
    await refreshConversations();
  } catch (e) {
    notice(`Could not remove from the group: ${describeError(e)}`);
  }
}

async function renameGroup(event) {
  event.preventDefault();
  const conv = state.current;
  const name = $("group-rename").value.trim();
  if (!name || !state.conversations.get(conv)?.group) return;
  await withBusy($("rename-group-form").querySelector("button"), async () => {
    try {
      await state.client.renameGroup(conv, name);
      $("group-rename").blur();
      await refreshConversations();
    } catch (e) {
      notice(`Could not rename the group: ${describeError(e)}`);
    }
  });
}

/** A group was created, joined, changed or left. */
function onGroup(ev) {
  refreshConversations();
  if (ev.group === state.current) scheduleTail();
}

/** The contacts to pick from when creating a group. */
function renderGroupPicks() {
  const box = $("group-picks");
  const picked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  const contacts = [...state.conversations.values()].filter((c) => !c.group);
  box.querySelectorAll("label").forEach((l) => l.remove());
  for (const c of contacts) {
    const input = el("input", { type: "checkbox", value: c.user, "data-testid": "group-pick", "data-name": c.name });
    input.checked = picked.has(c.user);
    box.append(el("label", { class: "pick" }, input, el("span", { text: c.name })));
  }
  show($("no-group-contacts"), contacts.length === 0);
}

async function createGroup(event) {
  event.preventDefault();
  const name = $("group-name").value.trim();
  const members = [...$("group-picks").querySelectorAll("input:checked")].map((i) => i.value);
  if (!name) return;
  if (members.length === 0) {
    notice("Pick at least one contact for the group.");
    return;
  }
  await withBusy($("create-group-form").querySelector("button"), async () => {
    try {
      const id = await state.client.createGroup(name, members);
      $("group-name").value = "";
      $("group-picks").querySelectorAll("input:checked").forEach((i) => (i.checked = false));
      await refreshConversations();
      await selectConversation(id);
    } catch (e) {
      notice(`Could not create the group: ${describeError(e)}`);
    }
  });
}

async function leaveGroup() {
  const conv = state.current;
  const c = state.conversations.get(conv);
  if (!c?.group || !confirm(`Leave ${c.name}? You will receive nothing more from it.`)) return;
  try {
    await state.client.leaveGroup(conv);
    await refreshConversations();
  } catch (e) {
    notice(`Could not leave the group: ${describeError(e)}`);
  }
}

/** Following the end: keep at most MAX_SHOWN messages on the page. */
function trimShown() {
  const list = $("messages");
  let removed = false;
  while (state.shown.size > MAX_SHOWN && list.firstElementChild) {
    const first = list.firstElementChild;
    state.shown.delete(first.dataset.id);
    first.remove();
    removed = true;
  }
  if (removed) {
    const oldest = state.shown.get(list.firstElementChild?.dataset.id);
    if (oldest?.entry.order != null) state.oldestOrder = oldest.entry.order;
    show($("load-earlier"), true);
  }
}

/** Ask for a redraw of `what` on the next animation frame. */
function redraw(what) {
  if (what) state.dirty[what] = true;
  if (state.frameQueued) return;
  state.frameQueued = true;
  // A hidden tab gets no frames: a timer stands in for them there.
  const run = () => {
    if (!state.frameQueued) return;
    state.frameQueued = false;
    renderFrame();
  };
  requestAnimationFrame(run);
  setTimeout(run, 250);
}

function renderFrame() {
  const d = state.dirty;
  if (d.progress) {
    d.progress = false;
    renderProgress();
  }
  if (d.conversations) {
    d.conversations = false;
    renderConversations();
  }
  if (d.health) {
    d.health = false;
    renderHealth();
  }
  if (d.epoch) {
    d.epoch = false;
    savePref("epochs", state.epochs);
    if (state.epochBump) renderEpoch(true);
    state.epochBump = false;
  }
  if (state.tailDirty) {
    // During a backlog sync the history reads would compete with the
    // commits: fewer of them, the page still moves several times a second.
    const wait = state.connection === "syncing" ? state.tailAt + SYNC_TAIL_MS - performance.now() : 0;
    if (wait > 0) {
      setTimeout(() => redraw(), wait);
    } else {
      state.tailAt = performance.now();
      refreshTail();
    }
  }
}

function onRemoved(ev) {
  const shown = state.shown.get(ev.id);
  if (!shown) return;
  if (ev.reason === "recalled") {
    shown.el.classList.add("recalled");
    shown.el.querySelector(".text").textContent = shown.entry.outgoing ? "You recalled this message" : "This message was recalled";
    shown.el.querySelector(".actions")?.remove();
  } else {
    shown.el.remove();
    state.shown.delete(ev.id);
  }
}

/** Read on another device of this user. */
function onReadSynced(ev) {
  for (const id of ev.ids) {
    const shown = state.shown.get(id);
    if (shown && !shown.entry.outgoing) {
      shown.entry.read = true;
      shown.el.dataset.state = "read";
    }
  }
  countUnread(ev.conversation);
}

/** Mark what is shown as read, batched: a backlog of 500 is one call, not 500. */
function scheduleMarkRead() {
  if (state.readTimer || !state.current) return;
  // While a backlog syncs, read markers wait for its end (setConnection
  // schedules them on "live"): each would mark up to 2,000 messages and
  // send receipts for them while the page can only show the newest.
  if (state.connection === "syncing") return;
  state.readTimer = setTimeout(markShownRead, 150);
}

async function markShownRead() {
  state.readTimer = null;
  const conv = state.current;
  if (!conv || !pageIsSeen() || !state.client) return;
  const unreadShown = [...state.shown.values()].filter((m) => !m.entry.outgoing && !m.entry.read);
  if (unreadShown.length === 0) return;
  // The newest by position (the map's insertion order is not the page's).
  let newest = unreadShown[0];
  for (const m of unreadShown) if ((m.entry.order ?? -1) > (newest.entry.order ?? -1)) newest = m;
  const last = newest.entry.id;
  try {
    await state.client.markRead(conv, last);
    for (const m of unreadShown) {
      m.entry.read = true;
      m.el.dataset.state = "read";
    }
    const c = state.conversations.get(conv);
    if (c) {
      c.unread = 0;
      renderConversations();
    }
  } catch (e) {
    console.warn("hush: markRead failed", e);
  }
}

async function send(event) {
  event.preventDefault();
  const composer = $("composer");
  const text = composer.value;
  if (!text.trim() || !state.current) return;
  const conv = state.current;
  // "keep 30 days": the relay's important retention class.
  const important = $("important-toggle").checked;
  composer.value = "";
  autoGrow();
  try {
    const id = await state.client.send(conv, text, { important });
    if (state.current === conv) {
      appendMessage({
        id,
        conversation: conv,
        text,
        outgoing: true,
        sentAt: Date.now(),
        read: true,
        state: "sending",
      });
      scrollToEnd();
    }
  } catch (e) {
    composer.value = text;
    notice(`Not sent: ${describeError(e)}`);
  }
}

async function retry(id) {
  try {
    await state.client.retry(id);
    setMessageState(id, state.states.get(id) === "failed" ? "sending" : state.states.get(id) ?? "sending");
  } catch (e) {
    notice(`Retry failed: ${describeError(e)}`);
  }
}

async function recall(id) {
  try {
    await state.client.recall(id);
    onRemoved({ id, reason: "recalled" });
  } catch (e) {
    notice(`Recall failed: ${describeError(e)}`);
  }
}

async function deleteMessage(id) {
  try {
    await state.client.delete(id);
    onRemoved({ id, reason: "deleted" });
  } catch (e) {
    notice(`Delete failed: ${describeError(e)}`);
  }
}

// ---------------------------------------------------------------------------
// Key rotation: the ratchet epoch per conversation
// ---------------------------------------------------------------------------

/** Remember which user a device belongs to (rotation events name devices). */
function noteDevice(device, user) {
  if (!device || !user || state.deviceOwner[device] === user) return;
  state.deviceOwner[device] = user;
  savePref("devices", state.deviceOwner);
  applyPendingRotations();
}

/** The devices panel: this user's devices, with "Remove" for the others. */
function renderDevices() {
  if (!state.client || !$("devices-panel").open) return;
  let devices;
  try {
    devices = state.client.devices();
  } catch {
    return; // Closed or rebuilding: the next event refreshes it.
  }
  const list = $("device-list");
  list.replaceChildren();
  for (const d of devices) {
    const item = document.createElement("li");
    item.dataset.testid = "device";
    item.dataset.device = d.device;
    item.dataset.self = String(d.self);
    const id = document.createElement("code");
    id.textContent = d.device.slice(0, 12) + "…";
    id.title = d.device;
    item.append(id);
    const facts = document.createElement("span");
    facts.className = "muted small";
    const seen = d.lastSeenMs == null ? "last seen unknown" : `seen ${new Date(d.lastSeenMs).toLocaleString()}`;
    facts.textContent = ` ${d.self ? "this browser · " : ""}${seen}${d.stale ? " · stale" : ""}`;
    item.append(facts);
    if (!d.self) {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "Remove";
      remove.dataset.testid = "remove-device";
      remove.addEventListener("click", () => removeDevice(d.device, remove));
      item.append(remove);
    }
    list.append(item);
  }
}

async function removeDevice(device, button) {
  if (!confirm("Remove this device? It will receive nothing sent from now on.")) return;
  button.disabled = true;
  try {
    await state.client.removeDevice(device);
    notice("Device removed: it receives nothing new.", "info");
  } catch (e) {
    button.disabled = false;
    notice(`The device was not removed: ${describeError(e)}`);
  }
}

function onDevices(ev) {
  renderDevices();
  let changed = false;
  for (const d of ev.devices) {
    if (state.deviceOwner[d] !== ev.user) {
      state.deviceOwner[d] = ev.user;
      changed = true;
    }
  }
  if (changed) savePref("devices", state.deviceOwner);
  refreshConversations();
}

function conversationOfUser(user) {
  for (const c of state.conversations.values()) if (c.user === user) return c;
  return null;
}

function onRotation(ev) {
  log.rotations.push(ev);
  const conv = ev.conversation
    ? state.conversations.get(ev.conversation)
    : conversationOfUser(ev.user ?? state.deviceOwner[ev.device]);
  if (!conv) {
    state.pendingRotations.set(ev.device, ev.epoch);
    return;
  }
  setEpoch(conv, ev.epoch);
}

function applyPendingRotations() {
  for (const [device, epoch] of state.pendingRotations) {
    const conv = conversationOfUser(state.deviceOwner[device]);
    if (conv) {
      state.pendingRotations.delete(device);
      setEpoch(conv, epoch);
    }
  }
}

function setEpoch(conv, epoch) {
  if (conv.epoch === epoch) return;
  conv.epoch = epoch;
  state.epochs[conv.conversation] = epoch;
  // A backlog can turn the ratchet thousands of times: saved and drawn
  // (one bump) once per frame.
  if (conv.conversation === state.current) state.epochBump = true;
  redraw("epoch");
}

function renderEpoch(animate) {
  const c = state.conversations.get(state.current);
  const chip = $("epoch");
  const epoch = c?.epoch;
  show(chip, epoch != null);
  if (epoch == null) return;
  chip.dataset.epoch = String(epoch);
  $("epoch-n").textContent = String(epoch);
  chip.setAttribute("aria-label", `Key rotation: ratchet epoch ${epoch}`);
  if (animate) {
    chip.classList.remove("bump");
    void chip.offsetWidth; // restart the animation
    chip.classList.add("bump");
  }
}

// ---------------------------------------------------------------------------
// Gap repair
// ---------------------------------------------------------------------------

function onGap(ev) {
  log.gaps.push(ev);
  const c = state.conversations.get(ev.conversation);
  if (!c) return;
  const g = c.gap && c.gap.kind === "detected" ? c.gap : { missing: 0, recovered: 0, lost: 0, kind: "detected" };
  if (ev.kind === "detected") g.missing += ev.count;
  else if (ev.kind === "recovered") g.recovered += ev.count;
  else if (ev.kind === "unrecoverable") g.lost += ev.count;
  g.contact = ev.contact ?? c.name;
  if (g.recovered + g.lost >= g.missing) g.kind = g.lost > 0 ? "unrecoverable" : "recovered";
  else g.kind = "detected";
  g.dismissed = false;
  c.gap = g;
  if (ev.conversation === state.current) renderGap();
  renderConversations();
}

function renderGap() {
  const c = state.conversations.get(state.current);
  const banner = $("gap-banner");
  const g = c?.gap;
  if (!g || g.dismissed) {
    show(banner, false);
    banner.dataset.kind = "";
    return;
  }
  banner.dataset.kind = g.kind;
  const pending = g.missing - g.recovered - g.lost;
  let text;
  if (g.kind === "detected") {
    text = `${plural(pending, "missing message", "missing messages")} — asked ${g.contact} to resend`;
  } else if (g.kind === "recovered") {
    text = `${plural(g.recovered, "missing message", "missing messages")} recovered`;
  } else {
    text = `${plural(g.lost, "message", "messages")} could not be recovered`;
    if (g.recovered > 0) text += ` (${g.recovered} recovered)`;
  }
  $("gap-text").textContent = text;
  show(banner, true);
}

// ---------------------------------------------------------------------------
// "Under the hood": the engine's own delivery-quality counters
// ---------------------------------------------------------------------------

function scheduleHealth() {
  if ($("health").open) redraw("health");
}

function renderHealth() {
  if (!state.client || !$("health").open) return;
  try {
    const st = state.client.status();
    const c = state.client.counters();
    $("fact-device").textContent = st.device;
    $("fact-relay").textContent = st.relay;
    $("fact-unsent").textContent = String(st.unsent);
    $("fact-gaps").textContent = String(c.gapsDetected);
    $("fact-recovered").textContent = String(c.recovered);
    $("fact-unrecoverable").textContent = String(c.unrecoverable);
    $("fact-resent").textContent = String(c.resent);
    $("fact-duplicates").textContent = String(c.duplicatesDropped);
    $("fact-out-of-order").textContent = String(c.outOfOrder);
  } catch {
    // Closed or rebuilding: the next event refreshes it.
  }
}

// ---------------------------------------------------------------------------
// Account panel: codes and contacts
// ---------------------------------------------------------------------------

async function showLinkCode() {
  try {
    const code = await state.client.linkCode();
    $("link-code").textContent = code;
    show($("link-code-box"), true);
    $("link-code-box").scrollIntoView({ block: "nearest", behavior: "smooth" });
  } catch (e) {
    notice(`No link code: ${describeError(e)}`);
  }
}

async function addContact(event) {
  event.preventDefault();
  const name = $("add-contact-name").value.trim();
  const code = $("add-contact-code").value.trim();
  if (!code) return;
  await withBusy(event.submitter, async () => {
    const conv = await state.client.addContact(name || null, code);
    $("add-contact-name").value = "";
    $("add-contact-code").value = "";
    await refreshConversations();
    await selectConversation(conv);
  });
}

function autoGrow() {
  const c = $("composer");
  c.style.height = "auto";
  c.style.height = `${Math.min(c.scrollHeight, 160)}px`;
}

// ---------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------

$("create-form").addEventListener("submit", createUser);
$("link-form").addEventListener("submit", linkDevice);
$("add-contact-form").addEventListener("submit", addContact);
$("create-group-form").addEventListener("submit", createGroup);
$("leave-group").addEventListener("click", leaveGroup);
$("add-members-form").addEventListener("submit", addMembers);
$("rename-group-form").addEventListener("submit", renameGroup);
$("composer-form").addEventListener("submit", send);
$("composer").addEventListener("input", autoGrow);
$("composer").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer-form").requestSubmit();
  }
});
$("offline-toggle").addEventListener("click", toggleOffline);
$("copy-contact-code").addEventListener("click", (e) => copy($("contact-code").textContent, e.currentTarget));
$("copy-link-code").addEventListener("click", (e) => copy($("link-code").textContent, e.currentTarget));
$("link-code-button").addEventListener("click", showLinkCode);
$("load-earlier").addEventListener("click", loadEarlier);
$("devices-panel").addEventListener("toggle", renderDevices);
$("health").addEventListener("toggle", () => {
  renderHealth();
  if ($("health").open) $("health").scrollIntoView({ block: "nearest" });
});
$("notice-close").addEventListener("click", () => show($("notice"), false));
$("gap-close").addEventListener("click", () => {
  const c = state.conversations.get(state.current);
  if (c?.gap) c.gap.dismissed = true;
  renderGap();
});
document.addEventListener("visibilitychange", () => {
  if (pageIsSeen()) scheduleMarkRead();
});
window.addEventListener("pagehide", () => {
  // Release the storage lock promptly so a reload can open it again.
  state.client?.close();
});

start();
