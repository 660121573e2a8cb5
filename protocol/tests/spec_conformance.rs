//! A second encoder, written only from the rules in `docs/PROTOCOL.md`
//! (LEB128 varints, fixed arrays raw, byte strings length-prefixed, enums as
//! variant indexes, options as 0/1 tags, structs as fields in order, the hand
//! laid-out envelope header), checked byte for byte against the crate's
//! encoder on arbitrary values. If the two disagree, either the code or the
//! specification is wrong.
// Test code: a failed expectation should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use hush_protocol::{
    ClientFrame, Delivered, DeviceList, Envelope, EnvelopeHeader, ErrorCode, OneTimePrekey,
    Request, Response, SendOutcome, ServerFrame, SignedDeviceList, SignedPrekey, WireError,
    encode_client_frame, encode_server_frame,
};
use proptest::prelude::*;

/// The minimal spec-following writer.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn varint(&mut self, mut v: u64) {
        loop {
            let byte = (v & 0x7F) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(byte);
                return;
            }
            self.0.push(byte | 0x80);
        }
    }
    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.raw(b);
    }
    fn string(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn bool(&mut self, b: bool) {
        self.0.push(u8::from(b));
    }
    fn option<T>(&mut self, v: &Option<T>, f: impl FnOnce(&mut Self, &T)) {
        match v {
            None => self.0.push(0),
            Some(x) => {
                self.0.push(1);
                f(self, x);
            }
        }
    }
    fn seq<T>(&mut self, items: &[T], mut f: impl FnMut(&mut Self, &T)) {
        self.varint(items.len() as u64);
        for i in items {
            f(self, i);
        }
    }
}

/// The envelope header, from the byte table.
fn header(h: &EnvelopeHeader) -> Vec<u8> {
    let mut b = vec![
        1,
        u8::from(h.session_init.is_some()) | (u8::from(h.important) << 1),
    ];
    b.extend_from_slice(&h.message_id.0);
    b.extend_from_slice(&h.sender_device.0);
    b.extend_from_slice(&h.recipient_device.0);
    b.extend_from_slice(&h.conversation_id.0);
    b.extend_from_slice(&h.sender_seq.to_be_bytes());
    b.extend_from_slice(&h.sent_at_ms.to_be_bytes());
    b.push(h.ratchet.len() as u8);
    b.extend_from_slice(&h.ratchet);
    if let Some(i) = &h.session_init {
        b.extend_from_slice(&i.initiator_identity);
        b.extend_from_slice(&i.ephemeral);
        b.extend_from_slice(&i.signed_prekey_id.to_be_bytes());
        b.extend_from_slice(&i.one_time_prekey_id.unwrap_or(u32::MAX).to_be_bytes());
    }
    b
}

fn envelope(w: &mut W, e: &Envelope) {
    let mut b = header(&e.header);
    b.extend_from_slice(&e.ciphertext);
    w.bytes(&b);
}

fn signed_prekey(w: &mut W, k: &SignedPrekey) {
    w.varint(k.id.into());
    w.raw(&k.public);
    w.bytes(&k.signature);
}

fn one_time_prekey(w: &mut W, k: &OneTimePrekey) {
    w.varint(k.id.into());
    w.raw(&k.public);
}

fn device_list(w: &mut W, l: &DeviceList) {
    w.raw(&l.user.0);
    w.varint(l.version);
    w.seq(&l.devices, |w, d| {
        w.raw(&d.device.0);
        w.raw(&d.signing_key);
        w.raw(&d.agreement_key);
        w.bytes(&d.membership_signature);
    });
}

fn signed_device_list(w: &mut W, l: &SignedDeviceList) {
    device_list(w, &l.list);
    w.bytes(&l.signature);
}

fn error_code(c: ErrorCode) -> u64 {
    ALL_ERROR_CODES
        .iter()
        .position(|x| *x == c)
        .expect("listed") as u64
}

fn wire_error(w: &mut W, e: &WireError) {
    w.varint(error_code(e.code));
    w.string(&e.message);
    w.option(&e.retry_after_ms, |w, v| w.varint((*v).into()));
}

fn delivered(w: &mut W, d: &Delivered) {
    w.varint(d.seq);
    envelope(w, &d.envelope);
}

