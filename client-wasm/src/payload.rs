//! What travels inside an envelope's ciphertext.
//!
//! Every envelope carries one [`Payload`]: the message's *logical* id and a
//! [`Body`]. The logical id is the one the app sees; the envelope header's
//! message id is the *transport* id the relay deduplicates by. They are equal
//! for a first transmission (and its retries), and differ for a re-send
//! answering a resend request or a tail probe: the re-sent envelope gets a
//! fresh transport id so the relay stores it even while its dedup entry for the
//! original is still alive, and the recipient recognises it by sender seq and
//! logical id. The relay cannot tell payload kinds apart: chat messages,
//! receipts and resend requests are all padded ciphertext.

use crate::error::ClientError;
use hush_protocol::{ConversationId, DeviceId, MessageId, SignedDeviceList};
use serde::{Deserialize, Serialize};

/// Longest chat text in bytes (keeps every padded payload inside one envelope).
pub const MAX_TEXT_BYTES: usize = 16_000;
/// Most items in one list inside a control payload (ids, ranges, contacts).
pub const MAX_LIST: usize = 512;

/// An inclusive range of sender seqs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRange {
    /// First seq (inclusive).
    pub first: u64,
    /// Last seq (inclusive).
    pub last: u64,
}

impl SeqRange {
    /// Number of seqs in the range (0 if malformed).
    pub fn len(&self) -> u64 {
        if self.last < self.first {
            0
        } else {
            self.last - self.first + 1
        }
    }

    /// True for a malformed (empty) range.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Compress an ascending list of seqs into ranges.
pub fn to_ranges(seqs: impl IntoIterator<Item = u64>) -> Vec<SeqRange> {
    let mut out: Vec<SeqRange> = Vec::new();
    for s in seqs {
        match out.last_mut() {
            Some(r) if r.last.checked_add(1) == Some(s) => r.last = s,
            _ => out.push(SeqRange { first: s, last: s }),
        }
    }
    out
}

/// A contact as carried in link and contact-sync payloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactInfo {
    /// The contact's identity key.
    pub user: [u8; 32],
    /// Relay address.
    pub relay: String,
    /// Display name.
    pub name: String,
}

/// A history archive's one-time key: zeroized on drop, never printed.
#[derive(
    Clone, PartialEq, Eq, Serialize, Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop,
)]
pub struct ArchiveKey(pub [u8; 32]);

impl std::fmt::Debug for ArchiveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ArchiveKey([redacted])")
    }
}

/// The decrypted content of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// Logical message id (the app's id; the same on every device and every re-send).
    pub id: MessageId,
    /// What it says.
    pub body: Body,
}

