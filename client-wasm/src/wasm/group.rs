//! Group methods of the `Client` class: create, add and remove members,
//! leave, rename, list, and per-member delivery states.
//!
//! Members are named by contact name or by user key (64 hex digits); a group
//! by its id (32 hex digits) or its name when no contact has that name (see
//! `Client::conversation`). Group messages are ordinary `message` events
//! and history entries whose `group` field holds the group's name; a
//! `group` event follows every change of a group (created, joined, members
//! or name changed, left, removed).

use super::client::{Client, promise, string_arg};
use super::convert::{self, Failure, Obj, Options};
use crate::{Command, Engine, Reply};
use hush_protocol::{ConversationId, MessageId, UserKey};
use js_sys::{Array, Promise};
use wasm_bindgen::prelude::*;

#[wasm_bindgen(typescript_custom_section)]
const TS_GROUP_TYPES: &'static str = r#"
/** A member of a group: the user key, and the contact name if they are a contact ("me" for this user). */
export interface GroupMember { user: string; name: string | null }

/** A group as this device knows it. */
export interface GroupInfo {
  /** The group's conversation id (what `send`, `history`, `markRead` take). */
  group: string;
  name: string;
  members: GroupMember[];
  /** False once this user left or was removed (history stays readable). */
  active: boolean;
}

/** Delivery state of one of this user's group messages at one member. */
export interface MemberState { user: string; name: string | null; state: MessageState }

/** Options of `groupHistory`. */
export interface GroupHistoryOptions {
  /** Page backwards from this message (an entry's `id`): the page ends just before it in the group order; omit for the newest. */
  before?: string;
  /** Messages per page: default 50, at most 500. */
  limit?: number;
}

/** A group was created, joined, renamed, changed members, or was left. */
export interface GroupEvent {
  type: "group";
  group: string;
  name: string;
  members: GroupMember[];
  active: boolean;
}
"#;

/// A JS array of member names or user keys.
fn member_args(engine: &Engine, v: &JsValue) -> Result<Vec<UserKey>, Failure> {
    let list = v.dyn_ref::<Array>().ok_or_else(|| {
        Failure::invalid("members must be an array of contact names or user keys")
    })?;
    let contacts = engine.contacts();
    let mut out: Vec<UserKey> = Vec::new();
    for item in list.iter() {
        let text = string_arg(&item, "a member")?;
        let user = match UserKey::from_hex(text.trim()) {
            Ok(u) => u,
            Err(_) => {
                let mut named = contacts.iter().filter(|(_, n, _)| *n == text);
                match (named.next(), named.next()) {
                    (Some((u, _, _)), None) => *u,
                    (Some(_), Some(_)) => {
                        return Err(Failure::invalid(format!(
                            "several contacts are named `{text}`: use the user key"
                        )));
                    }
                    (None, _) => {
                        return Err(Failure::new("unknown", format!("no contact `{text}`")));
                    }
                }
            }
        };
        if !out.contains(&user) {
            out.push(user);
        }
    }
    Ok(out)
}

/// Default and largest page of [`Client::group_history`].
const PAGE_DEFAULT: u64 = 50;
const PAGE_MAX: u64 = 500;

/// The ids of one page of a group in the group order, oldest first: the
/// `limit` messages just before `before` (or the newest `limit`).
fn group_window(
    engine: &Engine,
    group: &ConversationId,
    before: Option<&MessageId>,
    limit: usize,
) -> Result<Vec<MessageId>, Failure> {
    let order = engine.group_order(group);
    let end = match before {
        None => order.len(),
        Some(id) => {
            let at = engine
                .group_position(group, id)
                .ok_or_else(|| Failure::new("unknown", format!("no message {id} in this group")))?;
            order.partition_point(|m| engine.group_position(group, m) < Some(at))
        }
    };
    let start = end.saturating_sub(limit);
    Ok(order.get(start..end).map(<[_]>::to_vec).unwrap_or_default())
}

fn check_group_name(name: &str) -> Result<(), Failure> {
    if name.trim().is_empty()
        || name.len() > crate::codes::MAX_CODE_TEXT
        || name.chars().any(char::is_control)
    {
        return Err(Failure::invalid(format!(
            "a group name must be 1 to {} bytes without control characters",
            crate::codes::MAX_CODE_TEXT
        )));
    }
    Ok(())
}

