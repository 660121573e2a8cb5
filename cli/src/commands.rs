//! One function per `hush` subcommand.
//!
//! Every command that connects first re-queues messages whose automatic
//! retries ran out (`Failed`) and then runs until the device is *settled*
//! (see [`crate::driver::View::settled`]): so any command that reaches the
//! relay also flushes the outbox, and a message accepted by `send` is either
//! stored by the relay or still in the outbox for the next command.

use crate::driver::{
    CONNECT_ATTEMPT, Driver, Outcome, Sink, StopSignal, View, cli_engine_config, now_ms, os_seed,
};
use crate::error::CliError;
use crate::home::Home;
use crate::output::{
    Names, Printer, Style, err_line, format_utc, message_json, message_text, out_line, state_name,
    stored_state, whole_history,
};
use crate::transport::{self, CertCheck, RelayTarget};
use hush_client::{
    Command, ConnectionState, ContactCode, Engine, FileStorage, LinkCode, MessageState, Reply,
    Storage,
};
use hush_protocol::{ConversationId, MessageId};
use serde_json::json;
use std::time::Duration;
use tokio::time::Instant;

/// How long a command tries to reach the relay before reporting it unreachable.
pub const CONNECT_BUDGET: Duration = Duration::from_secs(5);
/// How long `init` waits for the relay to confirm registration and publication.
const INIT_BOUND: Duration = Duration::from_secs(20);
/// After its main goal, how long a command keeps flushing other work.
const FLUSH_BOUND: Duration = Duration::from_secs(3);
/// A sync that makes no progress for this long gives up.
const SYNC_STALL: Duration = Duration::from_secs(20);

type Cli = Driver<FileStorage>;

/// Load an initialised device's driver.
/// The file in the home directory naming the transport of the last connection.
const LINK_FILE: &str = "transport";

/// The transport of the last connection, if any was recorded.
fn last_link(home: &Home) -> Option<String> {
    let text = std::fs::read_to_string(home.dir().join(LINK_FILE)).ok()?;
    let name = text.trim();
    matches!(name, "quic" | "websocket").then(|| name.to_string())
}

pub(crate) fn open(home: &Home) -> Result<Cli, CliError> {
    let storage = home.open_existing()?;
    let cfg = cli_engine_config();
    let engine =
        Engine::load(storage.load_state()?, os_seed()?, cfg.clone()).map_err(|e| match e {
            hush_client::ClientError::NoDevice => {
                CliError::NotInitialised(home.dir().to_path_buf())
            }
            other => CliError::Client(other),
        })?;
    let target = home.load_relay(engine.relay())?;
    let mut driver = Driver::new(engine, storage, cfg, target);
    driver.record_link_in(home.dir().join(LINK_FILE));
    Ok(driver)
}

/// Messages whose automatic retries ran out go out again with this
/// connection (same id: the relay and the recipients drop repeats).
async fn requeue_failed(d: &mut Cli, sink: &mut dyn Sink<FileStorage>) -> Result<usize, CliError> {
    let failed: Vec<Command> = d
        .engine()
        .outbox_ids()
        .into_iter()
        .filter(|id| d.engine().message_state(id) == Some(MessageState::Failed))
        .map(|id| Command::Retry { id })
        .collect();
    let n = failed.len();
    if n > 0 {
        d.commands(failed, sink).await?;
    }
    Ok(n)
}

/// Run until connected at least once, within [`CONNECT_BUDGET`].
pub(crate) async fn reach(
    d: &mut Cli,
    budget: Duration,
    sink: &mut dyn Sink<FileStorage>,
) -> Result<(), CliError> {
    let deadline = Instant::now() + budget;
    let mut stop = None;
    d.run_until(deadline, &mut stop, sink, |v| {
        v.ever_connected || v.engine.removed()
    })
    .await?;
    if d.engine().removed() {
        return Err(CliError::DeviceRemoved);
    }
    if d.ever_connected() {
        Ok(())
    } else {
        Err(d.unreachable_error())
    }
}