/// The payload kinds. Chat kinds travel in a chat conversation and are
/// delivered in sender-seq order; control kinds travel in the device pair's
/// control conversation and are applied on arrival.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// A chat message.
    Text {
        /// The text.
        text: String,
        /// Sender's clock when the message was written (ms since the epoch).
        sent_at_ms: u64,
    },
    /// Delete-for-everyone of an earlier message of the same user.
    Recall {
        /// The message recalled.
        target: MessageId,
    },
    /// Delivery and read receipts (control; never answered by a receipt).
    Receipt {
        /// Per conversation: every sender seq up to this one from the receipt's
        /// recipient to its sender has been stored.
        delivered: Vec<(ConversationId, u64)>,
        /// Messages of the receipt's recipient that its sender's user has read.
        read: Vec<MessageId>,
    },
    /// Read state for the user's own other devices.
    ReadSync {
        /// The conversation.
        conversation: ConversationId,
        /// Messages read.
        ids: Vec<MessageId>,
    },
    /// Deletions (for this user only) for the user's own other devices.
    DeleteSync {
        /// The conversation.
        conversation: ConversationId,
        /// Messages deleted.
        ids: Vec<MessageId>,
    },
    /// "I am missing these sender seqs of yours in this conversation."
    ResendRequest {
        /// The conversation.
        conversation: ConversationId,
        /// The missing seqs.
        seqs: Vec<SeqRange>,
    },
    /// "I no longer have these; stop waiting for them."
    ResendUnavailable {
        /// The conversation.
        conversation: ConversationId,
        /// The seqs that cannot be re-sent.
        seqs: Vec<SeqRange>,
    },
    /// A new device introduces itself to the device that made its link code.
    LinkHello {
        /// The link code's one-time token.
        token: [u8; 16],
    },
    /// The inviting device's answer: the user's contacts.
    LinkWelcome {
        /// Contacts to add.
        contacts: Vec<ContactInfo>,
    },
    /// A contact added on another device of the same user.
    ContactAdded {
        /// The contact.
        contact: ContactInfo,
    },
    /// "The session you started with this X3DH ephemeral key cannot be
    /// answered (its one-time prekey was already used, e.g. a relay handed
    /// the same bundle to two devices): drop it, use the session this
    /// message arrives on, and re-send what I have not receipted."
    SessionReset {
        /// The `SessionInit` ephemeral of the session that cannot be answered.
        ephemeral: [u8; 32],
    },
    /// "You asked for seqs of this stream that I have not written yet: my
    /// next seq is `next_seq`." The answer to a resend request that reaches
    /// past what the sender assigned, which an honest peer only sends when
    /// the relay claimed those seqs had expired.
    NotYetSent {
        /// The stream's conversation.
        conversation: ConversationId,
        /// The next seq the sender will assign in it.
        next_seq: u64,
    },
    /// Position 12. A group chat message (chat kind, in the group's
    /// stream). No longer sent (`GroupMessage` carries the group too);
    /// still decoded, from older local state. Its causal position is `(depth, id)`.
    GroupText {
        /// The text.
        text: String,
        /// Sender's clock when written (display only).
        sent_at_ms: u64,
        /// Lamport depth: one more than the deepest of `refs`.
        depth: u64,
        /// The group messages the sender had displayed with nothing after
        /// them (its heads), at most [`MAX_GROUP_REFS`].
        refs: Vec<GroupRef>,
    },
    /// Position 13. A membership or name change (chat kind, in the group's
    /// stream), ordered like a group message. No longer sent (see
    /// `GroupChange`); still decoded, from older local state.
    GroupControl {
        /// What changes.
        op: GroupOp,
        /// The group as the author sees it after the change (name, every
        /// member): how a member added by this change learns the group.
        /// Members who already know the group fold the ops instead.
        snapshot: Option<GroupSnapshot>,
        /// Sender's clock when written (display only).
        sent_at_ms: u64,
        /// Lamport depth (as in `GroupText`).
        depth: u64,
        /// Causal references (as in `GroupText`).
        refs: Vec<GroupRef>,
    },
    /// Position 14 (control). "I hold messages of this group that name
    /// these messages of yours as predecessors; send them to me."
    GroupResend {
        /// The group.
        group: ConversationId,
        /// The missing messages (all written by the receiving device).
        ids: Vec<MessageId>,
    },
    /// Position 15 (control). "I will not send you these" (this device
    /// was not a member when they were written, or no longer has them).
    GroupUnavailable {
        /// The group.
        group: ConversationId,
        /// The messages.
        ids: Vec<MessageId>,
    },
    /// Position 16. A group chat message naming its group inside the
    /// ciphertext: what is sent instead of `GroupText`, whose stream's
    /// clear conversation id is a pseudonym (docs/PROTOCOL.md, "Group
    /// streams"). Fields as in `GroupText`.
    GroupMessage {
        /// The group.
        group: ConversationId,
        /// The text.
        text: String,
        /// Sender's clock when written (display only).
        sent_at_ms: u64,
        /// Lamport depth: one more than the deepest of `refs`.
        depth: u64,
        /// Causal references (at most [`MAX_GROUP_REFS`]).
        refs: Vec<GroupRef>,
    },
    /// Position 17. A membership or name change naming its group: what is
    /// sent instead of `GroupControl`. Fields as in `GroupControl`.
    GroupChange {
        /// The group.
        group: ConversationId,
        /// What changes.
        op: GroupOp,
        /// The group as the author sees it after the change.
        snapshot: Option<GroupSnapshot>,
        /// Sender's clock when written (display only).
        sent_at_ms: u64,
        /// Lamport depth.
        depth: u64,
        /// Causal references.
        refs: Vec<GroupRef>,
    },
    /// Position 18. Delete-for-everyone of an earlier group message of the
    /// same user (chat kind, in the group's streams): `Recall` naming its
    /// group.
    GroupRecall {
        /// The group.
        group: ConversationId,
        /// The message recalled.
        target: MessageId,
    },
    /// Position 19, reserved (never sent; refused).
    Reserved19,
    /// Position 20 (control, own devices only). "Your history is in this
    /// relay blob": the answer to [`Body::HistoryRequest`] once the archive
    /// is uploaded. `key` is a one-time archive key (docs/CLIENT.md,
    /// "History transfer"); the blob id is the download capability.
    HistoryOffer {
        /// The relay blob holding the archive.
        blob: [u8; 16],
        /// The archive key (one-time, random).
        key: ArchiveKey,
        /// The blob's size in bytes.
        total_len: u64,
        /// Sealed chunks in the archive.
        chunks: u32,
        /// Messages in the archive (for "importing N of M").
        messages: u64,
    },
    /// Position 21 (control, own devices only). A newly linked device asks
    /// the device that made its link code for the user's history (sent with
    /// its `LinkHello` unless the user declined).
    HistoryRequest,
    /// Position 22 (control). "My user's device list changed (a device was
    /// removed): here is the new list, signed by the user." Sent by the
    /// removing device to every device of every contact and to its own
    /// other devices once the relay accepted the list. The receiver
    /// verifies it and keeps it if newer than the one it holds, so a relay
    /// cannot make it keep encrypting to the removed device by serving the
    /// older list (docs/SECURITY.md "Device removal reaches contacts").
    DeviceListChanged {
        /// The user's new signed list (the sender's user only).
        list: SignedDeviceList,
    },
}

