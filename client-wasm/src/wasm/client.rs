//! The `Client` class JavaScript sees.
//!
//! Every method is a thin front: synchronous getters read the engine
//! directly; anything that changes state becomes a [`Command`] for the
//! driver loop, and its promise settles only after the step is durable in
//! IndexedDB, its frames are queued and its events were delivered. History
//! is read straight from IndexedDB, outside the loop.

use super::convert::{self, Failure, Options};
use super::driver::{
    CommandResult, Driver, Held, Listeners, Msg, NetworkListeners, Shared, now_ms, seed,
};
use super::history;
use super::idb_store::{self, IdbStore};
use super::lock::StorageLock;
use crate::codes::MAX_CODE_TEXT;
use crate::{Command, ContactCode, Engine, EngineConfig, LinkCode, Reply};
use futures_channel::mpsc::{self, UnboundedSender};
use futures_channel::oneshot;
use hush_protocol::{ConversationId, MessageId};
use js_sys::{Array, Function, Promise};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

/// Longest storage name (it becomes part of a database and a lock name).
const MAX_STORAGE_NAME: usize = 200;
/// Default and largest page of [`Client::history`].
const HISTORY_DEFAULT: u64 = 50;
const HISTORY_MAX: u64 = 500;

/// A Hush device in this browser: one IndexedDB database (its storage
/// name), one connection to its relay over WebTransport.
///
/// Create one with `await Client.open({...})` or `await Client.link({...})`
/// after `await init()`. Listen with `client.on(type, listener)`; events are
/// plain objects with a `type` field. Failures reject with an `Error` named
/// `HushError` that carries a `code`. The device runs until `close()`;
/// `free()` or losing every reference to the object does not stop it.
#[wasm_bindgen]
pub struct Client {
    inner: Rc<Inner>,
}

/// The handle's state. Dropping it (`free()`, or the JS garbage collector
/// reclaiming an unreferenced `Client`) does not stop the device: the loop,
/// its listeners and the storage lock live until `close()` (or the page
/// goes away), so a client whose only references are its event listeners
/// keeps delivering messages.
struct Inner {
    shared: Rc<Shared>,
    tx: UnboundedSender<Msg>,
}

/// What `open` and `link` read from their options object.
struct Connect {
    storage: String,
    relay_url: Option<String>,
    cert_hash: Option<[u8; 32]>,
    ws_url: Option<String>,
    online: bool,
}

impl Connect {
    fn parse(opts: &Options<'_>) -> Result<Connect, Failure> {
        let storage = opts
            .string("storage")?
            .ok_or_else(|| Failure::invalid("option `storage` (the storage name) is required"))?;
        if storage.is_empty()
            || storage.len() > MAX_STORAGE_NAME
            || storage.chars().any(char::is_control)
        {
            return Err(Failure::invalid(format!(
                "option `storage` must be 1 to {MAX_STORAGE_NAME} bytes without control characters"
            )));
        }
        let relay_url = opts.string("relayUrl")?;
        if let Some(url) = &relay_url {
            convert::relay_address(url)?;
        }
        let cert_hash = opts
            .string("certHash")?
            .map(|h| convert::cert_hash(&h))
            .transpose()?;
        let ws_url = opts.string("websocketUrl")?;
        if let Some(url) = &ws_url
            && !(url.starts_with("ws://") || url.starts_with("wss://"))
        {
            return Err(Failure::invalid(
                "option `websocketUrl` must be a ws:// or wss:// URL",
            ));
        }
        Ok(Connect {
            storage,
            relay_url,
            cert_hash,
            ws_url,
            online: opts.boolean("online")?.unwrap_or(true),
        })
    }
}

pub(super) fn string_arg(v: &JsValue, what: &str) -> Result<String, Failure> {
    v.as_string()
        .ok_or_else(|| Failure::invalid(format!("{what} must be a string")))
}