#[wasm_bindgen]
impl Client {
    /// Create a group named `name` with these contacts (names or user keys);
    /// this user is a member too. Resolves to the group's id once the group
    /// is durable here; the members hear of it as the invitations go out.
    #[wasm_bindgen(js_name = createGroup, unchecked_return_type = "Promise<string>")]
    pub fn create_group(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] name: JsValue,
        #[wasm_bindgen(unchecked_param_type = "string[]")] members: JsValue,
    ) -> Promise {
        let cmd = (|| -> Result<Command, Failure> {
            let name = string_arg(&name, "the group name")?;
            check_group_name(&name)?;
            let members = self.engine(|e| member_args(e, &members))??;
            Ok(Command::CreateGroup { name, members })
        })();
        let done = cmd.map(|c| self.command(c));
        promise(async move {
            match done?.await? {
                Some(Reply::Group(id)) => Ok(JsValue::from_str(&id.to_hex())),
                _ => Err(Failure::new("internal", "the group was not created")),
            }
        })
    }

    /// Add contacts (names or user keys) to a group.
    #[wasm_bindgen(js_name = addMembers, unchecked_return_type = "Promise<void>")]
    pub fn add_members(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] group: JsValue,
        #[wasm_bindgen(unchecked_param_type = "string[]")] members: JsValue,
    ) -> Promise {
        let cmd = (|| -> Result<Command, Failure> {
            let group = self.group_id(&group)?;
            let members = self.engine(|e| member_args(e, &members))??;
            Ok(Command::AddMembers { group, members })
        })();
        self.run_void(cmd)
    }

    /// Remove members (names or user keys) from a group: they receive
    /// nothing sent after the removal.
    #[wasm_bindgen(js_name = removeMembers, unchecked_return_type = "Promise<void>")]
    pub fn remove_members(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] group: JsValue,
        #[wasm_bindgen(unchecked_param_type = "string[]")] members: JsValue,
    ) -> Promise {
        let cmd = (|| -> Result<Command, Failure> {
            let group = self.group_id(&group)?;
            let members = self.engine(|e| member_args(e, &members))??;
            Ok(Command::RemoveMembers { group, members })
        })();
        self.run_void(cmd)
    }

    /// Leave a group (its history stays on this device).
    #[wasm_bindgen(js_name = leaveGroup, unchecked_return_type = "Promise<void>")]
    pub fn leave_group(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] group: JsValue,
    ) -> Promise {
        let cmd = self
            .group_id(&group)
            .map(|group| Command::LeaveGroup { group });
        self.run_void(cmd)
    }

    /// Rename a group, for every member.
    #[wasm_bindgen(js_name = renameGroup, unchecked_return_type = "Promise<void>")]
    pub fn rename_group(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] group: JsValue,
        #[wasm_bindgen(unchecked_param_type = "string")] name: JsValue,
    ) -> Promise {
        let cmd = (|| -> Result<Command, Failure> {
            let group = self.group_id(&group)?;
            let name = string_arg(&name, "the group name")?;
            check_group_name(&name)?;
            Ok(Command::RenameGroup { group, name })
        })();
        self.run_void(cmd)
    }

    /// The groups this device knows, including those left (`active: false`).
    #[wasm_bindgen(unchecked_return_type = "GroupInfo[]")]
    pub fn groups(&self) -> Result<JsValue, JsValue> {
        let list = self.engine(|e| {
            e.groups()
                .iter()
                .map(|g| convert::group_obj(false, g, e))
                .collect::<Array>()
        })?;
        Ok(list.into())
    }

    /// A page of a group's history in the group order (the same on every
    /// member's device), oldest first: up to `limit` (default 50, at most
    /// 500) messages just before message `before` (an entry's `id`; omit
    /// it for the newest). Unlike `history`, pages of a group fit together:
    /// page after page backwards from the newest gives the whole group
    /// order, each message once, also when a held message took its place
    /// among older ones.
    #[wasm_bindgen(js_name = groupHistory, unchecked_return_type = "Promise<HistoryEntry[]>")]
    pub fn group_history(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] group: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "GroupHistoryOptions")] options: JsValue,
    ) -> Promise {
        let prepared = (|| -> Result<(ConversationId, Vec<MessageId>), Failure> {
            let group = self.group_id(&group)?;
            let opts = Options::new(&options, "group history options")?;
            let before = match opts.string("before")? {
                None => None,
                Some(text) => Some(MessageId::from_hex(text.trim()).map_err(|_| {
                    Failure::invalid(format!("`{text}` is not a message id (32 hex digits)"))
                })?),
            };
            let limit = opts
                .whole("limit")?
                .unwrap_or(PAGE_DEFAULT)
                .clamp(1, PAGE_MAX) as usize;
            let window = self.engine(|e| group_window(e, &group, before.as_ref(), limit))??;
            Ok((group, window))
        })();
        let this = self.share();
        promise(async move {
            let (group, window) = prepared?;
            this.entries_by_ids(group, window).await
        })
    }

    /// Per-member delivery states of one of this user's group messages
    /// (empty for other messages).
    #[wasm_bindgen(js_name = memberStates, unchecked_return_type = "MemberState[]")]
    pub fn member_states(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string", js_name = messageId)] id: JsValue,
    ) -> Result<JsValue, JsValue> {
        let text = string_arg(&id, "the message id")?;
        let id = MessageId::from_hex(text.trim()).map_err(|_| {
            Failure::invalid(format!("`{text}` is not a message id (32 hex digits)"))
        })?;
        let list = self.engine(|e| {
            e.member_states(&id)
                .iter()
                .map(|(u, s)| {
                    Obj::new()
                        .set("user", u.to_hex())
                        .set("name", convert::user_name(u, e))
                        .set("state", convert::state_name(*s))
                        .build()
                })
                .collect::<Array>()
        })?;
        Ok(list.into())
    }
}

impl Client {
    /// A group from its id (hex) or its name.
    fn group_id(&self, v: &JsValue) -> Result<ConversationId, Failure> {
        let text = string_arg(v, "the group")?;
        let groups = self.engine(|e| e.groups())?;
        if let Ok(id) = ConversationId::from_hex(text.trim())
            && groups.iter().any(|g| g.id == id)
        {
            return Ok(id);
        }
        let mut named = groups.iter().filter(|g| g.name == text);
        match (named.next(), named.next()) {
            (Some(g), None) => Ok(g.id),
            (Some(_), Some(_)) => Err(Failure::invalid(format!(
                "several groups are named `{text}`: use the group id"
            ))),
            (None, _) => Err(Failure::new("unknown", format!("no group `{text}`"))),
        }
    }

    /// Run a command that resolves to nothing.
    fn run_void(&self, cmd: Result<Command, Failure>) -> Promise {
        let done = cmd.map(|c| self.command(c));
        promise(async move {
            done?.await?;
            Ok(JsValue::UNDEFINED)
        })
    }
}
