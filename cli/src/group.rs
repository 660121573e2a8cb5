//! `hush group …`, and how a name on the command line becomes a
//! conversation.
//!
//! # Names
//!
//! Contacts and groups share one name space on the command line (`hush send
//! NAME`, `hush history NAME`, `hush read NAME`), so the rule is:
//!
//! - `#NAME` is always a group: by its name, or by its id (32 hex digits).
//! - A bare `NAME` is the contact of that name if there is one, else the
//!   group of that name. A bare name that is **both** a contact's and a
//!   group's is refused ([`CliError::AmbiguousName`]): it is never guessed,
//!   because a message sent to the wrong one cannot be taken back.
//! - Several groups of one name (others name the groups they invite you to)
//!   are refused by name ([`CliError::AmbiguousGroup`]); `#ID` names one.
//! - Several contacts of one name (a group brings in its members as
//!   contacts, under the names their inviter uses) are refused too
//!   ([`CliError::AmbiguousContact`]).
//! - A group made here may not take a contact's or another group's name,
//!   and a contact added here may not take a group's name
//!   ([`CliError::NameTaken`]); neither may start with `#`.
//!
//! # Output
//!
//! `group list` prints one line per group (name, members, active); with
//! `--json` one object per group: `{"type": "group", "name", "id",
//! "members": [{"name", "user"}], "active"}`.

use crate::commands::{flush_after_change, open};
use crate::error::CliError;
use crate::output::{Names, Printer, Style, group_json, out_line, state_name, whole_history};
use hush_client::{Command, Engine, HistoryEntry, MessageState, Reply, Storage};
use hush_protocol::{ConversationId, MessageId, UserKey};
use serde_json::{Value, json};

/// Longest group name, in bytes (the engine's bound).
pub const MAX_GROUP_NAME: usize = hush_client::payload::MAX_GROUP_NAME_BYTES;

/// `hush group …`.
#[derive(Debug, clap::Subcommand)]
pub enum GroupCmd {
    /// Create a group with some of your contacts (you are a member too).
    Create {
        /// The group's name (not a contact's or another group's name).
        name: String,
        /// Contacts to add, by name.
        #[arg(required = true)]
        contacts: Vec<String>,
    },
    /// Add contacts to a group.
    Add {
        /// The group (`NAME` or `#NAME`).
        name: String,
        /// Contacts to add, by name.
        #[arg(required = true)]
        contacts: Vec<String>,
    },
    /// Remove members from a group: they receive nothing sent after it.
    Remove {
        /// The group (`NAME` or `#NAME`).
        name: String,
        /// Members to remove, by contact name.
        #[arg(required = true)]
        contacts: Vec<String>,
    },
    /// Leave a group (its history stays here).
    Leave {
        /// The group (`NAME` or `#NAME`).
        name: String,
    },
    /// Rename a group (for every member).
    Rename {
        /// The group (`NAME` or `#NAME`).
        name: String,
        /// The new name.
        new_name: String,
    },
    /// List groups: name, members, whether you are still a member.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// Run one `hush group` subcommand.
pub async fn run(home: &crate::home::Home, cmd: GroupCmd) -> Result<(), CliError> {
    match cmd {
        GroupCmd::Create { name, contacts } => create(home, name, contacts).await,
        GroupCmd::Add { name, contacts } => change(home, &name, contacts, true).await,
        GroupCmd::Remove { name, contacts } => change(home, &name, contacts, false).await,
        GroupCmd::Leave { name } => leave(home, &name).await,
        GroupCmd::Rename { name, new_name } => rename(home, &name, new_name).await,
        GroupCmd::List { json } => list(home, if json { Style::Json } else { Style::Human }),
    }
}

/// What a command-line name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The one-to-one conversation with a contact.
    Contact(ConversationId),
    /// A group.
    Group(ConversationId),
}

impl Target {
    /// The conversation either way.
    pub fn conversation(self) -> ConversationId {
        match self {
            Target::Contact(c) | Target::Group(c) => c,
        }
    }
}