fn message_id(v: &JsValue) -> Result<MessageId, Failure> {
    let text = string_arg(v, "the message id")?;
    MessageId::from_hex(text.trim())
        .map_err(|_| Failure::invalid(format!("`{text}` is not a message id (32 hex digits)")))
}

pub(super) fn promise<F>(f: F) -> Promise
where
    F: Future<Output = Result<JsValue, Failure>> + 'static,
{
    future_to_promise(async move { f.await.map_err(JsValue::from) })
}

/// Opens the storage and, on first use, makes the device.
enum Origin {
    /// Load what is stored; create a user named this if nothing is.
    Open { name: Option<String> },
    /// Join an existing user from a link code (storage must be empty).
    Link(Box<LinkCode>),
}

async fn start(connect: Connect, origin: Origin) -> Result<Client, Failure> {
    // A build whose AEAD gives wrong answers never touches storage or the
    // network: it refuses with code `self_test`.
    crate::self_test::check_crypto()?;
    let lock = StorageLock::acquire(&connect.storage).await?;
    let store = IdbStore::open(&connect.storage).await?;
    match start_on(connect, origin, lock, store).await {
        Ok(client) => Ok(client),
        Err((f, store)) => {
            if let Some(store) = store {
                store.close();
            }
            Err(f)
        }
    }
}

/// Envelopes per pulled page in the browser: the protocol's `MAX_PAGE`, as
/// natively. Each page is one engine step and, during a catch-up, one
/// IndexedDB transaction (its pull pipeline keeps the next page arriving
/// while one commits, so steps rarely wait to share one), and every
/// transaction pays for itself: creating it, the engine-state records it
/// rewrites (cursor, counters, sessions, streams), and packs that hold only
/// that page's messages. Measured in Chromium 156 (catch-up of 100,000 ×
/// 1 KiB): pages of 200 took 470 transactions, pages of 1,000 took 108, and
/// the catch-up 3.2 s instead of 3.8 s. The sync progress moves every 1,000
/// messages; a page holds at most `MAX_PAGE_BYTES` of envelopes.
const BROWSER_PAGE: u16 = hush_protocol::limits::MAX_PAGE;

async fn start_on(
    connect: Connect,
    origin: Origin,
    lock: StorageLock,
    store: IdbStore,
) -> Result<Client, (Failure, Option<IdbStore>)> {
    let cfg = EngineConfig {
        page_limit: BROWSER_PAGE,
        ..EngineConfig::default()
    };
    let now = now_ms();
    let records = match store.load_state().await {
        Ok(r) => r,
        Err(e) => return Err((e.into(), Some(store))),
    };
    let fresh = records.is_empty();
    let seed = match seed() {
        Ok(s) => s,
        Err(f) => return Err((f, Some(store))),
    };
    let built = match (&origin, fresh) {
        (Origin::Open { .. }, false) => Engine::load(records, seed, cfg.clone())
            .map(|e| (e, None))
            .map_err(Failure::from),
        (Origin::Open { name }, true) => {
            let create = || -> Result<_, Failure> {
                let name = name.as_deref().ok_or_else(|| {
                    Failure::invalid(format!(
                        "storage `{}` holds no device yet: pass `name` to create a user",
                        connect.storage
                    ))
                })?;
                check_name(name)?;
                let url = connect.relay_url.as_deref().ok_or_else(|| {
                    Failure::invalid("option `relayUrl` is required to create a user")
                })?;
                let relay = convert::relay_address(url)?;
                let (e, step) = Engine::create(now, seed, &relay, name, cfg.clone())?;
                Ok((e, Some(step)))
            };
            create()
        }
        (Origin::Link(code), true) => Engine::join(now, seed, code, cfg.clone())
            .map(|(e, step)| (e, Some(step)))
            .map_err(Failure::from),
        (Origin::Link(_), false) => Err(Failure::new(
            "not_allowed",
            format!(
                "storage `{}` already holds a device: open it with Client.open, or link into a new storage name",
                connect.storage
            ),
        )),
    };
    let (engine, first) = match built {
        Ok(b) => b,
        Err(f) => return Err((f, Some(store))),
    };
    // A new device is durable before anything else happens.
    if let Some(step) = &first
        && let Err(e) = store.apply(&step.storage).await
    {
        return Err((e.into(), Some(store)));
    }
    let relay_url = connect
        .relay_url
        .clone()
        .unwrap_or_else(|| convert::relay_url(engine.relay()));
    let shared = Rc::new(Shared {
        engine: RefCell::new(Some(engine)),
        store,
        listeners: Listeners::default(),
        storage: connect.storage.clone(),
        relay_url,
        ws_url: connect.ws_url.clone(),
        link: Cell::new(None),
        online: Cell::new(connect.online),
        closed: Cell::new(false),
        fatal: RefCell::new(None),
    });
    let (tx, rx) = mpsc::unbounded();
    let network = NetworkListeners::install(&tx);
    let driver = Driver::new(
        Rc::clone(&shared),
        tx.clone(),
        connect.cert_hash,
        cfg,
        Held { lock, network },
    );
    wasm_bindgen_futures::spawn_local(driver.run(rx));
    Ok(Client {
        inner: Rc::new(Inner { shared, tx }),
    })
}