/// Most causal references in one group message.
pub const MAX_GROUP_REFS: usize = 16;
/// Most members of a group (the creator included).
pub const MAX_GROUP_MEMBERS: usize = 100;
/// Longest group name in bytes.
pub const MAX_GROUP_NAME_BYTES: usize = 200;

/// A causal reference to a group message: its id and the device that
/// wrote it (the one asked if it is missing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupRef {
    /// The message.
    pub id: MessageId,
    /// The device that wrote it.
    pub device: DeviceId,
}

/// A group's name and members as one member sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSnapshot {
    /// The name.
    pub name: String,
    /// Every member (with relay and display name, so a new member can reach
    /// the ones it does not know).
    pub members: Vec<ContactInfo>,
}

/// A group membership or name change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupOp {
    /// Position 0. The group is created (members in the snapshot).
    Create,
    /// Position 1. Members are added.
    Add {
        /// The new members.
        members: Vec<[u8; 32]>,
    },
    /// Position 2. Members are removed.
    Remove {
        /// The removed members.
        members: Vec<[u8; 32]>,
    },
    /// Position 3. The author leaves.
    Leave,
    /// Position 4. The group is renamed.
    Rename {
        /// The new name.
        name: String,
    },
}

impl Body {
    /// Chat kinds are ordered by sender seq and shown; control kinds are not.
    pub fn is_chat(&self) -> bool {
        matches!(
            self,
            Body::Text { .. }
                | Body::Recall { .. }
                | Body::GroupText { .. }
                | Body::GroupControl { .. }
                | Body::GroupMessage { .. }
                | Body::GroupChange { .. }
                | Body::GroupRecall { .. }
        )
    }