fn request(w: &mut W, r: &Request) {
    match r {
        Request::Hello { device } => {
            w.varint(0);
            w.raw(&device.0);
        }
        Request::Auth { signature } => {
            w.varint(1);
            w.bytes(signature);
        }
        Request::Register {
            registration: reg,
            signature,
        } => {
            w.varint(2);
            w.raw(&reg.device.0);
            w.raw(&reg.user.0);
            w.raw(&reg.signing_key);
            w.raw(&reg.agreement_key);
            w.bytes(&reg.user_signature);
            w.bytes(signature);
        }
        Request::Send { envelopes } => {
            w.varint(3);
            w.seq(envelopes, envelope);
        }
        Request::Pull { after, limit, ack } => {
            w.varint(4);
            w.varint(*after);
            w.varint((*limit).into());
            w.varint(*ack);
        }
        Request::Ack { up_to } => {
            w.varint(5);
            w.varint(*up_to);
        }
        Request::PublishPrekeys {
            signed_prekey: spk,
            one_time_prekeys,
        } => {
            w.varint(6);
            signed_prekey(w, spk);
            w.seq(one_time_prekeys, one_time_prekey);
        }
        Request::FetchPrekeys { device } => {
            w.varint(7);
            w.raw(&device.0);
        }
        Request::PublishDeviceList { list } => {
            w.varint(8);
            signed_device_list(w, list);
        }
        Request::FetchDeviceList { user } => {
            w.varint(9);
            w.raw(&user.0);
        }
        Request::Ping => w.varint(10),
        Request::BlobPut {
            blob,
            offset,
            total_len,
            bytes,
        } => {
            w.varint(11);
            w.raw(&blob.0);
            w.varint(*offset);
            w.varint(*total_len);
            w.bytes(bytes);
        }
        Request::BlobStatus { blob } => {
            w.varint(12);
            w.raw(&blob.0);
        }
        Request::BlobGet { blob, offset, max } => {
            w.varint(13);
            w.raw(&blob.0);
            w.varint(*offset);
            w.varint((*max).into());
        }
        Request::FetchDeviceLeases { user } => {
            w.varint(14);
            w.raw(&user.0);
        }
        Request::EarlyPushes => w.varint(15),
    }
}

fn response(w: &mut W, r: &Response) {
    match r {
        Response::Challenge { challenge } => {
            w.varint(0);
            w.raw(challenge);
        }
        Response::Authenticated(a) => {
            w.varint(1);
            w.raw(&a.device.0);
            w.varint(a.inbox_head);
            w.varint(a.acked);
            w.varint(a.one_time_prekeys_left.into());
            w.varint(a.relay_time_ms);
        }
        Response::Sent { outcomes } => {
            w.varint(2);
            w.seq(outcomes, |w, o| match o {
                SendOutcome::Stored {
                    message_id,
                    recipient,
                    seq,
                    duplicate,
                } => {
                    w.varint(0);
                    w.raw(&message_id.0);
                    w.raw(&recipient.0);
                    w.varint(*seq);
                    w.bool(*duplicate);
                }
                SendOutcome::Refused {
                    message_id,
                    recipient,
                    error,
                } => {
                    w.varint(1);
                    w.raw(&message_id.0);
                    w.raw(&recipient.0);
                    wire_error(w, error);
                }
            });
        }
        Response::Page(p) => {
            w.varint(3);
            w.seq(&p.envelopes, delivered);
            w.varint(p.remaining);
            w.option(&p.truncated, |w, t| {
                w.varint(t.oldest_retained);
                w.varint(t.dropped_count);
                w.seq(&t.dropped, |w, d| {
                    w.raw(&d.sender.0);
                    w.raw(&d.conversation.0);
                    w.varint(d.first_seq);
                    w.varint(d.last_seq);
                });
            });
        }
        Response::Acked { up_to } => {
            w.varint(4);
            w.varint(*up_to);
        }
        Response::PrekeysPublished {
            one_time_prekeys_left,
        } => {
            w.varint(5);
            w.varint((*one_time_prekeys_left).into());
        }
        Response::Prekeys(b) => {
            w.varint(6);
            w.raw(&b.device.0);
            w.raw(&b.user.0);
            w.raw(&b.signing_key);
            w.raw(&b.agreement_key);
            signed_prekey(w, &b.signed_prekey);
            w.option(&b.one_time_prekey, one_time_prekey);
        }
        Response::DeviceListPublished { version } => {
            w.varint(7);
            w.varint(*version);
        }
        Response::DeviceList(l) => {
            w.varint(8);
            signed_device_list(w, l);
        }
        Response::Pong { relay_time_ms } => {
            w.varint(9);
            w.varint(*relay_time_ms);
        }
        Response::BlobStored { blob, committed } => {
            w.varint(10);
            w.raw(&blob.0);
            w.varint(*committed);
        }
        Response::BlobState {
            blob,
            total_len,
            committed,
            expires_at_ms,
        } => {
            w.varint(11);
            w.raw(&blob.0);
            w.varint(*total_len);
            w.varint(*committed);
            w.varint(*expires_at_ms);
        }
        Response::BlobChunk {
            blob,
            offset,
            total_len,
            committed,
            bytes,
        } => {
            w.varint(12);
            w.raw(&blob.0);
            w.varint(*offset);
            w.varint(*total_len);
            w.varint(*committed);
            w.bytes(bytes);
        }
        Response::DeviceLeases { list, leases } => {
            w.varint(13);
            signed_device_list(w, list);
            w.seq(leases, |w, l| {
                w.raw(&l.device.0);
                w.varint(l.last_seen_ms);
                w.bool(l.stale);
            });
        }
        Response::EarlyPushes => w.varint(14),
    }
}

