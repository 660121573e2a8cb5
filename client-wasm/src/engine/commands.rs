//! What the app asks for. Every command is validated before anything
//! changes, so a refused command leaves the engine untouched.

use super::{Command, Dirty, Engine, Event, Reply};
use crate::codes::LinkCode;
use crate::error::ClientError;
use crate::payload::{Body, ContactInfo, MAX_LIST, MAX_TEXT_BYTES};
use crate::state::{EntryKind, HistoryRecord, LinkToken, MessageState, Removal};
use crate::storage::{self, StorageOp, keys};
use hush_protocol::{ConversationId, DeviceId, MessageId};

impl Engine {
    pub(crate) fn on_command(&mut self, now: u64, c: Command) -> Result<(), ClientError> {
        match c {
            Command::RemoveDevice { device } => self.remove_own_device(now, device)?,
            Command::SendText { conversation, text } if self.is_group(&conversation) => {
                self.group_command(now, Command::SendText { conversation, text })?;
            }
            Command::SendImportantText { conversation, text } => {
                // Queued like any text; the flag is set before anything is
                // sealed (sealing happens after the command, in the pump).
                self.on_command(now, Command::SendText { conversation, text })?;
                if let Some(Reply::Message(id)) = &self.step.reply {
                    let id = *id;
                    if let Some(o) = self.outbox.get_mut(&id) {
                        o.important = true;
                    }
                    self.touch(Dirty::Outbox(id));
                }
            }
            Command::SendText { conversation, text } => {
                self.check_conversation(&conversation)?;
                if text.len() > MAX_TEXT_BYTES {
                    return Err(ClientError::TooLarge {
                        len: text.len(),
                        max: MAX_TEXT_BYTES,
                    });
                }
                let id = self.mint_id(now);
                let record = HistoryRecord {
                    id,
                    conversation,
                    from_user: self.user_key(),
                    from_device: self.device.device,
                    sender_seq: 0,
                    sent_at_ms: now,
                    stored_at_ms: now,
                    text: text.clone(),
                    outgoing: true,
                };
                self.queue(
                    now,
                    id,
                    conversation,
                    Body::Text {
                        text,
                        sent_at_ms: now,
                    },
                    None,
                )?;
                self.store_history(&record)?;
                self.history_ops.push(StorageOp::Put {
                    key: keys::history_state(&id),
                    value: storage::encode(&MessageState::Sending)?,
                });
                self.event(Event::MessageState {
                    id,
                    conversation,
                    state: MessageState::Sending,
                });
                self.step.reply = Some(Reply::Message(id));
            }
            Command::MarkRead {
                conversation,
                messages,
            } => {
                self.check_conversation(&conversation)?;
                let mine = self.own_other_devices();
                let mut ids = Vec::new();
                for (id, author) in messages {
                    self.history_ops.push(StorageOp::Put {
                        key: keys::history_read(&id),
                        value: storage::encode(&())?,
                    });
                    if author != self.device.device && !mine.contains(&author) {
                        self.schedule_read(now, author, id);
                    }
                    ids.push(id);
                }
                for chunk in ids.chunks(MAX_LIST) {
                    for d in &mine {
                        self.queue_control(
                            now,
                            *d,
                            Body::ReadSync {
                                conversation,
                                ids: chunk.to_vec(),
                            },
                        )?;
                    }
                }
            }
            Command::Delete { conversation, ids } => {
                self.check_conversation(&conversation)?;
                for id in &ids {
                    self.apply_removal(now, conversation, *id, Removal::Deleted);
                }
                let mine = self.own_other_devices();
                for chunk in ids.chunks(MAX_LIST) {
                    for d in &mine {
                        self.queue_control(
                            now,
                            *d,
                            Body::DeleteSync {
                                conversation,
                                ids: chunk.to_vec(),
                            },
                        )?;
                    }
                }
            }
            Command::Recall { conversation, id } => {
                self.check_conversation(&conversation)?;
                let foreign = self
                    .outbox
                    .get(&id)
                    .is_some_and(|o| o.kind != EntryKind::Chat || o.conversation != conversation);
                if foreign {
                    return Err(ClientError::NotAllowed(
                        "not a message of this conversation",
                    ));
                }
                let recall = self.mint_id(now);
                self.queue(now, recall, conversation, Body::Recall { target: id }, None)?;
                let me = self.user_key();
                self.apply_recall(now, conversation, me, id);
                self.step.reply = Some(Reply::Message(recall));
            }
            Command::AddContact { code } => {
                if code.user == self.user_key() {
                    return Err(ClientError::NotAllowed("that is this user's own code"));
                }
                let conv = self.add_contact(now, code.user, code.relay.clone(), code.name.clone());
                for d in self.own_other_devices() {
                    self.queue_control(
                        now,
                        d,
                        Body::ContactAdded {
                            contact: ContactInfo {
                                user: code.user.0,
                                relay: code.relay.clone(),
                                name: code.name.clone(),
                            },
                        },
                    )?;
                }
                self.step.reply = Some(Reply::Contact(conv));
            }
            Command::CreateLinkCode => {
                let mut token = [0u8; 16];
                rand_core::Rng::fill_bytes(&mut self.rng, &mut token);
                let code = LinkCode {
                    relay: self.device.relay.clone(),
                    name: self.device.name.clone(),
                    inviter: self.device.device,
                    token,
                    user_secret: self.device.user.to_bytes()?.to_vec(),
                };
                let text = code.to_text()?;
                self.links.insert(
                    token,
                    LinkToken {
                        expires_ms: now.saturating_add(self.cfg.link_code_ttl_ms),
                    },
                );
                self.touch(Dirty::Link(token));
                self.step.reply = Some(Reply::LinkCode(text));
            }
            Command::Retry { id } => {
                let Some(o) = self.outbox.get_mut(&id) else {
                    return Err(ClientError::Unknown("message"));
                };
                if o.kind != EntryKind::Chat || o.state != MessageState::Failed {
                    return Err(ClientError::NotAllowed(
                        "only failed messages can be retried",
                    ));
                }
                o.deadline_ms = now.saturating_add(self.cfg.send_deadline_ms);
                o.retry_at = now;
                o.retry_delay_ms = 0;
                let key = (o.local_seq, o.id);
                self.activate(key);
                self.touch(Dirty::Outbox(id));
                self.set_state(&id, MessageState::Sending);
            }
            group => self.group_command(now, group)?,
        }
        Ok(())
    }