    /// A group stream item in the form the engine keeps: the group named
    /// inside (positions 16–18) is split off and the item becomes the
    /// older variant with the same fields (`GroupText`, `GroupControl`,
    /// `Recall`). Other bodies come back unchanged with `None`.
    pub fn split_group(self) -> (Option<ConversationId>, Body) {
        match self {
            Body::GroupMessage {
                group,
                text,
                sent_at_ms,
                depth,
                refs,
            } => (
                Some(group),
                Body::GroupText {
                    text,
                    sent_at_ms,
                    depth,
                    refs,
                },
            ),
            Body::GroupChange {
                group,
                op,
                snapshot,
                sent_at_ms,
                depth,
                refs,
            } => (
                Some(group),
                Body::GroupControl {
                    op,
                    snapshot,
                    sent_at_ms,
                    depth,
                    refs,
                },
            ),
            Body::GroupRecall { group, target } => (Some(group), Body::Recall { target }),
            other => (None, other),
        }
    }

    /// The inverse of [`Body::split_group`]: the form sent in `group`'s
    /// streams (`GroupText`, `GroupControl` and `Recall` gain the group).
    pub fn with_group(self, group: ConversationId) -> Body {
        match self {
            Body::GroupText {
                text,
                sent_at_ms,
                depth,
                refs,
            } => Body::GroupMessage {
                group,
                text,
                sent_at_ms,
                depth,
                refs,
            },
            Body::GroupControl {
                op,
                snapshot,
                sent_at_ms,
                depth,
                refs,
            } => Body::GroupChange {
                group,
                op,
                snapshot,
                sent_at_ms,
                depth,
                refs,
            },
            Body::Recall { target } => Body::GroupRecall { group, target },
            other => other,
        }
    }

    /// Whether the sender expects a delivery receipt (and re-sends the tail of
    /// its stream until it gets one). Receipts are not receipted, which is what
    /// keeps two devices from acknowledging each other forever.
    pub fn ack_eliciting(&self) -> bool {
        !matches!(self, Body::Receipt { .. })
    }

    fn check(&self) -> Result<(), ClientError> {
        let too_long = |n: usize| n > MAX_LIST;
        let bad = match self {
            Body::Text { text, .. } => text.len() > MAX_TEXT_BYTES,
            Body::Recall { .. } | Body::LinkHello { .. } | Body::GroupRecall { .. } => false,
            Body::Receipt { delivered, read } => too_long(delivered.len()) || too_long(read.len()),
            Body::ReadSync { ids, .. } | Body::DeleteSync { ids, .. } => too_long(ids.len()),
            Body::ResendRequest { seqs, .. } | Body::ResendUnavailable { seqs, .. } => {
                too_long(seqs.len()) || seqs.iter().any(SeqRange::is_empty)
            }
            Body::LinkWelcome { contacts } => too_long(contacts.len()),
            Body::ContactAdded { .. }
            | Body::SessionReset { .. }
            | Body::NotYetSent { .. }
            | Body::HistoryOffer { .. }
            | Body::HistoryRequest => false,
            Body::GroupText { text, refs, .. } | Body::GroupMessage { text, refs, .. } => {
                text.len() > MAX_TEXT_BYTES || refs.len() > MAX_GROUP_REFS
            }
            Body::GroupControl {
                op, snapshot, refs, ..
            }
            | Body::GroupChange {
                op, snapshot, refs, ..
            } => {
                refs.len() > MAX_GROUP_REFS
                    || match op {
                        GroupOp::Add { members } | GroupOp::Remove { members } => {
                            members.is_empty() || members.len() > MAX_GROUP_MEMBERS
                        }
                        GroupOp::Rename { name } => name.len() > MAX_GROUP_NAME_BYTES,
                        GroupOp::Create | GroupOp::Leave => false,
                    }
                    || snapshot.as_ref().is_some_and(|s| {
                        s.name.len() > MAX_GROUP_NAME_BYTES || s.members.len() > MAX_GROUP_MEMBERS
                    })
            }
            Body::GroupResend { ids, .. } | Body::GroupUnavailable { ids, .. } => {
                too_long(ids.len())
            }
            Body::DeviceListChanged { list } => {
                list.list.devices.len() > hush_protocol::limits::MAX_DEVICES_PER_USER
            }
            Body::Reserved19 => true,
        };
        if bad {
            return Err(ClientError::Protocol(
                hush_protocol::ProtocolError::Malformed("payload limits"),
            ));
        }
        Ok(())
    }
}