/// The group named `name` (a group name, or an id in hex).
fn find_group(engine: &Engine, name: &str) -> Result<ConversationId, CliError> {
    let groups = engine.groups();
    if let Ok(id) = ConversationId::from_hex(name.trim())
        && groups.iter().any(|g| g.id == id)
    {
        return Ok(id);
    }
    let mut named = groups.iter().filter(|g| g.name == name);
    match (named.next(), named.next()) {
        (Some(g), None) => Ok(g.id),
        (Some(_), Some(_)) => Err(CliError::AmbiguousGroup(name.to_string())),
        (None, _) => Err(CliError::UnknownGroup(name.to_string())),
    }
}

/// Resolve a command-line name by the rule in the module docs.
pub fn resolve(engine: &Engine, name: &str) -> Result<Target, CliError> {
    if let Some(group) = name.strip_prefix('#') {
        return find_group(engine, group).map(Target::Group);
    }
    let names = Names::of(engine);
    if names.count(name) > 1 {
        return Err(CliError::AmbiguousContact(name.to_string()));
    }
    let contact = names.find(name).map(|(_, c)| c);
    let is_group = engine.groups().iter().any(|g| g.name == name);
    match (contact, is_group) {
        (Some(_), true) => Err(CliError::AmbiguousName(name.to_string())),
        (Some(c), false) => Ok(Target::Contact(c)),
        (None, true) => find_group(engine, name).map(Target::Group),
        (None, false) => Err(CliError::UnknownContact(name.to_string())),
    }
}

/// A name for a new group or contact must be free and well-formed.
pub fn check_new_name(
    engine: &Engine,
    name: &str,
    what: &'static str,
    max: usize,
) -> Result<(), CliError> {
    if name.trim().is_empty() || name.len() > max || name.chars().any(char::is_control) {
        return Err(CliError::Invalid {
            what,
            reason: format!("must be 1 to {max} bytes without control characters"),
        });
    }
    if name.starts_with('#') {
        return Err(CliError::Invalid {
            what,
            reason: "must not start with `#` (it marks group names on the command line)".into(),
        });
    }
    if engine.groups().iter().any(|g| g.name == name) {
        return Err(CliError::NameTaken(name.to_string()));
    }
    Ok(())
}

/// Contacts by name, as user keys.
fn members_by_name(engine: &Engine, names: &[String]) -> Result<Vec<UserKey>, CliError> {
    let known = Names::of(engine);
    let mut out: Vec<UserKey> = Vec::with_capacity(names.len());
    for n in names {
        if known.count(n) > 1 {
            return Err(CliError::AmbiguousContact(n.clone()));
        }
        let (user, _) = known
            .find(n)
            .ok_or_else(|| CliError::UnknownContact(n.clone()))?;
        if !out.contains(&user) {
            out.push(user);
        }
    }
    Ok(out)
}

async fn create(
    home: &crate::home::Home,
    name: String,
    contacts: Vec<String>,
) -> Result<(), CliError> {
    let mut d = open(home)?;
    check_new_name(d.engine(), &name, "group name", MAX_GROUP_NAME)?;
    if Names::of(d.engine()).find(&name).is_some() {
        return Err(CliError::NameTaken(name));
    }
    let members = members_by_name(d.engine(), &contacts)?;
    let mut sink = Printer::new(Style::Human, false);
    let reply = d
        .command(
            Command::CreateGroup {
                name: name.clone(),
                members,
            },
            &mut sink,
        )
        .await?;
    let Some(Reply::Group(id)) = reply else {
        return Err(CliError::Invalid {
            what: "engine reply",
            reason: "no group id returned".into(),
        });
    };
    out_line(&format!(
        "group {name} created with {} ({})",
        contacts.join(", "),
        id.to_hex()
    ));
    flush_after_change(&mut d, &mut sink, "the group is saved").await
}

async fn change(
    home: &crate::home::Home,
    name: &str,
    contacts: Vec<String>,
    add: bool,
) -> Result<(), CliError> {
    let mut d = open(home)?;
    let group = find_group_target(d.engine(), name)?;
    let members = members_by_name(d.engine(), &contacts)?;
    let mut sink = Printer::new(Style::Human, false);
    let cmd = if add {
        Command::AddMembers { group, members }
    } else {
        Command::RemoveMembers { group, members }
    };
    d.command(cmd, &mut sink).await?;
    out_line(&format!(
        "{} {} {} {name}",
        if add { "added" } else { "removed" },
        contacts.join(", "),
        if add { "to" } else { "from" }
    ));
    flush_after_change(&mut d, &mut sink, "the change is saved").await
}