    fn check_conversation(&self, c: &ConversationId) -> Result<(), ClientError> {
        if self.conversations.contains_key(c) || self.is_group(c) {
            Ok(())
        } else {
            Err(ClientError::Unknown("conversation"))
        }
    }

    /// This user's other devices (fan-out of syncs).
    pub(crate) fn own_other_devices(&self) -> Vec<DeviceId> {
        let me = self.device.device;
        self.own
            .known
            .devices()
            .map(|e| e.device)
            .filter(|d| *d != me)
            .collect()
    }

    /// A new device introduces itself to its inviter once both are listed.
    pub(crate) fn maybe_link_hello(&mut self, now: u64) -> Result<(), ClientError> {
        let me = self.device.device;
        let Some(l) = self.device.link.clone() else {
            return Ok(());
        };
        if l.hello_sent || !self.own.known.contains(&me) || !self.own.known.contains(&l.inviter) {
            return Ok(());
        }
        self.queue_control(now, l.inviter, Body::LinkHello { token: l.token })?;
        self.history_after_link_hello(now, l.inviter)?;
        if let Some(pl) = self.device.link.as_mut() {
            pl.hello_sent = true;
        }
        self.touch(Dirty::Device);
        Ok(())
    }

    /// Tests and tools: ids of messages still in the outbox.
    pub fn outbox_ids(&self) -> Vec<MessageId> {
        self.outbox
            .values()
            .filter(|o| o.kind == EntryKind::Chat)
            .map(|o| o.id)
            .collect()
    }
}