/// What `status().selfTest` reports: `"passed"` once the AEAD self-test of
/// `open`/`link` passed on this page.
fn self_test_state() -> &'static str {
    if crate::self_test::crypto_checked() {
        "passed"
    } else {
        "not run"
    }
}

fn check_name(name: &str) -> Result<(), Failure> {
    if name.trim().is_empty() || name.len() > MAX_CODE_TEXT || name.chars().any(char::is_control) {
        return Err(Failure::invalid(format!(
            "a name must be 1 to {MAX_CODE_TEXT} bytes without control characters"
        )));
    }
    Ok(())
}

#[wasm_bindgen]
impl Client {
    /// Open the device kept in storage `options.storage`, or create a new
    /// user there (named `options.name`) if the storage is empty. Fails with
    /// code `locked` if that storage is open elsewhere, and with code
    /// `self_test` (before touching storage) if this build's encryption gives
    /// a wrong known answer.
    pub async fn open(
        #[wasm_bindgen(unchecked_param_type = "OpenOptions")] options: JsValue,
    ) -> Result<Client, JsValue> {
        let opts = Options::new(&options, "Client.open options")?;
        let connect = Connect::parse(&opts)?;
        let name = opts.string("name")?;
        Ok(start(connect, Origin::Open { name }).await?)
    }

    /// Make this browser storage a new device of an existing user, from a
    /// link code made on one of that user's devices (`linkCode()`).
    pub async fn link(
        #[wasm_bindgen(unchecked_param_type = "LinkOptions")] options: JsValue,
    ) -> Result<Client, JsValue> {
        let opts = Options::new(&options, "Client.link options")?;
        let connect = Connect::parse(&opts)?;
        let code = opts
            .string("code")?
            .ok_or_else(|| Failure::invalid("option `code` (the link code) is required"))?;
        let code = LinkCode::parse(&code).map_err(Failure::from)?;
        Ok(start(connect, Origin::Link(Box::new(code))).await?)
    }

    /// Delete everything stored under a storage name (the device it holds is
    /// gone for good). Fails with code `locked` while a client has it open.
    #[wasm_bindgen(js_name = deleteStorage)]
    pub async fn delete_storage(
        #[wasm_bindgen(unchecked_param_type = "string")] storage: JsValue,
    ) -> Result<(), JsValue> {
        let storage = string_arg(&storage, "the storage name")?;
        let mut lock = StorageLock::acquire(&storage).await?;
        let result = idb_store::delete_database(&storage).await;
        lock.release();
        result.map_err(|e| Failure::from(e).to_js())
    }

