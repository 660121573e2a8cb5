//! What the user sees: messages on stdout, progress and notices on stderr,
//! or one JSON object per line with `--json`.
//!
//! Messages are printed from the stored history, not straight from engine
//! events: a per-conversation "printed through" mark (`c/printed/<conv>`,
//! beside the engine's records, outside its `s/` and `h/` namespaces)
//! remembers the last history position shown. So a message that arrived
//! while another command was connected (a `send` also receives) is still
//! shown by the next `sync` or `listen`, and each message is shown once.

use crate::driver::{Batch, Sink};
use crate::error::CliError;
use hush_client::storage::{self, keys};
use hush_client::{
    ConnectionState, Engine, Event, GroupInfo, HistoryEntry, MessageState, Removal, Storage,
    StorageOp, history,
};
use hush_protocol::{ConversationId, DeviceId, MessageId, UserKey};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

/// Prefix of the printed-through marks.
const PRINTED: &[u8] = b"c/printed/";
/// History entries read per page when catching up on unprinted messages.
const HISTORY_PAGE: usize = 256;
/// Progress lines at most this often (human mode).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Output style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Friendly text.
    Human,
    /// One JSON object per line on stdout.
    Json,
}

/// Write one line to stdout and flush it (scripts read line by line).
pub fn out_line(line: &str) {
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    let _ = writeln!(lock, "{line}");
    let _ = lock.flush();
}

/// Write one line to stderr.
pub fn err_line(line: &str) {
    let stderr = std::io::stderr();
    let mut lock = stderr.lock();
    let _ = writeln!(lock, "{line}");
    let _ = lock.flush();
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for a Unix time in ms.
pub fn format_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Lower-case name of a delivery state.
pub fn state_name(s: MessageState) -> &'static str {
    match s {
        MessageState::Sending => "sending",
        MessageState::Stored => "stored",
        MessageState::Delivered => "delivered",
        MessageState::Read => "read",
        MessageState::Failed => "failed",
        MessageState::RecipientInboxFull => "recipient-inbox-full",
    }
}

fn connection_name(s: ConnectionState) -> &'static str {
    match s {
        ConnectionState::Offline => "offline",
        ConnectionState::Connecting => "connecting",
        ConnectionState::Syncing => "syncing",
        ConnectionState::Live => "live",
    }
}

/// Display names of users and conversations, from the engine's contacts.
#[derive(Debug, Clone)]
pub struct Names {
    me: UserKey,
    contacts: Vec<(UserKey, String, ConversationId)>,
    /// Groups, by id.
    groups: Vec<(ConversationId, GroupInfo)>,
}

impl Names {
    /// Snapshot of the engine's contacts and groups.
    pub fn of(engine: &Engine) -> Names {
        Names {
            me: engine.user_key(),
            contacts: engine.contacts(),
            groups: engine.groups().into_iter().map(|g| (g.id, g)).collect(),
        }
    }

    /// The group's name if `c` is a group, fit to print (see [`printable`]).
    pub fn group(&self, c: &ConversationId) -> Option<String> {
        self.groups
            .iter()
            .find(|(g, _)| g == c)
            .map(|(_, g)| printable(&g.name))
    }

    /// The conversation as people write it on the command line: the
    /// contact's name, or `#group`.
    pub fn label(&self, c: &ConversationId) -> String {
        match self.group(c) {
            Some(g) => format!("#{g}"),
            None => self.conversation(c),
        }
    }

    /// "me" for this user, the contact's name, or a short key.
    pub fn user(&self, u: &UserKey) -> String {
        if *u == self.me {
            return "me".into();
        }
        self.contacts
            .iter()
            .find(|(k, _, _)| k == u)
            .map(|(_, n, _)| printable(n))
            .unwrap_or_else(|| format!("user-{}", &u.to_hex()[..8]))
    }

    /// The contact a conversation is with, or the group's name.
    pub fn conversation(&self, c: &ConversationId) -> String {
        self.contacts
            .iter()
            .find(|(_, _, conv)| conv == c)
            .map(|(_, n, _)| printable(n))
            .or_else(|| self.group(c))
            .unwrap_or_else(|| format!("conversation-{}", &c.to_hex()[..8]))
    }

    /// Find a contact by name.
    pub fn find(&self, name: &str) -> Option<(UserKey, ConversationId)> {
        self.contacts
            .iter()
            .find(|(_, n, _)| n == name)
            .map(|(u, _, c)| (*u, *c))
    }

    /// How many contacts carry this name (more than one when a group
    /// brought in a member under a name already used here).
    pub fn count(&self, name: &str) -> usize {
        self.contacts.iter().filter(|(_, n, _)| n == name).count()
    }