impl Payload {
    /// Encode (postcard, version byte first). Padding is added by the ratchet.
    pub fn encode(&self) -> Result<Vec<u8>, ClientError> {
        self.body.check()?;
        postcard::to_extend(self, vec![PAYLOAD_VERSION])
            .map_err(|_| ClientError::Protocol(hush_protocol::ProtocolError::Malformed("payload")))
    }

    /// Decode and check limits.
    pub fn decode(bytes: &[u8]) -> Result<Self, ClientError> {
        let malformed =
            || ClientError::Protocol(hush_protocol::ProtocolError::Malformed("payload"));
        let (&v, rest) = bytes.split_first().ok_or_else(malformed)?;
        if v != PAYLOAD_VERSION {
            return Err(malformed());
        }
        let p: Payload = postcard::from_bytes(rest).map_err(|_| malformed())?;
        p.body.check()?;
        Ok(p)
    }
}

/// Version byte in front of every encoded payload.
pub const PAYLOAD_VERSION: u8 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip_and_limits() {
        let p = Payload {
            id: MessageId([3; 16]),
            body: Body::Text {
                text: "hi".into(),
                sent_at_ms: 5,
            },
        };
        assert_eq!(Payload::decode(&p.encode().unwrap()).unwrap(), p);
        let big = Payload {
            id: MessageId([3; 16]),
            body: Body::Text {
                text: "x".repeat(MAX_TEXT_BYTES + 1),
                sent_at_ms: 5,
            },
        };
        assert!(big.encode().is_err());
        assert!(Payload::decode(&[9, 1, 2]).is_err());
        assert!(Payload::decode(&[]).is_err());
    }

    /// Golden bytes of `Body::DeviceListChanged` (position 22): docs/PROTOCOL.md
    /// §7.6 gives this layout.
    #[test]
    fn device_list_changed_golden_bytes() {
        use hush_protocol::{DeviceEntry, DeviceList, UserKey};
        let p = Payload {
            id: MessageId([0x11; 16]),
            body: Body::DeviceListChanged {
                list: SignedDeviceList {
                    list: DeviceList {
                        user: UserKey([0x01; 32]),
                        version: 300,
                        devices: vec![DeviceEntry {
                            device: DeviceId([0x02; 16]),
                            signing_key: [0x03; 32],
                            agreement_key: [0x04; 32],
                            membership_signature: [0x05; 64],
                        }],
                    },
                    signature: [0x06; 64],
                },
            },
        };
        let mut want = vec![PAYLOAD_VERSION];
        want.extend([0x11; 16]); // logical id
        want.push(22); // Body position 22
        want.extend([0x01; 32]); // user
        want.extend([0xAC, 0x02]); // version 300 (varint)
        want.push(1); // one device
        want.extend([0x02; 16]); // device
        want.extend([0x03; 32]); // signing key
        want.extend([0x04; 32]); // agreement key
        want.push(0x40); // membership signature: 64 bytes
        want.extend([0x05; 64]);
        want.push(0x40); // user signature: 64 bytes
        want.extend([0x06; 64]);
        assert_eq!(p.encode().unwrap(), want);
        assert_eq!(Payload::decode(&want).unwrap(), p);

        // More devices than a list may hold: refused both ways.
        let Body::DeviceListChanged { mut list } = p.body.clone() else {
            unreachable!()
        };
        let entry = list.list.devices[0].clone();
        list.list.devices = vec![entry; hush_protocol::limits::MAX_DEVICES_PER_USER + 1];
        let big = Payload {
            id: p.id,
            body: Body::DeviceListChanged { list },
        };
        assert!(big.encode().is_err());
    }

    /// docs/PROTOCOL.md "Group streams": the bytes of the group variants
    /// and the pseudonym derivation (the vector was computed with an
    /// independent HKDF-SHA256).
    #[test]
    fn group_variants_and_stream_ids_golden_vectors() {
        let id = MessageId([0xaa; 16]);
        let group = ConversationId([0x11; 16]);
        let r = GroupRef {
            id: MessageId([0xbb; 16]),
            device: DeviceId([0xcc; 16]),
        };
        let hex16 = |b: u8| hex::encode([b; 16]);
        let message = Payload {
            id,
            body: Body::GroupMessage {
                group,
                text: "hi".into(),
                sent_at_ms: 1000,
                depth: 3,
                refs: vec![r],
            },
        };
        let want = format!(
            "01{}10{}026869e8070301{}{}",
            hex16(0xaa),
            hex16(0x11),
            hex16(0xbb),
            hex16(0xcc)
        );
        assert_eq!(hex::encode(message.encode().unwrap()), want);
        assert_eq!(
            Payload::decode(&hex::decode(&want).unwrap()).unwrap(),
            message
        );
        let change = Payload {
            id,
            body: Body::GroupChange {
                group,
                op: GroupOp::Rename { name: "x".into() },
                snapshot: None,
                sent_at_ms: 1000,
                depth: 4,
                refs: Vec::new(),
            },
        };
        let want = format!("01{}11{}040178 00e8070400", hex16(0xaa), hex16(0x11)).replace(' ', "");
        assert_eq!(hex::encode(change.encode().unwrap()), want);
        let recall = Payload {
            id,
            body: Body::GroupRecall {
                group,
                target: MessageId([0xdd; 16]),
            },
        };
        let want = format!("01{}12{}{}", hex16(0xaa), hex16(0x11), hex16(0xdd));
        assert_eq!(hex::encode(recall.encode().unwrap()), want);
        // The older variant still decodes (local state of earlier builds),
        // and splits into the same form.
        let (named, body) = message.body.clone().split_group();
        assert_eq!(named, Some(group));
        let legacy = Payload { id, body };
        let bytes = legacy.encode().unwrap();
        assert_eq!(bytes.get(17), Some(&0x0c));
        assert_eq!(Payload::decode(&bytes).unwrap(), legacy);
        assert_eq!(legacy.body.with_group(group), message.body);
        // Position 19 stays reserved.
        let mut reserved = hex::decode(format!("01{}13", hex16(0xaa))).unwrap();
        assert!(Payload::decode(&reserved).is_err());
        reserved.truncate(17);
        assert!(Payload::decode(&reserved).is_err());

        let (a, b) = (DeviceId([0x22; 16]), DeviceId([0x33; 16]));
        let ab = crate::engine::group_stream(&group, &a, &b).unwrap();
        assert_eq!(hex::encode(ab.0), "c3a77534305cedeb1d589ea2fce1f997");
        let ba = crate::engine::group_stream(&group, &b, &a).unwrap();
        assert_eq!(hex::encode(ba.0), "52eb62911a00357fd74f766a995fd488");
        let other = crate::engine::group_stream(&ConversationId([0x12; 16]), &a, &b).unwrap();
        assert_ne!(other, ab);
    }

    #[test]
    fn ranges_compress() {
        assert_eq!(
            to_ranges([1, 2, 3, 5, 7, 8]),
            vec![
                SeqRange { first: 1, last: 3 },
                SeqRange { first: 5, last: 5 },
                SeqRange { first: 7, last: 8 }
            ]
        );
        assert!(to_ranges([]).is_empty());
    }
}