/// A group named on the command line (`NAME` or `#NAME`), which must be a group.
fn find_group_target(engine: &Engine, name: &str) -> Result<ConversationId, CliError> {
    match name.strip_prefix('#') {
        Some(g) => find_group(engine, g),
        None => find_group(engine, name),
    }
}

async fn leave(home: &crate::home::Home, name: &str) -> Result<(), CliError> {
    let mut d = open(home)?;
    let group = find_group_target(d.engine(), name)?;
    let mut sink = Printer::new(Style::Human, false);
    d.command(Command::LeaveGroup { group }, &mut sink).await?;
    out_line(&format!("left {name}"));
    flush_after_change(&mut d, &mut sink, "leaving is saved").await
}

async fn rename(home: &crate::home::Home, name: &str, new_name: String) -> Result<(), CliError> {
    let mut d = open(home)?;
    let group = find_group_target(d.engine(), name)?;
    check_new_name(d.engine(), &new_name, "group name", MAX_GROUP_NAME)?;
    if Names::of(d.engine()).find(&new_name).is_some() {
        return Err(CliError::NameTaken(new_name));
    }
    let mut sink = Printer::new(Style::Human, false);
    d.command(
        Command::RenameGroup {
            group,
            name: new_name.clone(),
        },
        &mut sink,
    )
    .await?;
    out_line(&format!("renamed {name} to {new_name}"));
    flush_after_change(&mut d, &mut sink, "the new name is saved").await
}

fn list(home: &crate::home::Home, style: Style) -> Result<(), CliError> {
    let d = open(home)?;
    let e = d.engine();
    let names = Names::of(e);
    for g in e.groups() {
        match style {
            Style::Json => out_line(&group_json(&names, &g.id).to_string()),
            Style::Human => {
                let members: Vec<String> = g.members.iter().map(|u| names.user(u)).collect();
                out_line(&format!(
                    "#{}  ({} member(s): {}){}",
                    crate::output::printable(&g.name),
                    members.len(),
                    members.join(", "),
                    if g.active { "" } else { "  [not a member]" }
                ));
            }
        }
    }
    Ok(())
}

/// The latest `limit` messages of a group, in the group's display order
/// (the same on every member's device), oldest first.
pub fn history<S: Storage + ?Sized>(
    engine: &Engine,
    storage: &S,
    group: &ConversationId,
    limit: usize,
) -> Result<Vec<HistoryEntry>, CliError> {
    let mut all = whole_history(storage, group)?;
    sort_for_display(engine, group, &mut all);
    let skip = all.len().saturating_sub(limit);
    Ok(all.split_off(skip))
}

/// Per-member delivery states of one of this user's group messages, as
/// `[{"name", "user", "state"}]`.
pub fn member_states_json(engine: &Engine, names: &Names, id: &MessageId) -> Value {
    Value::Array(
        engine
            .member_states(id)
            .into_iter()
            .map(|(u, s)| json!({"name": names.user(&u), "user": u.to_hex(), "state": state_name(s)}))
            .collect(),
    )
}

/// `  [delivered 2/3, read 1/3]` for one of this user's group messages.
pub fn member_summary(engine: &Engine, id: &MessageId) -> String {
    let states = engine.member_states(id);
    if states.is_empty() {
        return String::new();
    }
    let n = states.len();
    let delivered = states
        .iter()
        .filter(|(_, s)| matches!(s, MessageState::Delivered | MessageState::Read))
        .count();
    let read = states
        .iter()
        .filter(|(_, s)| *s == MessageState::Read)
        .count();
    format!("  [delivered {delivered}/{n}, read {read}/{n}]")
}

/// Sort a group's entries into the group's display order
/// ([`Engine::group_position`]: the same on every member's device). An
/// entry without a position (none is expected) keeps its arrival place
/// after those with one.
pub fn sort_for_display(engine: &Engine, group: &ConversationId, entries: &mut [HistoryEntry]) {
    entries.sort_by_cached_key(|e| {
        let pos = engine.group_position(group, &e.record.id);
        (pos.is_none(), pos, e.order)
    });
}