/// Run until settled or `bound` passes; true if settled.
pub(crate) async fn settle(
    d: &mut Cli,
    bound: Duration,
    sink: &mut dyn Sink<FileStorage>,
) -> Result<bool, CliError> {
    let mut stop = None;
    let outcome = d
        .run_until(Instant::now() + bound, &mut stop, sink, |v| v.settled())
        .await?;
    Ok(outcome == Outcome::Done)
}

/// A contact or group named on the command line (see [`crate::group`]).
fn conversation(d: &Cli, name: &str) -> Result<ConversationId, CliError> {
    crate::group::resolve(d.engine(), name).map(crate::group::Target::conversation)
}

/// After a change that others must hear of (a contact, a group change):
/// reach the relay and hand it over, best effort; `saved` says what is kept
/// if the relay cannot be reached.
pub(crate) async fn flush_after_change(
    d: &mut Cli,
    sink: &mut Printer,
    saved: &str,
) -> Result<(), CliError> {
    match reach(d, CONNECT_BUDGET, sink).await {
        Ok(()) => {
            settle(d, FLUSH_BOUND, sink).await?;
        }
        Err(e) => err_line(&format!(
            "warning: {e}; {saved} and syncs with the next command"
        )),
    }
    d.shutdown().await;
    Ok(())
}