    pub(super) fn engine<T>(&self, f: impl FnOnce(&Engine) -> T) -> Result<T, Failure> {
        if let Some(fail) = self.inner.shared.unusable() {
            return Err(fail);
        }
        let engine = self.inner.shared.engine.borrow();
        // Between a failure and the rebuild there is briefly no engine.
        engine
            .as_ref()
            .map(f)
            .ok_or_else(|| Failure::new("busy", "the client is recovering from a storage failure"))
    }

    /// Send a command through the loop; resolves after its step completed.
    pub(super) fn command(&self, cmd: Command) -> impl Future<Output = CommandResult> + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = match self.inner.shared.unusable() {
            Some(f) => Err(f),
            None => self
                .inner
                .tx
                .unbounded_send(Msg::Command(cmd, reply))
                .map_err(|_| Failure::closed()),
        };
        async move {
            sent?;
            answer.await.map_err(|_| Failure::closed())?
        }
    }

    /// A conversation from a conversation id (hex; a contact's or a
    /// group's), a contact name, or a group name. A name that is both a
    /// contact's and a group's is refused: never guessed.
    fn conversation(&self, v: &JsValue) -> Result<ConversationId, Failure> {
        let text = string_arg(v, "the contact or conversation")?;
        let (contacts, groups) = self.engine(|e| (e.contacts(), e.groups()))?;
        if let Ok(id) = ConversationId::from_hex(text.trim())
            && (contacts.iter().any(|(_, _, c)| *c == id) || groups.iter().any(|g| g.id == id))
        {
            return Ok(id);
        }
        let named: Vec<ConversationId> = contacts
            .iter()
            .filter(|(_, name, _)| *name == text)
            .map(|(_, _, c)| *c)
            .chain(groups.iter().filter(|g| g.name == text).map(|g| g.id))
            .collect();
        match named.as_slice() {
            [c] => Ok(*c),
            [] => Err(Failure::new(
                "unknown",
                format!("no contact, group or conversation `{text}`"),
            )),
            _ => Err(Failure::invalid(format!(
                "several contacts or groups are named `{text}`: use the conversation id"
            ))),
        }
    }

    fn conversations_list(&self) -> Result<Vec<ConversationId>, Failure> {
        self.engine(|e| {
            e.contacts()
                .into_iter()
                .map(|(_, _, c)| c)
                .chain(e.groups().into_iter().map(|g| g.id))
                .collect()
        })
    }

    /// This user's contact code (`hush-contact:…`): safe to share.
    #[wasm_bindgen(js_name = contactCode)]
    pub fn contact_code(&self) -> Result<String, JsValue> {
        let code = self.engine(|e| e.contact_code())?;
        Ok(code.to_text().map_err(Failure::from)?)
    }

    /// A one-time link code (`hush-link:…`) that lets a new device join
    /// this user within 10 minutes. It carries the user's identity secret:
    /// show it only to the user.
    #[wasm_bindgen(js_name = linkCode, unchecked_return_type = "Promise<string>")]
    pub fn link_code(&self) -> Promise {
        let done = self.command(Command::CreateLinkCode);
        promise(async move {
            match done.await? {
                Some(Reply::LinkCode(code)) => Ok(JsValue::from_str(code.as_str())),
                _ => Err(Failure::new("internal", "no link code was made")),
            }
        })
    }

    /// Add a contact from their contact code. `name` (if not empty) is how
    /// they are shown here instead of the name in the code. Resolves to the
    /// conversation id.
    #[wasm_bindgen(js_name = addContact, unchecked_return_type = "Promise<string>")]
    pub fn add_contact(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string | null | undefined")] name: JsValue,
        #[wasm_bindgen(unchecked_param_type = "string")] code: JsValue,
    ) -> Promise {
        let parsed = (|| -> Result<ContactCode, Failure> {
            let mut code = ContactCode::parse(&string_arg(&code, "the contact code")?)
                .map_err(Failure::from)?;
            if !name.is_undefined() && !name.is_null() {
                let name = string_arg(&name, "the contact name")?;
                if !name.trim().is_empty() {
                    check_name(&name)?;
                    code.name = name;
                }
            }
            Ok(code)
        })();
        let done = parsed.map(|code| self.command(Command::AddContact { code }));
        promise(async move {
            match done?.await? {
                Some(Reply::Contact(c)) => Ok(JsValue::from_str(&c.to_hex())),
                _ => Err(Failure::new("internal", "the contact was not added")),
            }
        })
    }

    /// Send a text to a contact (by name or conversation id). Resolves to
    /// the message id once the message is durably in the outbox; delivery
    /// progress follows as `state` events.
    ///
    /// With `{ important: true }` the message goes in the relay's important
    /// retention class: the relay keeps it unread up to its
    /// `--retention-important` (30 days by default) instead of the normal
    /// retention.
    #[wasm_bindgen(unchecked_return_type = "Promise<string>")]
    pub fn send(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] contact: JsValue,
        #[wasm_bindgen(unchecked_param_type = "string")] text: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "SendOptions")] options: JsValue,
    ) -> Promise {
        let cmd = (|| -> Result<Command, Failure> {
            let conversation = self.conversation(&contact)?;
            let text = string_arg(&text, "the text")?;
            let important = Options::new(&options, "send options")?
                .boolean("important")?
                .unwrap_or(false);
            Ok(if important {
                Command::SendImportantText { conversation, text }
            } else {
                Command::SendText { conversation, text }
            })
        })();
        let done = cmd.map(|c| self.command(c));
        promise(async move {
            match done?.await? {
                Some(Reply::Message(id)) => Ok(JsValue::from_str(&id.to_hex())),
                _ => Err(Failure::new("internal", "the message was not queued")),
            }
        })
    }

    /// Mark received messages read, up to and including `upToId` (or all of
    /// them when it is omitted): synced to this user's other devices and
    /// sent as read receipts. Resolves to how many were marked.
    #[wasm_bindgen(js_name = markRead, unchecked_return_type = "Promise<number>")]
    pub fn mark_read(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] conversation: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "string | null", js_name = upToId)]
        up_to_id: JsValue,
    ) -> Promise {
        let prepared = (|| -> Result<(ConversationId, Option<MessageId>), Failure> {
            let conv = self.conversation(&conversation)?;
            let up_to = if up_to_id.is_undefined() || up_to_id.is_null() {
                None
            } else {
                Some(message_id(&up_to_id)?)
            };
            Ok((conv, up_to))
        })();
        let this = self.share();
        promise(async move {
            let (conversation, up_to) = prepared?;
            let unread = history::unread_up_to(&this.inner.shared.store, &conversation, up_to)
                .await?
                .ok_or_else(|| {
                    Failure::new("unknown", "that message is not in this conversation")
                })?;
            let count = unread.len();
            if count > 0 {
                this.command(Command::MarkRead {
                    conversation,
                    messages: unread,
                })
                .await?;
            }
            Ok(JsValue::from_f64(count as f64))
        })
    }

    /// Delete a message for this user, on all of their devices.
    #[wasm_bindgen(unchecked_return_type = "Promise<void>")]
    pub fn delete(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string", js_name = messageId)]
        message_id_arg: JsValue,
    ) -> Promise {
        let this = self.share();
        promise(async move {
            let (conversation, id) = this.locate(&message_id_arg).await?;
            this.command(Command::Delete {
                conversation,
                ids: vec![id],
            })
            .await?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Recall (delete for everyone) a message this user sent. Resolves to
    /// the id of the recall itself.
    #[wasm_bindgen(unchecked_return_type = "Promise<string>")]
    pub fn recall(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string", js_name = messageId)]
        message_id_arg: JsValue,
    ) -> Promise {
        let this = self.share();
        promise(async move {
            let (conversation, id) = this.locate(&message_id_arg).await?;
            match this.command(Command::Recall { conversation, id }).await? {
                Some(Reply::Message(r)) => Ok(JsValue::from_str(&r.to_hex())),
                _ => Err(Failure::new("internal", "the recall was not queued")),
            }
        })
    }

    /// Send a `failed` message again (same id: never a duplicate).
    #[wasm_bindgen(unchecked_return_type = "Promise<void>")]
    pub fn retry(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string", js_name = messageId)]
        message_id_arg: JsValue,
    ) -> Promise {
        let done = message_id(&message_id_arg).map(|id| self.command(Command::Retry { id }));
        promise(async move {
            done?.await?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// A page of a conversation's history, oldest first: up to `limit`
    /// (default 50, at most 500) messages before position `before` (an
    /// entry's `order`; omit it for the newest). A group's page holds the
    /// messages that arrived last, sorted in the group order; use
    /// `groupHistory` for group pages that fit together.
    #[wasm_bindgen(unchecked_return_type = "Promise<HistoryEntry[]>")]
    pub fn history(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] conversation: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "HistoryOptions")] options: JsValue,
    ) -> Promise {
        let prepared = (|| -> Result<(ConversationId, Option<u64>, usize), Failure> {
            let conv = self.conversation(&conversation)?;
            let opts = Options::new(&options, "history options")?;
            let before = opts.whole("before")?;
            let limit = opts
                .whole("limit")?
                .unwrap_or(HISTORY_DEFAULT)
                .clamp(1, HISTORY_MAX);
            Ok((conv, before, limit as usize))
        })();
        let this = self.share();
        promise(async move {
            let (conv, before, limit) = prepared?;
            let mut entries = history::page(&this.inner.shared.store, &conv, before, limit).await?;
            let engine = this.inner.shared.engine.borrow();
            if let Some(e) = engine.as_ref()
                && e.group(&conv).is_some()
            {
                // A group's page in the group order (the same on every
                // member's device), not in arrival order.
                entries.sort_by_cached_key(|x| {
                    let pos = e.group_position(&conv, &x.record.id);
                    (pos.is_none(), pos, x.order)
                });
            }
            let names: &dyn convert::ContactNames = match engine.as_ref() {
                Some(e) => e,
                None => &NoNames,
            };
            Ok(entries
                .iter()
                .map(|e| convert::history_entry(e, names))
                .collect::<Array>()
                .into())
        })
    }

    /// The contacts and their conversations.
    #[wasm_bindgen(unchecked_return_type = "Conversation[]")]
    pub fn conversations(&self) -> Result<JsValue, JsValue> {
        let list = self.engine(|e| {
            e.contacts()
                .into_iter()
                .map(|(user, name, conv)| {
                    convert::Obj::new()
                        .set("conversation", conv.to_hex())
                        .set("name", name)
                        .set("user", user.to_hex())
                        .num("devices", e.devices_of(&user).len() as u64)
                        .build()
                })
                .collect::<Array>()
        })?;
        Ok(list.into())
    }

    /// This user's devices from the newest signed list, with the relay's
    /// (unsigned) lease of each: when it was last seen and whether it is
    /// stale (no new messages are encrypted to a stale device).
    #[wasm_bindgen(unchecked_return_type = "DeviceInfo[]")]
    pub fn devices(&self) -> Result<JsValue, JsValue> {
        let list = self.engine(|e| {
            e.own_devices()
                .into_iter()
                .map(|d| {
                    convert::Obj::new()
                        .set("device", d.device.to_hex())
                        .set("self", d.this_device)
                        .set(
                            "lastSeenMs",
                            d.last_seen_ms
                                .map_or(JsValue::NULL, |t| JsValue::from_f64(t as f64)),
                        )
                        .set("stale", d.stale)
                        .build()
                })
                .collect::<Array>()
        })?;
        Ok(list.into())
    }

    /// Remove another device of this user (by its id in hex): publishes a
    /// signed device list without it. Resolves once the list is queued; a
    /// `devices` event follows when the relay stored it.
    #[wasm_bindgen(js_name = removeDevice, unchecked_return_type = "Promise<void>")]
    pub fn remove_device(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] device: JsValue,
    ) -> Promise {
        let parsed = string_arg(&device, "the device id").and_then(|text| {
            hush_protocol::DeviceId::from_hex(text.trim())
                .map_err(|_| Failure::new("invalid_argument", "not a device id (32 hex digits)"))
        });
        let done = parsed.map(|device| self.command(Command::RemoveDevice { device }));
        promise(async move {
            done?.await?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Where this device stands: connection state, identity, outbox.
    #[wasm_bindgen(unchecked_return_type = "Status")]
    pub fn status(&self) -> Result<JsValue, JsValue> {
        let shared = &self.inner.shared;
        let status = self.engine(|e| {
            convert::Obj::new()
                .set("storage", shared.storage.as_str())
                .set("state", convert::connection_name(e.connection_state()))
                .set("online", shared.online.get())
                .set("device", e.device_id().to_hex())
                .set("user", e.user_key().to_hex())
                .set("name", e.contact_code().name)
                .set("relay", e.relay())
                .set("relayUrl", shared.relay_url.as_str())
                .set(
                    "transport",
                    shared
                        .link
                        .get()
                        .map_or(JsValue::NULL, |l| JsValue::from_str(l.name())),
                )
                .num("unsent", e.unsent() as u64)
                .set("selfTest", self_test_state())
                .build()
        })?;
        Ok(status)
    }

    /// The delivery-quality counters (duplicates dropped, gaps, …).
    #[wasm_bindgen(unchecked_return_type = "Counters")]
    pub fn counters(&self) -> Result<JsValue, JsValue> {
        Ok(self.engine(|e| convert::counters(&e.counters()))?)
    }

    /// Listen to events of one type (`"*"` for all). Returns a function
    /// that removes the listener.
    // The typed (generic) signatures of on/off/addEventListener/
    // removeEventListener are declared in the `Client` interface of the
    // TypeScript section (mod.rs), which wasm-bindgen cannot generate.
    #[wasm_bindgen(skip_typescript)]
    pub fn on(
        &self,
        #[wasm_bindgen(unchecked_param_type = "HushEventType", js_name = eventType)] kind: JsValue,
        #[wasm_bindgen(unchecked_param_type = "(event: HushEvent) => void")] listener: JsValue,
    ) -> Result<JsValue, JsValue> {
        let (kind, f) = listener_args(&kind, &listener)?;
        self.inner.shared.listeners.add(&kind, f.clone());
        let shared = Rc::downgrade(&self.inner.shared);
        let off = Closure::once_into_js(move || {
            if let Some(shared) = shared.upgrade() {
                shared.listeners.remove(&kind, &f);
            }
        });
        Ok(off)
    }

    /// Stop listening (the same type and function given to `on`).
    #[wasm_bindgen(skip_typescript)]
    pub fn off(
        &self,
        #[wasm_bindgen(unchecked_param_type = "HushEventType", js_name = eventType)] kind: JsValue,
        #[wasm_bindgen(unchecked_param_type = "(event: HushEvent) => void")] listener: JsValue,
    ) -> Result<(), JsValue> {
        let (kind, f) = listener_args(&kind, &listener)?;
        self.inner.shared.listeners.remove(&kind, &f);
        Ok(())
    }

    /// `on` under its DOM name.
    #[wasm_bindgen(js_name = addEventListener, skip_typescript)]
    pub fn add_event_listener(
        &self,
        #[wasm_bindgen(unchecked_param_type = "HushEventType", js_name = eventType)] kind: JsValue,
        #[wasm_bindgen(unchecked_param_type = "(event: HushEvent) => void")] listener: JsValue,
    ) -> Result<(), JsValue> {
        let (kind, f) = listener_args(&kind, &listener)?;
        self.inner.shared.listeners.add(&kind, f);
        Ok(())
    }

    /// `off` under its DOM name.
    #[wasm_bindgen(js_name = removeEventListener, skip_typescript)]
    pub fn remove_event_listener(
        &self,
        #[wasm_bindgen(unchecked_param_type = "HushEventType", js_name = eventType)] kind: JsValue,
        #[wasm_bindgen(unchecked_param_type = "(event: HushEvent) => void")] listener: JsValue,
    ) -> Result<(), JsValue> {
        self.off(kind, listener)
    }

    /// Cut the connection (`false`) or connect again right away (`true`).
    /// Messages sent while offline wait in the outbox (durably) and go out
    /// after reconnecting.
    #[wasm_bindgen(js_name = setOnline)]
    pub fn set_online(&self, online: bool) -> Result<(), JsValue> {
        if let Some(f) = self.inner.shared.unusable() {
            return Err(f.into());
        }
        self.inner
            .tx
            .unbounded_send(Msg::SetOnline(online))
            .map_err(|_| Failure::closed().to_js())
    }

    /// Close the connection and the database and release the storage name.
    /// Everything already resolved is durable; later calls fail with code
    /// `closed`.
    #[wasm_bindgen(unchecked_return_type = "Promise<void>")]
    pub fn close(&self) -> Promise {
        let (done, finished) = oneshot::channel();
        // If the loop already ended, the send fails and there is nothing to
        // wait for; a second `close()` settles when the first one's
        // shutdown has dropped the queue.
        let sent = self.inner.tx.unbounded_send(Msg::Close(done)).is_ok();
        promise(async move {
            if sent {
                let _ = finished.await;
            }
            Ok(JsValue::UNDEFINED)
        })
    }
}

impl Client {
    /// Another handle on the same client, for a promise to own.
    pub(super) fn share(&self) -> Client {
        Client {
            inner: Rc::clone(&self.inner),
        }
    }

    /// The history entries of these messages of `conversation`, in the
    /// order of `ids`, as a JS array of `HistoryEntry` (see
    /// [`history::by_ids`]).
    pub(super) async fn entries_by_ids(
        &self,
        conversation: ConversationId,
        ids: Vec<MessageId>,
    ) -> Result<JsValue, Failure> {
        let entries = history::by_ids(&self.inner.shared.store, &conversation, &ids).await?;
        let engine = self.inner.shared.engine.borrow();
        let names: &dyn convert::ContactNames = match engine.as_ref() {
            Some(e) => e,
            None => &NoNames,
        };
        Ok(entries
            .iter()
            .map(|e| convert::history_entry(e, names))
            .collect::<Array>()
            .into())
    }

    /// The conversation a message id belongs to, from history.
    async fn locate(&self, id: &JsValue) -> Result<(ConversationId, MessageId), Failure> {
        let id = message_id(id)?;
        let conversations = self.conversations_list()?;
        let conv = history::conversation_of(&self.inner.shared.store, &conversations, &id)
            .await?
            .ok_or_else(|| Failure::new("unknown", format!("no message {id} on this device")))?;
        Ok((conv, id))
    }
}

fn listener_args(kind: &JsValue, listener: &JsValue) -> Result<(String, Function), Failure> {
    let kind = string_arg(kind, "the event type")?;
    let f = listener
        .dyn_ref::<Function>()
        .cloned()
        .ok_or_else(|| Failure::invalid("the listener must be a function"))?;
    Ok((kind, f))
}

/// Names for history rows when the engine is momentarily unavailable.
struct NoNames;

impl convert::ContactNames for NoNames {
    fn contact_of(&self, _: &ConversationId) -> Option<String> {
        None
    }
    fn name_of(&self, _: &hush_protocol::UserKey) -> Option<String> {
        None
    }
    fn group_of(&self, _: &ConversationId) -> Option<crate::GroupInfo> {
        None
    }
    fn me(&self) -> Option<hush_protocol::UserKey> {
        None
    }
}