    /// Every conversation: contacts', then groups'.
    pub fn conversations(&self) -> Vec<ConversationId> {
        self.contacts
            .iter()
            .map(|(_, _, c)| *c)
            .chain(self.groups.iter().map(|(g, _)| *g))
            .collect()
    }
}

/// One message as a JSON object.
pub fn message_json(names: &Names, e: &HistoryEntry) -> Value {
    let r = &e.record;
    json!({
        "type": "message",
        "id": r.id.to_hex(),
        "from": names.user(&r.from_user),
        "from_device": r.from_device.to_hex(),
        "conversation": names.conversation(&r.conversation),
        "conversation_id": r.conversation.to_hex(),
        "group": names.group(&r.conversation).is_some(),
        "sender_seq": r.sender_seq,
        "text": r.text,
        "sent_at": r.sent_at_ms,
        "stored_at": r.stored_at_ms,
        "outgoing": r.outgoing,
        "read": e.read,
        "state": e.state.map(state_name),
    })
}

/// A name another user chose (a group's, or a member's that a group
/// brought in as a contact), fit for a terminal: control
/// characters (escape sequences, line breaks) become U+FFFD, so a group
/// name cannot rewrite the screen or forge output lines.
pub fn printable(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// A group as `{"type": "group", "name", "id", "members": [{"name", "user"}], "active"}`.
pub fn group_json(names: &Names, id: &ConversationId) -> Value {
    match names.groups.iter().find(|(g, _)| g == id) {
        Some((_, info)) => json!({
            "type": "group",
            "name": printable(&info.name),
            "id": id.to_hex(),
            "members": info.members.iter().map(|u| json!({"name": names.user(u), "user": u.to_hex()})).collect::<Vec<_>>(),
            "active": info.active,
        }),
        None => {
            json!({"type": "group", "name": null, "id": id.to_hex(), "members": [], "active": false})
        }
    }
}

/// One message as a line of text.
pub fn message_text(names: &Names, e: &HistoryEntry) -> String {
    let r = &e.record;
    let when = format_utc(r.sent_at_ms);
    if r.outgoing {
        format!("[{when}] me → {}: {}", names.label(&r.conversation), r.text)
    } else if let Some(g) = names.group(&r.conversation) {
        format!("[{when}] {} in #{g}: {}", names.user(&r.from_user), r.text)
    } else {
        format!("[{when}] {}: {}", names.user(&r.from_user), r.text)
    }
}

fn printed_key(c: &ConversationId) -> Vec<u8> {
    let mut k = PRINTED.to_vec();
    k.extend_from_slice(c.as_bytes());
    k
}

/// History entries of `conv` after position `after` (all if `None`), oldest first.
pub fn history_after<S: Storage + ?Sized>(
    storage: &S,
    conv: &ConversationId,
    after: Option<u64>,
) -> Result<Vec<HistoryEntry>, CliError> {
    let mut newest_first = Vec::new();
    let mut before = None;
    loop {
        let page = history(storage, conv, before, HISTORY_PAGE)?;
        let Some(oldest) = page.first().map(|e| e.order) else {
            break;
        };
        let reached = after.is_some_and(|a| oldest <= a);
        newest_first.extend(
            page.into_iter()
                .rev()
                .filter(|e| after.is_none_or(|a| e.order > a)),
        );
        if reached {
            break;
        }
        before = Some(oldest);
    }
    newest_first.reverse();
    Ok(newest_first)
}

/// The whole history of a conversation, oldest first.
pub fn whole_history<S: Storage + ?Sized>(
    storage: &S,
    conv: &ConversationId,
) -> Result<Vec<HistoryEntry>, CliError> {
    history_after(storage, conv, None)
}

/// Prints what a command shows.
#[derive(Debug)]
pub struct Printer {
    style: Style,
    /// Show messages (sync, listen) rather than only notices.
    messages: bool,
    last_progress: Option<Instant>,
    /// Connection problems seen (for a one-time notice in `listen`).
    pub warnings: Vec<String>,
    /// The device received `Linked` (a new device was welcomed).
    pub linked: bool,
    /// Count of events seen (progress detection).
    pub events_seen: u64,
}

impl Printer {
    /// A printer; `messages` turns on message and event output.
    pub fn new(style: Style, messages: bool) -> Printer {
        Printer {
            style,
            messages,
            last_progress: None,
            warnings: Vec::new(),
            linked: false,
            events_seen: 0,
        }
    }

    /// Print every stored message not printed yet, in every conversation.
    pub fn catch_up<S: Storage>(
        &mut self,
        names: &Names,
        me: DeviceId,
        storage: &mut S,
    ) -> Result<(), CliError> {
        for c in names.conversations() {
            self.print_new(me, names, storage, &c)?;
        }
        Ok(())
    }

    fn print_new<S: Storage>(
        &mut self,
        me: DeviceId,
        names: &Names,
        storage: &mut S,
        conv: &ConversationId,
    ) -> Result<(), CliError> {
        let key = printed_key(conv);
        let after = storage
            .get(&key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes);
        let entries = history_after(storage, conv, after)?;
        let Some(last) = entries.last().map(|e| e.order) else {
            return Ok(());
        };
        for e in entries.iter().filter(|e| e.record.from_device != me) {
            match self.style {
                Style::Json => out_line(&message_json(names, e).to_string()),
                Style::Human => out_line(&message_text(names, e)),
            }
        }
        storage.apply(&[StorageOp::Put {
            key,
            value: last.to_be_bytes().to_vec(),
        }])?;
        Ok(())
    }

    fn json_event(&self, names: &Names, e: &Event) -> Option<Value> {
        let dev = |d: &DeviceId| d.to_hex();
        let conv = |c: &ConversationId| names.conversation(c);
        let ids = |ids: &[MessageId]| ids.iter().map(|i| i.to_hex()).collect::<Vec<_>>();
        Some(match e {
            Event::Message(_) => return None,
            Event::MessageState {
                id,
                conversation,
                state,
            } => {
                json!({"type": "state", "id": id.to_hex(), "conversation": conv(conversation), "state": state_name(*state)})
            }
            Event::MessageRemoved {
                id,
                conversation,
                reason,
            } => json!({"type": "removed", "id": id.to_hex(), "conversation": conv(conversation),
                        "reason": match reason { Removal::Recalled => "recalled", Removal::Deleted => "deleted" }}),
            Event::ReadSynced {
                conversation,
                ids: list,
            } => {
                json!({"type": "read", "conversation": conv(conversation), "ids": ids(list)})
            }
            Event::SyncProgress { done, total } => {
                json!({"type": "progress", "done": done, "total": total})
            }
            Event::GapDetected {
                conversation,
                from_device,
                count,
            } => json!({"type": "gap", "status": "detected", "conversation": conv(conversation),
                        "from_device": dev(from_device), "count": count}),
            Event::GapRecovered {
                conversation,
                from_device,
                count,
            } => json!({"type": "gap", "status": "recovered", "conversation": conv(conversation),
                        "from_device": dev(from_device), "count": count}),
            Event::Unrecoverable {
                conversation,
                from_device,
                count,
            } => {
                json!({"type": "gap", "status": "unrecoverable", "conversation": conv(conversation),
                        "from_device": dev(from_device), "count": count})
            }
            Event::KeyRotation { device, epoch } => {
                json!({"type": "key_rotation", "device": dev(device), "epoch": epoch})
            }
            Event::RelayMisbehaviour {
                conversation,
                from_device,
                count,
            } => {
                json!({"type": "relay_misbehaviour", "conversation": conv(conversation),
                        "from_device": dev(from_device), "count": count})
            }
            Event::Connection(s) => json!({"type": "connection", "state": connection_name(*s)}),
            Event::ContactAdded {
                user,
                name,
                conversation,
            } => json!({"type": "contact_added", "name": name, "user": user.to_hex(),
                        "conversation_id": conversation.to_hex()}),
            Event::DevicesChanged { user, devices } => {
                json!({"type": "devices", "user": names.user(user),
                        "devices": devices.iter().map(|d| d.to_hex()).collect::<Vec<_>>()})
            }
            Event::DeviceLinked { device } => {
                json!({"type": "device_linked", "device": dev(device)})
            }
            Event::Linked => json!({"type": "linked"}),
            Event::GroupChanged { group } => return Some(group_json(names, group)),
            Event::Warning(w) => json!({"type": "warning", "message": w}),
            Event::HistoryImport { done, total } => {
                json!({"type": "history_import", "done": done, "total": total})
            }
            Event::HistoryExportWanted { device } => {
                json!({"type": "history_export", "device": dev(device)})
            }
            Event::HistoryExported { device, messages } => {
                json!({"type": "history_exported", "device": dev(device), "messages": messages})
            }
            Event::Removed => json!({"type": "removed_device"}),
            Event::Retired { last_seen_ms } => {
                json!({"type": "retired", "last_seen_ms": last_seen_ms})
            }
        })
    }

    fn human_event(&mut self, names: &Names, e: &Event) {
        match e {
            Event::SyncProgress { done, total } => {
                let due = self
                    .last_progress
                    .is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
                if *total > u64::from(hush_protocol::limits::MAX_PAGE) && (due || done >= total) {
                    self.last_progress = Some(Instant::now());
                    err_line(&format!("syncing {done} of {total}…"));
                }
            }
            Event::GapDetected {
                conversation,
                count,
                ..
            } => err_line(&format!(
                "{count} missing message(s) from {} detected; asking the sender to resend",
                names.conversation(conversation)
            )),
            Event::GapRecovered {
                conversation,
                count,
                ..
            } => err_line(&format!(
                "{count} missing message(s) from {} recovered",
                names.conversation(conversation)
            )),
            Event::Unrecoverable {
                conversation,
                count,
                ..
            } => err_line(&format!(
                "{count} message(s) from {} could not be recovered",
                names.conversation(conversation)
            )),
            Event::ReadSynced { conversation, ids } => err_line(&format!(
                "{} message(s) with {} marked read on another device",
                ids.len(),
                names.conversation(conversation)
            )),
            Event::ContactAdded { name, .. } => err_line(&format!("contact {name} added")),
            Event::DeviceLinked { device } => err_line(&format!(
                "new device {} linked to this account",
                device.to_hex()
            )),
            Event::Linked => err_line("this device is now linked; contacts received"),
            Event::GroupChanged { group } => {
                let v = group_json(names, group);
                let members = v["members"].as_array().map_or(0, Vec::len);
                err_line(&format!(
                    "group #{}: {members} member(s){}",
                    names.conversation(group),
                    if v["active"] == true {
                        ""
                    } else {
                        ", you are no longer a member"
                    }
                ));
            }
            Event::HistoryImport { done, total } => {
                err_line(&format!("importing {done} of {total}"))
            }
            Event::HistoryExportWanted { .. } => err_line("sending the history to the new device…"),
            Event::HistoryExported { messages, .. } => err_line(&format!(
                "history of {messages} message(s) uploaded for the new device"
            )),
            Event::Removed => {
                err_line("this device was removed by its user; it receives nothing new")
            }
            Event::Retired { last_seen_ms } => err_line(&format!(
                "this device was retired: the relay had not seen it since {} (ms since the \
                 epoch); messages sent meanwhile did not reach it",
                last_seen_ms
            )),
            Event::MessageRemoved {
                conversation,
                reason,
                ..
            } => err_line(&format!(
                "a message with {} was {}",
                names.conversation(conversation),
                match reason {
                    Removal::Recalled => "recalled",
                    Removal::Deleted => "deleted",
                }
            )),
            _ => {}
        }
    }
}

impl<S: Storage> Sink<S> for Printer {
    fn batch(&mut self, b: Batch<'_, S>) -> Result<(), CliError> {
        let names = Names::of(b.engine);
        let mut conversations = BTreeSet::new();
        for e in b.events {
            self.events_seen += 1;
            match e {
                Event::Message(r) => {
                    conversations.insert(r.conversation);
                    continue;
                }
                Event::Linked => self.linked = true,
                // Import progress shows even where events are not printed
                // (`init --link`).
                Event::HistoryImport { done, total } if !self.messages => {
                    err_line(&format!("importing {done} of {total}"));
                }
                Event::Warning(w) => {
                    self.warnings.push(w.clone());
                    if self.style == Style::Human || !self.messages {
                        err_line(&format!("warning: {w}"));
                    }
                }
                _ => {}
            }
            if !self.messages {
                continue;
            }
            match self.style {
                Style::Json => {
                    if let Some(v) = self.json_event(&names, e) {
                        out_line(&v.to_string());
                    }
                }
                Style::Human => self.human_event(&names, e),
            }
        }
        if self.messages {
            for c in conversations {
                self.print_new(b.engine.device_id(), &names, b.storage, &c)?;
            }
        }
        Ok(())
    }
}

/// Decode a stored delivery state (for status output).
pub fn stored_state<S: Storage + ?Sized>(
    storage: &S,
    id: &MessageId,
) -> Result<Option<MessageState>, CliError> {
    let key = keys::history_state(id);
    Ok(match storage.get(&key)? {
        Some(v) => Some(storage::decode(&key, &v)?),
        None => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_others_cannot_drive_the_terminal() {
        assert_eq!(
            printable("team\u{1b}[2J\r\nalice: fake line\u{7}"),
            "team\u{fffd}[2J\u{fffd}\u{fffd}alice: fake line\u{fffd}"
        );
        assert_eq!(printable("Wochenende 🎉"), "Wochenende 🎉");
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_utc(1_700_000_000_000), "2023-11-14 22:13:20");
    }
}