/// `hush init`.
pub async fn init(
    home: &Home,
    relay: String,
    cert_hash: Option<String>,
    name: Option<String>,
    link: Option<String>,
    wait: Duration,
    history: bool,
) -> Result<(), CliError> {
    transport::validate_addr(&relay)?;
    let cert = match cert_hash {
        Some(h) => CertCheck::Pinned(CertCheck::parse_hash(&h)?),
        None => CertCheck::SystemRoots,
    };
    let link = match link {
        Some(text) => Some(LinkCode::parse(&text).map_err(|e| CliError::BadCode {
            what: "link code",
            reason: e.to_string(),
        })?),
        None => None,
    };
    if let Some(n) = &name
        && (n.is_empty()
            || n.len() > hush_client::codes::MAX_CODE_TEXT
            || n.chars().any(char::is_control))
    {
        return Err(CliError::Invalid {
            what: "name",
            reason: "must be 1 to 256 bytes without control characters".into(),
        });
    }
    if home.is_initialised()? {
        return Err(CliError::AlreadyInitialised(home.dir().to_path_buf()));
    }
    let target = RelayTarget {
        addr: relay,
        cert,
        transport: transport::Transport::configured(),
    };
    // Reach the relay before writing anything, so a failed init leaves
    // nothing behind and can simply be run again.
    probe(&target).await?;

    home.create_dir()?;
    home.save_relay(&target)?;
    let storage = home.open_storage()?;
    let cfg = cli_engine_config();
    let now = now_ms();
    let (engine, step) = match &link {
        Some(code) => Engine::join_with_history(now, os_seed()?, code, cfg.clone(), history)?,
        None => {
            let name = name.clone().unwrap_or_else(default_name);
            Engine::create(now, os_seed()?, &target.addr, &name, cfg.clone())?
        }
    };
    let mut driver = Driver::new(engine, storage, cfg, target);
    let mut printer = Printer::new(Style::Human, false);
    driver.start(step, &mut printer).await?;
    let settled = settle(&mut driver, INIT_BOUND, &mut printer).await;
    let registered = !driver.engine().backlog().unregistered;
    match settled {
        Ok(true) => {}
        Ok(false) | Err(_) if !registered => {
            driver.shutdown().await;
            drop(driver);
            // Nothing reached the relay: undo, so `init` can be retried.
            let _ = std::fs::remove_file(home.db_path());
            let _ = std::fs::remove_file(FileStorage::journal_path(home.db_path()));
            let _ = std::fs::remove_file(home.dir().join(crate::home::RELAY_FILE));
            let why = printer
                .warnings
                .last()
                .cloned()
                .unwrap_or_else(|| "registration was not confirmed in time".into());
            return Err(match settled {
                Err(e) => e,
                Ok(_) => CliError::Refused(why),
            });
        }
        Ok(false) => {
            err_line("warning: some setup is still pending; it finishes with the next command")
        }
        Err(e) => return Err(e),
    }
    let importing = |e: &Engine| e.awaiting_welcome() || e.history_import_pending();
    if link.is_some() && importing(driver.engine()) && !wait.is_zero() {
        let mut stop = None;
        let deadline = Instant::now() + wait;
        driver
            .run_until(deadline, &mut stop, &mut printer, |v| {
                v.settled() && !importing(v.engine)
            })
            .await
            .map(|_| ())
            .or_else(|e| {
                if matches!(e, CliError::Unreachable { .. }) {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
    }
    let engine = driver.engine();
    let code = engine.contact_code().to_text()?;
    out_line(&format!(
        "initialised device {} of {} on relay {}",
        engine.device_id().to_hex(),
        engine.contact_code().name,
        driver.target().addr
    ));
    if link.is_some() {
        if let Some((done, total)) = engine.history_import_progress() {
            out_line(&format!(
                "history: imported {done} of {total} message(s); the rest comes with `hush sync`"
            ));
        } else if printer.linked && history && !engine.history_import_pending() {
            out_line("history imported from your other device");
        }
        if printer.linked {
            out_line("linked: contacts received from your other device");
        } else {
            out_line(
                "link requested: run `hush sync` on the device that made the code, then `hush sync` here",
            );
        }
    }
    out_line(&format!("contact code: {code}"));
    driver.shutdown().await;
    Ok(())
}

fn default_name() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty() && u.len() <= 64)
        .unwrap_or_else(|| "hush user".into())
}

/// One or two handshakes within [`CONNECT_BUDGET`], then close.
async fn probe(target: &RelayTarget) -> Result<(), CliError> {
    let deadline = Instant::now() + CONNECT_BUDGET;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match transport::connect(target, CONNECT_ATTEMPT.min(left)).await {
            Ok(conn) => {
                conn.close().await;
                return Ok(());
            }
            Err(e @ CliError::Unreachable { .. }) => {
                if Instant::now() + Duration::from_millis(500) >= deadline {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// `hush code`.
pub fn code(home: &Home) -> Result<(), CliError> {
    let d = open(home)?;
    out_line(&d.engine().contact_code().to_text()?);
    Ok(())
}

/// `hush link-code`.
pub async fn link_code(home: &Home) -> Result<(), CliError> {
    let mut d = open(home)?;
    let mut sink = Printer::new(Style::Human, false);
    let reply = d.command(Command::CreateLinkCode, &mut sink).await?;
    let Some(Reply::LinkCode(code)) = reply else {
        return Err(CliError::Invalid {
            what: "engine reply",
            reason: "no link code returned".into(),
        });
    };
    out_line(code.as_str());
    err_line(
        "keep this code secret: it lets a new device join your account (valid 10 minutes, once)",
    );
    // The new device needs this one registered and listed on the relay.
    if !d.engine().backlog().is_empty() {
        match reach(&mut d, CONNECT_BUDGET, &mut sink).await {
            Ok(()) => {
                settle(&mut d, FLUSH_BOUND, &mut sink).await?;
            }
            Err(e) => err_line(&format!(
                "warning: {e}; run `hush sync` before using the code"
            )),
        }
    }
    d.shutdown().await;
    Ok(())
}

/// `hush contact add NAME CODE`.
pub async fn contact_add(home: &Home, name: String, code: String) -> Result<(), CliError> {
    let mut parsed = ContactCode::parse(&code).map_err(|e| CliError::BadCode {
        what: "contact code",
        reason: e.to_string(),
    })?;
    if name.is_empty()
        || name.len() > hush_client::codes::MAX_CODE_TEXT
        || name.chars().any(char::is_control)
    {
        return Err(CliError::Invalid {
            what: "contact name",
            reason: "must be 1 to 256 bytes without control characters".into(),
        });
    }
    let mut d = open(home)?;
    if Names::of(d.engine()).find(&name).is_none() {
        // A name new here: not a group's, not `#…`.
        crate::group::check_new_name(
            d.engine(),
            &name,
            "contact name",
            hush_client::codes::MAX_CODE_TEXT,
        )?;
    }
    if parsed.user == d.engine().user_key() {
        return Err(CliError::Invalid {
            what: "contact code",
            reason: "that is your own code".into(),
        });
    }
    if let Some((user, _)) = Names::of(d.engine()).find(&name)
        && user != parsed.user
    {
        return Err(CliError::DuplicateContact(name));
    }
    parsed.name = name.clone();
    let mut sink = Printer::new(Style::Human, false);
    requeue_failed(&mut d, &mut sink).await?;
    d.command(Command::AddContact { code: parsed }, &mut sink)
        .await?;
    out_line(&format!("contact {name} added"));
    // Fetch their devices and tell this user's other devices; best effort.
    match reach(&mut d, CONNECT_BUDGET, &mut sink).await {
        Ok(()) => {
            settle(&mut d, FLUSH_BOUND, &mut sink).await?;
        }
        Err(e) => err_line(&format!(
            "warning: {e}; the contact is saved and syncs with the next command"
        )),
    }
    d.shutdown().await;
    Ok(())
}

/// `hush contact list`.
pub fn contact_list(home: &Home, style: Style) -> Result<(), CliError> {
    let d = open(home)?;
    let e = d.engine();
    for (user, name, conv) in e.contacts() {
        let devices = e.devices_of(&user).len();
        match style {
            Style::Json => out_line(
                &json!({"type": "contact", "name": name, "user": user.to_hex(),
                        "conversation_id": conv.to_hex(), "devices": devices})
                .to_string(),
            ),
            Style::Human => out_line(&format!(
                "{name}  ({devices} device(s), key {}…)",
                &user.to_hex()[..16]
            )),
        }
    }
    Ok(())
}

/// `hush send NAME TEXT`.
pub async fn send(
    home: &Home,
    name: String,
    text: String,
    wait: Duration,
    important: bool,
) -> Result<(), CliError> {
    let mut d = open(home)?;
    let conversation = conversation(&d, &name)?;
    let mut sink = Printer::new(Style::Human, false);
    requeue_failed(&mut d, &mut sink).await?;
    let command = if important {
        Command::SendImportantText { conversation, text }
    } else {
        Command::SendText { conversation, text }
    };
    let reply = d.command(command, &mut sink).await?;
    let Some(Reply::Message(id)) = reply else {
        return Err(CliError::Invalid {
            what: "engine reply",
            reason: "no message id returned".into(),
        });
    };
    // The message is in the outbox (durably) from here on.
    let deadline = Instant::now() + wait;
    let mut stop = None;
    // A full recipient inbox ends the wait too: it is reported, not
    // waited out (the engine keeps retrying in later runs).
    let stored = |v: &View<'_>| {
        matches!(
            v.engine.message_state(&id),
            Some(
                MessageState::Stored
                    | MessageState::Delivered
                    | MessageState::Read
                    | MessageState::RecipientInboxFull
            )
        )
    };
    d.run_until(deadline, &mut stop, &mut sink, stored).await?;
    let state = d.engine().message_state(&id);
    let ok = matches!(
        state,
        Some(MessageState::Stored | MessageState::Delivered | MessageState::Read)
    );
    if state == Some(MessageState::RecipientInboxFull) {
        d.shutdown().await;
        return Err(CliError::NotConfirmed(format!(
            "recipient's inbox is full, will retry: message {} stays in the outbox and goes out with the next command that connects once the recipient has caught up",
            id.to_hex()
        )));
    }
    if !ok {
        let reached = d.ever_connected();
        let err = if reached {
            CliError::NotConfirmed(format!(
                "the relay did not confirm message {} within {} s; it stays in the outbox and goes out with the next command that connects",
                id.to_hex(),
                wait.as_secs_f64()
            ))
        } else {
            err_line(&format!(
                "message {} stays in the outbox and goes out with the next command that connects",
                id.to_hex()
            ));
            d.unreachable_error()
        };
        d.shutdown().await;
        return Err(err);
    }
    // Stored. Hand over whatever else is queued (receipts, older messages).
    settle(&mut d, FLUSH_BOUND, &mut sink).await?;
    out_line(&format!("stored {}", id.to_hex()));
    d.shutdown().await;
    Ok(())
}

/// `hush sync`.
pub async fn sync(home: &Home, style: Style, wait: Duration) -> Result<(), CliError> {
    let mut d = open(home)?;
    let mut printer = Printer::new(style, true);
    catch_up(&mut d, &mut printer)?;
    requeue_failed(&mut d, &mut printer).await?;
    reach(&mut d, CONNECT_BUDGET, &mut printer).await?;
    // Drain the relay: authenticated, backlog pulled, every request
    // answered. No fixed bound: keep going while there is progress.
    loop {
        let seen = printer.events_seen;
        let mut stop = None;
        let outcome = d
            .run_until(Instant::now() + SYNC_STALL, &mut stop, &mut printer, |v| {
                v.engine.removed()
                    || (v.connected
                        && v.engine.connection_state() == ConnectionState::Live
                        && v.outstanding == 0)
            })
            .await?;
        if d.engine().removed() {
            d.shutdown().await;
            return Err(CliError::DeviceRemoved);
        }
        if outcome == Outcome::Done {
            break;
        }
        if printer.events_seen == seen {
            d.shutdown().await;
            return Err(CliError::NotConfirmed(format!(
                "sync made no progress for {} s (relay at {})",
                SYNC_STALL.as_secs(),
                d.target().addr
            )));
        }
    }
    // Hand over what this device owes (receipts, resend requests, answers).
    settle(&mut d, FLUSH_BOUND, &mut printer).await?;
    // Repair: wait a bounded time for senders to answer resend requests.
    let gaps = |e: &Engine| e.open_gaps().iter().any(|g| !g.control);
    if gaps(d.engine()) && !wait.is_zero() {
        let mut stop = None;
        d.run_until(Instant::now() + wait, &mut stop, &mut printer, |v| {
            v.settled() && !gaps(v.engine)
        })
        .await?;
    }
    report_gaps(&d, style);
    let owed = d.engine().backlog();
    if (owed.transmissions > 0 || owed.receipts > 0) && style == Style::Human {
        err_line(&format!(
            "{} item(s) still waiting for the relay; they go out with the next command that connects",
            owed.transmissions + owed.receipts
        ));
    }
    d.shutdown().await;
    Ok(())
}

fn catch_up(d: &mut Cli, printer: &mut Printer) -> Result<(), CliError> {
    let names = Names::of(d.engine());
    let me = d.engine().device_id();
    printer.catch_up(&names, me, &mut *d.storage_mut())
}

fn report_gaps(d: &Cli, style: Style) {
    let names = Names::of(d.engine());
    for g in d.engine().open_gaps().into_iter().filter(|g| !g.control) {
        match style {
            Style::Json => out_line(
                &json!({"type": "gap", "status": "pending", "conversation": names.conversation(&g.conversation),
                        "from_device": g.from_device.to_hex(), "count": g.missing})
                .to_string(),
            ),
            Style::Human => err_line(&format!(
                "{} message(s) from {} still missing (requested; run `hush sync` again later)",
                g.missing,
                names.conversation(&g.conversation)
            )),
        }
    }
}

/// `hush listen`.
pub async fn listen(home: &Home, style: Style, stop: StopSignal) -> Result<(), CliError> {
    let mut d = open(home)?;
    if d.engine().removed() {
        return Err(CliError::DeviceRemoved);
    }
    let mut printer = Printer::new(style, true);
    catch_up(&mut d, &mut printer)?;
    requeue_failed(&mut d, &mut printer).await?;
    let mut stop = Some(stop);
    // Far enough to mean "until stopped".
    let forever = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    // Until the first connection: say once if the relay cannot be reached.
    let mut warned = false;
    loop {
        let outcome = d
            .run_until(
                Instant::now() + CONNECT_BUDGET,
                &mut stop,
                &mut printer,
                |v| v.connected || v.engine.removed(),
            )
            .await?;
        if d.engine().removed() {
            d.shutdown().await;
            return Err(CliError::DeviceRemoved);
        }
        match outcome {
            Outcome::Done => break,
            Outcome::Stopped => return Ok(()),
            Outcome::Deadline => {
                if !warned {
                    warned = true;
                    err_line(&format!("warning: {}; retrying", d.unreachable_error()));
                }
            }
        }
    }
    loop {
        // Connected (or trying): run until the connection drops.
        let outcome = d
            .run_until(forever, &mut stop, &mut printer, |v| {
                (!v.connected && v.ever_connected) || v.engine.removed()
            })
            .await?;
        // Removed by its user (the relay cut the session, or refused it):
        // nothing will ever connect again.
        if d.engine().removed() {
            d.shutdown().await;
            return Err(CliError::DeviceRemoved);
        }
        if outcome != Outcome::Done {
            break;
        }
        // The engine reconnects with backoff; say so once per outage.
        if style == Style::Human {
            err_line("connection to the relay lost; reconnecting…");
        }
        let outcome = d
            .run_until(forever, &mut stop, &mut printer, |v| {
                v.connected || v.engine.removed()
            })
            .await?;
        if d.engine().removed() {
            d.shutdown().await;
            return Err(CliError::DeviceRemoved);
        }
        if outcome != Outcome::Done {
            break;
        }
        if style == Style::Human {
            err_line("reconnected");
        }
    }
    d.shutdown().await;
    Ok(())
}

/// `hush read NAME`: mark every unread message from the contact read.
pub async fn read(home: &Home, name: String) -> Result<(), CliError> {
    let mut d = open(home)?;
    let conversation = conversation(&d, &name)?;
    let me = d.engine().device_id();
    let unread: Vec<(MessageId, hush_protocol::DeviceId)> =
        whole_history(&*d.storage(), &conversation)?
            .into_iter()
            .filter(|e| !e.read && !e.record.outgoing && e.record.from_device != me)
            .map(|e| (e.record.id, e.record.from_device))
            .collect();
    let mut sink = Printer::new(Style::Human, false);
    requeue_failed(&mut d, &mut sink).await?;
    let n = unread.len();
    if n > 0 {
        d.command(
            Command::MarkRead {
                conversation,
                messages: unread,
            },
            &mut sink,
        )
        .await?;
    }
    out_line(&format!("marked {n} message(s) from {name} read"));
    if n == 0 {
        return Ok(());
    }
    // Receipts to the sender and the read sync to this user's other devices.
    if let Err(e) = reach(&mut d, CONNECT_BUDGET, &mut sink).await {
        err_line("the read marks are saved here and sync with the next command that connects");
        return Err(e);
    }
    settle(&mut d, FLUSH_BOUND, &mut sink).await?;
    d.shutdown().await;
    Ok(())
}

/// `hush history NAME`.
pub fn history(home: &Home, name: String, limit: usize, style: Style) -> Result<(), CliError> {
    let d = open(home)?;
    let target = crate::group::resolve(d.engine(), &name)?;
    let names = Names::of(d.engine());
    let page = match target {
        crate::group::Target::Contact(c) => hush_client::history(&*d.storage(), &c, None, limit)?,
        crate::group::Target::Group(g) => {
            crate::group::history(d.engine(), &*d.storage(), &g, limit)?
        }
    };
    for e in &page {
        match style {
            Style::Json => {
                let mut v = message_json(&names, e);
                if let crate::group::Target::Group(_) = target
                    && e.record.outgoing
                {
                    v["members"] =
                        crate::group::member_states_json(d.engine(), &names, &e.record.id);
                }
                out_line(&v.to_string())
            }
            Style::Human => {
                let mut line = message_text(&names, e);
                if let Some(s) = e.state {
                    line.push_str(&format!("  ({})", state_name(s)));
                } else if !e.record.outgoing && e.read {
                    line.push_str("  (read)");
                }
                if let crate::group::Target::Group(_) = target
                    && e.record.outgoing
                {
                    line.push_str(&crate::group::member_summary(d.engine(), &e.record.id));
                }
                out_line(&line);
            }
        }
    }
    Ok(())
}

/// `hush status`.
pub fn status(home: &Home, style: Style) -> Result<(), CliError> {
    let d = open(home)?;
    let e = d.engine();
    let names = Names::of(e);
    let me = e.user_key();
    let counters = e.counters();
    let backlog = e.backlog();
    // Each contact's history is read once: for the unread counts, and to
    // name the text and conversation of outbox entries (history is packed,
    // so a message is not one look-up by id).
    let mut contacts = Vec::new();
    let mut sent: std::collections::HashMap<MessageId, (ConversationId, String)> =
        std::collections::HashMap::new();
    for (user, name, conv) in e.contacts() {
        let history = whole_history(&*d.storage(), &conv)?;
        let unread = history
            .iter()
            .filter(|h| !h.read && !h.record.outgoing)
            .count();
        for h in history.into_iter().filter(|h| h.record.outgoing) {
            sent.insert(h.record.id, (conv, h.record.text));
        }
        contacts.push((name, e.devices_of(&user).len(), unread));
    }
    let mut groups = Vec::new();
    for g in e.groups() {
        let history = whole_history(&*d.storage(), &g.id)?;
        let unread = history
            .iter()
            .filter(|h| !h.read && !h.record.outgoing)
            .count();
        for h in history.into_iter().filter(|h| h.record.outgoing) {
            sent.insert(h.record.id, (g.id, h.record.text));
        }
        groups.push((g.name, g.members.len(), g.active, unread));
    }
    let mut outbox = Vec::new();
    for id in e.outbox_ids() {
        let state = e.message_state(&id).or(stored_state(&*d.storage(), &id)?);
        let (to, text) = match sent.remove(&id) {
            Some((c, text)) => (Some(names.conversation(&c)), Some(text)),
            None => (None, None),
        };
        outbox.push((id, state, to, text));
    }
    let gaps = e.open_gaps();
    match style {
        Style::Json => {
            let v = json!({
                "type": "status",
                "name": e.contact_code().name,
                "user": me.to_hex(),
                "device": e.device_id().to_hex(),
                "devices": e.devices_of(&me).iter().map(|d| d.to_hex()).collect::<Vec<_>>(),
                "relay": d.target().addr,
                "transport": {
                    "setting": d.target().transport.name(),
                    "last": last_link(home),
                },
                "contacts": contacts.iter().map(|(n, devs, unread)| json!({"name": n, "devices": devs, "unread": unread})).collect::<Vec<_>>(),
                "groups": groups.iter().map(|(n, members, active, unread)| json!({"name": n, "members": members, "active": active, "unread": unread})).collect::<Vec<_>>(),
                "outbox": outbox.iter().map(|(id, s, to, text)| json!({
                    "id": id.to_hex(), "state": s.map(state_name), "to": to, "text": text,
                    "sent_at": id.timestamp_ms(),
                })).collect::<Vec<_>>(),
                "unsent": e.unsent(),
                "gaps": gaps.iter().map(|g| json!({
                    "conversation": if g.control { "control".to_string() } else { names.conversation(&g.conversation) },
                    "from_device": g.from_device.to_hex(), "missing": g.missing, "requested": g.requested,
                })).collect::<Vec<_>>(),
                "pending": {
                    "registered": !backlog.unregistered,
                    "device_list_unpublished": backlog.list_unpublished,
                    "link_pending": backlog.link_pending,
                    "transmissions": backlog.transmissions,
                    "receipts": backlog.receipts,
                },
                "counters": {
                    "duplicates_dropped": counters.duplicates_dropped,
                    "out_of_order": counters.out_of_order,
                    "gaps_detected": counters.gaps_detected,
                    "recovered": counters.recovered,
                    "unrecoverable": counters.unrecoverable,
                    "rejected": counters.rejected,
                    "resent": counters.resent,
                    "probes": counters.probes,
                    "suppressed": counters.suppressed,
                    "relay_claims_ignored": counters.relay_claims_ignored,
                    "relay_claims_refuted": counters.relay_claims_refuted,
                    "peer_claims_ignored": counters.peer_claims_ignored,
                    "parked_dropped": counters.parked_dropped,
                    "recalls_refused": counters.recalls_refused,
                    "undecryptable_skipped": counters.undecryptable_skipped,
                    "inbox_full_refusals": counters.inbox_full_refusals,
                    "syncs": counters.syncs,
                    "sync_latency_ms_total": counters.sync_latency_ms_total,
                    "last_sync_latency_ms": counters.last_sync_latency_ms,
                    "average_sync_latency_ms": counters.sync_latency_ms_total.checked_div(counters.syncs),
                    "list_notices": counters.list_notices,
                    "old_lists_ignored": counters.old_lists_ignored,
                    "retired": counters.retired,
                    "removed": counters.removed,
                },
            });
            out_line(&v.to_string());
        }
        Style::Human => {
            out_line(&format!(
                "{} — device {} on relay {}{}",
                e.contact_code().name,
                &e.device_id().to_hex()[..12],
                d.target().addr,
                if backlog.unregistered {
                    " (not registered yet)"
                } else {
                    ""
                }
            ));
            out_line(&format!(
                "devices of this account: {}",
                e.devices_of(&me).len()
            ));
            out_line(&format!("contacts: {}", contacts.len()));
            for (n, devs, unread) in &contacts {
                out_line(&format!("  {n}: {devs} device(s), {unread} unread"));
            }
            if !groups.is_empty() {
                out_line(&format!("groups: {}", groups.len()));
                for (n, members, active, unread) in &groups {
                    out_line(&format!(
                        "  #{n}: {members} member(s), {unread} unread{}",
                        if *active { "" } else { " (not a member)" }
                    ));
                }
            }
            let waiting: Vec<_> = outbox
                .iter()
                .filter(|(_, s, _, _)| {
                    matches!(
                        s,
                        Some(
                            MessageState::Sending
                                | MessageState::Failed
                                | MessageState::RecipientInboxFull
                        )
                    )
                })
                .collect();
            out_line(&format!(
                "outbox: {} message(s), {} not yet stored by the relay",
                outbox.len(),
                waiting.len()
            ));
            for (id, s, to, text) in waiting {
                out_line(&format!(
                    "  [{}] to {}: {} ({})",
                    format_utc(id.timestamp_ms()),
                    to.as_deref().unwrap_or("?"),
                    text.as_deref().unwrap_or(""),
                    s.map_or("?", state_name)
                ));
            }
            let chat_gaps: Vec<_> = gaps.iter().filter(|g| !g.control).collect();
            out_line(&format!("open gaps: {}", chat_gaps.len()));
            for g in chat_gaps {
                out_line(&format!(
                    "  {}: {} missing ({} requested)",
                    names.conversation(&g.conversation),
                    g.missing,
                    g.requested
                ));
            }
            out_line(&format!(
                "counters: {} duplicate(s) dropped, {} out of order, {} gap(s) detected, {} recovered, {} unrecoverable, {} rejected, {} resent",
                counters.duplicates_dropped,
                counters.out_of_order,
                counters.gaps_detected,
                counters.recovered,
                counters.unrecoverable,
                counters.rejected,
                counters.resent
            ));
            out_line(&format!(
                "counters: {} probe(s), {} suppressed, {} relay claim(s) ignored, {} refuted, {} peer claim(s) ignored, {} parked dropped, {} recall(s) refused, {} undecryptable skipped, {} inbox-full refusal(s)",
                counters.probes,
                counters.suppressed,
                counters.relay_claims_ignored,
                counters.relay_claims_refuted,
                counters.peer_claims_ignored,
                counters.parked_dropped,
                counters.recalls_refused,
                counters.undecryptable_skipped,
                counters.inbox_full_refusals
            ));
            out_line(&format!(
                "sync: {} sync(s), average latency {} ms, last {} ms",
                counters.syncs,
                counters
                    .sync_latency_ms_total
                    .checked_div(counters.syncs)
                    .unwrap_or(0),
                counters.last_sync_latency_ms
            ));
            out_line(&format!(
                "devices: {} device-list notice(s), {} older list(s) ignored, retired {} time(s), removed {}",
                counters.list_notices,
                counters.old_lists_ignored,
                counters.retired,
                if counters.removed > 0 { "yes" } else { "no" }
            ));
        }
    }
    Ok(())
}