fn server_frame(w: &mut W, f: &ServerFrame) {
    match f {
        ServerFrame::Response {
            request_id,
            response: r,
        } => {
            w.varint(0);
            w.varint((*request_id).into());
            response(w, r);
        }
        ServerFrame::Error { request_id, error } => {
            w.varint(1);
            w.varint((*request_id).into());
            wire_error(w, error);
        }
        ServerFrame::Push { envelopes } => {
            w.varint(2);
            w.seq(envelopes, delivered);
        }
        ServerFrame::Closing { code, reason } => {
            w.varint(3);
            w.varint(error_code(*code));
            w.string(reason);
        }
        ServerFrame::PrekeysLow {
            one_time_prekeys_left,
        } => {
            w.varint(4);
            w.varint((*one_time_prekeys_left).into());
        }
        ServerFrame::Retired { last_seen_ms } => {
            w.varint(5);
            w.varint(*last_seen_ms);
        }
        ServerFrame::EarlyPush { envelopes } => {
            w.varint(6);
            w.seq(envelopes, delivered);
        }
        ServerFrame::Durable { through } => {
            w.varint(7);
            w.varint(*through);
        }
    }
}

/// Length prefix, version byte, body.
fn frame(body: W) -> Vec<u8> {
    let mut out = ((body.0.len() + 1) as u32).to_be_bytes().to_vec();
    out.push(1);
    out.extend_from_slice(&body.0);
    out
}

fn spec_client_frame(f: &ClientFrame) -> Vec<u8> {
    let mut w = W::default();
    w.varint(f.request_id.into());
    request(&mut w, &f.request);
    frame(w)
}

fn spec_server_frame(f: &ServerFrame) -> Vec<u8> {
    let mut w = W::default();
    server_frame(&mut w, f);
    frame(w)
}

proptest! {
    #[test]
    fn client_frames_follow_the_spec(f in common::client_frame()) {
        let ours = encode_client_frame(&f).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(hex::encode(ours), hex::encode(spec_client_frame(&f)));
    }

    #[test]
    fn server_frames_follow_the_spec(f in common::server_frame()) {
        let ours = encode_server_frame(&f).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(hex::encode(ours), hex::encode(spec_server_frame(&f)));
    }

    #[test]
    fn responses_follow_the_spec(request_id in wide_u32(), r in common::response()) {
        let f = ServerFrame::Response { request_id, response: r };
        let ours = encode_server_frame(&f).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(hex::encode(ours), hex::encode(spec_server_frame(&f)));
    }

    #[test]
    fn envelope_headers_follow_the_byte_table(h in common::header()) {
        prop_assert_eq!(h.to_bytes(), Ok(header(&h)));
    }

    #[test]
    fn device_list_signing_bytes_follow_the_spec(l in common::signed_device_list()) {
        let mut w = W::default();
        w.raw(b"hush-device-list-v1");
        device_list(&mut w, &l.list);
        prop_assert_eq!(l.list.signing_bytes(), Ok(w.0));
    }

    #[test]
    fn varints_are_leb128(v in wide_u64()) {
        let mut w = W::default();
        w.varint(v);
        prop_assert_eq!(postcard::to_allocvec(&v).map_err(|e| TestCaseError::fail(e.to_string()))?, w.0);
    }
}
