//! The double ratchet (Signal's algorithm) plus Hush's forced chain reseeds.
//!
//! # State machine in one paragraph
//! Each party has a current X25519 *ratchet key*. A *root step* (KDF_RK) mixes
//! `DH(our ratchet key, their ratchet key)` into the root key and yields a new
//! chain. Receiving a message with a ratchet key never seen before performs the
//! receiving root step at once; the matching sending root step (fresh ratchet key)
//! is done lazily by the next [`Session::seal`], which is equivalent to the spec's
//! eager step because nothing else touches the root key in between, and it keeps
//! [`Session::open`] free of randomness. Every message key comes from a symmetric
//! chain step (KDF_CK) and is used once.
//!
//! # Forced rotation: chain reseeds
//! A one-sided conversation never turns, so the standard ratchet would use one
//! chain forever. The sender therefore *reseeds* its sending chain after
//! [`RotationPolicy::max_messages`] messages or [`RotationPolicy::max_age_ms`]:
//!
//! ```text
//! E       = fresh X25519 key pair
//! CK_g    = HKDF(salt = seed_g, IKM = DH(E, peer ratchet key of this chain), "hush-reseed-v1" ‖ g ‖ E)
//! seed_g+1 = HMAC(seed_g, 0x03)          (seed_1 comes from the chain's root step)
//! ```
//!
//! The header carries `generation = g` and `reseed = E_pub`. The root key is never
//! touched by a reseed, so two parties reseeding concurrently cannot fork it, and
//! a reseed only uses the peer ratchet key that *this chain* was created with; the
//! receiver stores the matching private key with each receiving chain, so a reseed
//! still opens after the receiver has moved on to a newer ratchet key. Each
//! generation derives from its own seed (a one-way hash chain) rather than from the
//! previous generation, so losing every message of one generation does not block
//! later ones. See `docs/SECURITY.md` for the security argument.
//!
//! # Transactional open
//! `open` either succeeds and commits, or fails and leaves the session exactly as
//! it was: the common in-order case computes the next key without mutating and
//! commits after the AEAD check; every other case works on a clone.

use crate::CryptoError;
use crate::aead::{TAG_LEN, decrypt, encrypt_in_place};
use crate::header::{RatchetHeader, SessionInit};
use crate::identity::{DevicePublic, dh, x25519_keypair, x25519_public};
use crate::kdf::{chain_step, message_keys, next_seed, reseed_chain, root_step};
use crate::padding::{pad_into, padded_len, unpad_owned};
use crate::persist;
use crate::prekeys::DAY_MS;
use crate::secret::Secret32;
use core::fmt;
use rand_core::CryptoRng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::VecDeque;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// House maximum of messages on one sending chain before a forced reseed.
///
/// Every sender reseeds after at most this many messages (a laxer
/// [`RotationPolicy`] is refused), so no honest header carries a message index
/// at or above it, nor a `previous_chain_len` above it: [`Session::open`]
/// rejects such headers before deriving anything.
pub const MAX_MESSAGES_PER_CHAIN: u32 = 100;
/// Maximum forward jump within one chain (messages skipped by a single
/// header): from index 0 to the last index a chain can have. Far-future
/// indexes are refused outright (see [`MAX_MESSAGES_PER_CHAIN`]).
pub const MAX_SKIP: u32 = MAX_MESSAGES_PER_CHAIN - 1;
/// Length of the random nonce in front of every message ciphertext
/// (`nonce ‖ ChaCha20-Poly1305 output`).
pub const MESSAGE_NONCE_LEN: usize = 12;
/// Maximum number of stored skipped message keys (oldest evicted first).
pub const MAX_SKIPPED_KEYS: usize = 2_000;
/// House maximum age of a sending chain before a forced reseed (7 days).
pub const MAX_CHAIN_AGE_MS: u64 = 7 * DAY_MS;
/// Maximum number of reseed generations one header may skip.
pub const MAX_GENERATION_JUMP: u32 = 1_000;
/// Maximum stored seeds of skipped generations per receiving DH chain.
pub const MAX_SKIPPED_SEEDS: usize = 64;
/// Maximum receiving DH chains (peer ratchet keys) kept; oldest evicted.
pub const MAX_RECEIVING_DH_CHAINS: usize = 16;
/// Maximum reseed generations kept per receiving DH chain; oldest evicted.
pub const MAX_GENERATIONS_KEPT: usize = 64;
/// Evicted peer ratchet keys remembered (public keys only) to report [`CryptoError::UnknownChain`].
pub const MAX_RETIRED_KEYS: usize = 64;

const STATE_VERSION_NOTE: &str = "session record V1";

/// When a sender reseeds its sending chain without waiting for a reply.
///
/// The defaults are the house maxima (100 messages, 7 days); a stricter policy
/// (fewer messages, shorter age) is allowed, a laxer one is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationPolicy {
    max_messages: u32,
    max_age_ms: u64,
}

impl RotationPolicy {
    /// The house policy: reseed after 100 messages or 7 days on one chain.
    pub const DEFAULT: Self = Self {
        max_messages: MAX_MESSAGES_PER_CHAIN,
        max_age_ms: MAX_CHAIN_AGE_MS,
    };

    /// A stricter policy.
    ///
    /// # Errors
    /// [`CryptoError::BadPolicy`] if `max_messages` is 0 or above 100, or
    /// `max_age_ms` is 0 or above 7 days.
    pub fn new(max_messages: u32, max_age_ms: u64) -> Result<Self, CryptoError> {
        let p = Self {
            max_messages,
            max_age_ms,
        };
        p.check()?;
        Ok(p)
    }

    fn check(&self) -> Result<(), CryptoError> {
        if self.max_messages == 0
            || self.max_messages > MAX_MESSAGES_PER_CHAIN
            || self.max_age_ms == 0
            || self.max_age_ms > MAX_CHAIN_AGE_MS
        {
            return Err(CryptoError::BadPolicy);
        }
        Ok(())
    }

    /// Messages per sending chain before a reseed.
    pub fn max_messages(&self) -> u32 {
        self.max_messages
    }

    /// Age of a sending chain (from its first message) before a reseed.
    pub fn max_age_ms(&self) -> u64 {
        self.max_age_ms
    }
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Our current sending chain.
#[derive(Clone, Serialize, Deserialize)]
struct SendChain {
    /// Our ratchet public key (header `dh`).
    ratchet_pub: [u8; 32],
    /// The peer ratchet key this chain was agreed with; reseeds use it too.
    remote: [u8; 32],
    generation: u32,
    /// Reseed ephemeral public key of this generation (zero for generation 0).
    reseed_pub: [u8; 32],
    chain_key: Secret32,
    /// Index of the next message (= messages sent on this generation so far).
    index: u32,
    /// `previous_chain_len` to put in headers.
    previous_chain_len: u32,
    /// Seed of generation `generation + 1`.
    next_seed: Secret32,
    /// Time of the first message on this generation.
    started_ms: Option<u64>,
}

/// One receiving chain: a (peer ratchet key, generation) pair.
#[derive(Clone, Serialize, Deserialize)]
struct RecvChain {
    generation: u32,
    /// `None` once closed (the sender told us its length and the rest is in the skipped store).
    chain_key: Option<Secret32>,
    next_index: u32,
}

/// Everything received under one peer ratchet key.
#[derive(Clone, Serialize, Deserialize)]
struct RecvDhChain {
    remote: [u8; 32],
    /// Our ratchet private key this peer key was paired with (needed for reseeds
    /// even after we moved to a newer ratchet key).
    local_secret: Secret32,
    next_seed: Secret32,
    next_generation: u32,
    skipped_seeds: Vec<(u32, Secret32)>,
    chains: Vec<RecvChain>,
}

#[derive(Clone, Serialize, Deserialize)]
struct SkippedKey {
    remote: [u8; 32],
    generation: u32,
    index: u32,
    key: Secret32,
}

impl SkippedKey {
    fn matches(&self, h: &RatchetHeader) -> bool {
        self.remote == h.dh && self.generation == h.generation && self.index == h.index
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct State {
    local: DevicePublic,
    remote: DevicePublic,
    initiator: bool,
    root_key: Secret32,
    ratchet_secret: Secret32,
    ratchet_pub: [u8; 32],
    remote_ratchet: Option<[u8; 32]>,
    send: Option<SendChain>,
    previous_send_len: u32,
    recv: Vec<RecvDhChain>,
    retired_remote: VecDeque<[u8; 32]>,
    skipped: VecDeque<SkippedKey>,
    epoch: u64,
    pending_init: Option<SessionInit>,
    policy: RotationPolicy,
}

/// An end-to-end encrypted session with one peer device.
///
/// Created by [`crate::initiate`] or [`crate::respond`]. All secrets are zeroized
/// on drop and `Debug` shows only public information. Serialises (serde, or
/// [`Session::to_bytes`]) as a versioned record so the client can persist it.
#[derive(Clone)]
pub struct Session {
    state: State,
}

impl ZeroizeOnDrop for Session {}

/// Changes `open` applies after a successful in-order fast-path decryption.
struct FastCommit {
    rec: usize,
    chain: usize,
    chain_key: Secret32,
    message_key: Secret32,
}

impl Session {
    pub(crate) fn new_initiator<R: CryptoRng + ?Sized>(
        rng: &mut R,
        sk: Secret32,
        local: DevicePublic,
        remote: DevicePublic,
        remote_spk: [u8; 32],
        init: SessionInit,
    ) -> Result<Self, CryptoError> {
        let (secret, public) = x25519_keypair(rng);
        let step = root_step(&sk, &dh(&secret, &remote_spk)?)?;
        Ok(Self {
            state: State {
                local,
                remote,
                initiator: true,
                root_key: step.root_key,
                ratchet_secret: secret,
                ratchet_pub: public,
                remote_ratchet: Some(remote_spk),
                send: Some(SendChain {
                    ratchet_pub: public,
                    remote: remote_spk,
                    generation: 0,
                    reseed_pub: [0u8; 32],
                    chain_key: step.chain_key,
                    index: 0,
                    previous_chain_len: 0,
                    next_seed: step.seed,
                    started_ms: None,
                }),
                previous_send_len: 0,
                recv: Vec::new(),
                retired_remote: VecDeque::new(),
                skipped: VecDeque::new(),
                epoch: 0,
                pending_init: Some(init),
                policy: RotationPolicy::DEFAULT,
            },
        })
    }

    pub(crate) fn new_responder(
        sk: Secret32,
        spk: Secret32,
        spk_pub: [u8; 32],
        local: DevicePublic,
        remote: DevicePublic,
    ) -> Self {
        Self {
            state: State {
                local,
                remote,
                initiator: false,
                root_key: sk,
                ratchet_secret: spk,
                ratchet_pub: spk_pub,
                remote_ratchet: None,
                send: None,
                previous_send_len: 0,
                recv: Vec::new(),
                retired_remote: VecDeque::new(),
                skipped: VecDeque::new(),
                epoch: 0,
                pending_init: None,
                policy: RotationPolicy::DEFAULT,
            },
        }
    }

    /// Number of DH steps this session has taken (sending or receiving side,
    /// including chain reseeds). Monotonic; the app may display it. The two peers'
    /// counts need not be equal.
    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    /// The X3DH init data to put in outgoing envelope headers; `Some` on the
    /// initiator until the responder's first message has been opened.
    pub fn needs_init_header(&self) -> Option<&SessionInit> {
        self.state.pending_init.as_ref()
    }

    /// Our device's public keys.
    pub fn local_identity(&self) -> &DevicePublic {
        &self.state.local
    }

    /// The peer device's public keys.
    pub fn remote_identity(&self) -> &DevicePublic {
        &self.state.remote
    }

    /// The rotation policy in force.
    pub fn rotation_policy(&self) -> RotationPolicy {
        self.state.policy
    }

    /// Makes rotation stricter (tests and cautious callers); takes effect at the next seal.
    pub fn set_rotation_policy(&mut self, policy: RotationPolicy) {
        self.state.policy = policy;
    }

    /// Whether this session holds a receiving chain for the peer ratchet key
    /// `dh` (a header naming it needs no root step). Cheap: no key derivation.
    ///
    /// A caller holding several sessions with one peer tries first the session
    /// that knows the header's ratchet key, so a forged envelope costs at most
    /// one speculative root step rather than one per session.
    pub fn knows_ratchet_key(&self, dh: &[u8; 32]) -> bool {
        self.state.recv.iter().any(|r| &r.remote == dh)
    }

    /// Number of stored skipped message keys (diagnostics; bounded by [`MAX_SKIPPED_KEYS`]).
    pub fn skipped_key_count(&self) -> usize {
        self.state.skipped.len()
    }

    /// Encrypts one message.
    ///
    /// Pads `plaintext` (see [`crate::pad`]), advances the sending chain (performing
    /// the pending DH step or a forced reseed first if due) and encrypts with
    /// ChaCha20-Poly1305. `ad` builds the caller's associated data from the ratchet
    /// header: the caller serialises its whole plaintext envelope header (which
    /// includes this ratchet header) so the AEAD authenticates exactly the header
    /// bytes on the wire. The session additionally authenticates both identities
    /// and [`RatchetHeader::to_bytes`] itself. On error the session is unchanged.
    ///
    /// # Errors
    /// [`CryptoError::NotReady`] on a responder that has not opened a message yet,
    /// [`CryptoError::CounterExhausted`], [`CryptoError::BadKey`].
    pub fn seal<R: CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
        now_ms: u64,
        plaintext: &[u8],
        ad: impl FnOnce(&RatchetHeader) -> Vec<u8>,
    ) -> Result<(RatchetHeader, Vec<u8>), CryptoError> {
        let st = &self.state;
        let mut epoch = st.epoch;
        let mut new_root = None;
        let mut new_ratchet = None;
        let mut chain = match &st.send {
            Some(c) => c.clone(),
            None => {
                // Pending sending-side DH step: fresh ratchet key against the peer's latest.
                let remote = st.remote_ratchet.ok_or(CryptoError::NotReady)?;
                let (secret, public) = x25519_keypair(rng);
                let step = root_step(&st.root_key, &dh(&secret, &remote)?)?;
                epoch = epoch.saturating_add(1);
                new_root = Some(step.root_key);
                new_ratchet = Some((secret, public));
                SendChain {
                    ratchet_pub: public,
                    remote,
                    generation: 0,
                    reseed_pub: [0u8; 32],
                    chain_key: step.chain_key,
                    index: 0,
                    previous_chain_len: st.previous_send_len,
                    next_seed: step.seed,
                    started_ms: None,
                }
            }
        };
        let too_old = chain
            .started_ms
            .is_some_and(|t| now_ms.saturating_sub(t) >= st.policy.max_age_ms);
        if chain.index >= st.policy.max_messages || too_old {
            reseed(&mut chain, rng)?;
            epoch = epoch.saturating_add(1);
        }
        if chain.started_ms.is_none() {
            chain.started_ms = Some(now_ms);
        }
        let (next_ck, mk) = chain_step(&chain.chain_key)?;
        let header = RatchetHeader {
            dh: chain.ratchet_pub,
            previous_chain_len: chain.previous_chain_len,
            index: chain.index,
            generation: chain.generation,
            reseed: chain.reseed_pub,
        };
        chain.chain_key = next_ck;
        chain.index = chain
            .index
            .checked_add(1)
            .ok_or(CryptoError::CounterExhausted)?;

        let caller_ad = ad(&header);
        let full_ad = st.message_ad(&header, &caller_ad);
        let keys = message_keys(&mk)?;
        // A fresh random nonce per message: a rolled-back state that derives
        // this message key again still never repeats (key, nonce).
        let mut nonce = [0u8; MESSAGE_NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        // Pad straight into the buffer and encrypt it in place: no separate
        // padded plaintext to copy and wipe.
        let mut body = Vec::with_capacity(padded_len(plaintext.len()) + TAG_LEN);
        pad_into(plaintext, &mut body);
        if let Err(e) = encrypt_in_place(&keys.key, &nonce, &mut body, &full_ad) {
            body.zeroize();
            return Err(e);
        }
        let mut ciphertext = Vec::with_capacity(MESSAGE_NONCE_LEN + body.len());
        ciphertext.extend_from_slice(&nonce);
        ciphertext.extend_from_slice(&body);

        // Commit.
        let st = &mut self.state;
        if let Some(root) = new_root {
            st.root_key = root;
        }
        if let Some((secret, public)) = new_ratchet {
            st.ratchet_secret = secret;
            st.ratchet_pub = public;
        }
        st.send = Some(chain);
        st.epoch = epoch;
        Ok((header, ciphertext))
    }

    /// Decrypts one message; transactional (on any error the session is unchanged).
    ///
    /// `ad` must be the same caller associated data that the sender's `ad` closure
    /// returned (the envelope header bytes). `rng` and `now_ms` are accepted for API
    /// symmetry and future use: opening needs no randomness because the sending-side
    /// DH step is deferred to the next [`Session::seal`].
    ///
    /// # Errors
    /// [`CryptoError::DecryptFailed`] (tampering, wrong session),
    /// [`CryptoError::Duplicate`] (replay), [`CryptoError::JumpTooFar`],
    /// [`CryptoError::TooManySkipped`], [`CryptoError::UnknownChain`],
    /// [`CryptoError::MalformedHeader`], [`CryptoError::BadKey`], [`CryptoError::BadPadding`].
    pub fn open<R: CryptoRng + ?Sized>(
        &mut self,
        _rng: &mut R,
        _now_ms: u64,
        header: &RatchetHeader,
        ad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        header.check()?;
        self.state.precheck(header)?;
        let full_ad = self.state.message_ad(header, ad);
        if let Some(fast) = self.state.fast_path(header) {
            let commit = fast?;
            let plaintext = decrypt_padded(&commit.message_key, ciphertext, &full_ad)?;
            self.state.commit_fast(commit)?;
            return Ok(plaintext);
        }
        let mut st = self.state.clone();
        let plaintext = st.open_slow(header, &full_ad, ciphertext)?;
        self.state = st;
        Ok(plaintext)
    }

    /// Encodes the session (secret!) as a versioned postcard record; wiped on drop.
    ///
    /// # Errors
    /// Only [`CryptoError::Internal`].
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        persist::encode(self)
    }

    /// Restores a session stored with [`Session::to_bytes`].
    ///
    /// # Errors
    /// [`CryptoError::MalformedState`] if it does not decode or violates an invariant.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        persist::decode(bytes)
    }

    #[cfg(test)]
    pub(crate) fn debug_secrets(&self) -> Vec<[u8; 32]> {
        let st = &self.state;
        let mut out = vec![st.root_key.0, st.ratchet_secret.0];
        if let Some(s) = &st.send {
            out.push(s.chain_key.0);
            out.push(s.next_seed.0);
        }
        for r in &st.recv {
            out.push(r.local_secret.0);
            out.push(r.next_seed.0);
            out.extend(r.skipped_seeds.iter().map(|(_, s)| s.0));
            out.extend(
                r.chains
                    .iter()
                    .filter_map(|c| c.chain_key.as_ref().map(|k| k.0)),
            );
        }
        out.extend(st.skipped.iter().map(|k| k.key.0));
        out
    }
}

/// Reseeds a sending chain in place (see the module docs).
fn reseed<R: CryptoRng + ?Sized>(chain: &mut SendChain, rng: &mut R) -> Result<(), CryptoError> {
    let generation = chain
        .generation
        .checked_add(1)
        .ok_or(CryptoError::CounterExhausted)?;
    let (e, e_pub) = x25519_keypair(rng);
    let shared = dh(&e, &chain.remote)?;
    chain.chain_key = reseed_chain(&chain.next_seed, &shared, generation, &e_pub)?;
    chain.next_seed = next_seed(&chain.next_seed)?;
    chain.previous_chain_len = chain.index;
    chain.index = 0;
    chain.generation = generation;
    chain.reseed_pub = e_pub;
    chain.started_ms = None;
    Ok(())
}

/// Opens `nonce (12) ‖ ChaCha20-Poly1305 ciphertext ‖ tag (16)` and unpads.
fn decrypt_padded(mk: &Secret32, sealed: &[u8], ad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let (nonce, ciphertext) = split_nonce(sealed)?;
    let keys = message_keys(mk)?;
    unpad_owned(decrypt(&keys.key, &nonce, ciphertext, ad)?)
}

/// Splits a message ciphertext into its nonce and the AEAD output; anything
/// shorter than nonce + tag cannot be a message.
fn split_nonce(sealed: &[u8]) -> Result<([u8; MESSAGE_NONCE_LEN], &[u8]), CryptoError> {
    if sealed.len() < MESSAGE_NONCE_LEN + TAG_LEN {
        return Err(CryptoError::DecryptFailed);
    }
    let (nonce, rest) = sealed.split_at(MESSAGE_NONCE_LEN);
    let nonce = nonce.try_into().map_err(|_| CryptoError::DecryptFailed)?;
    Ok((nonce, rest))
}

fn push_skipped(store: &mut VecDeque<SkippedKey>, key: SkippedKey) {
    store.push_back(key);
    while store.len() > MAX_SKIPPED_KEYS {
        store.pop_front();
    }
}

/// Derives keys `from..to` of a chain into the skipped store and returns the chain
/// key at position `to`. Only the last [`MAX_SKIPPED_KEYS`] are stored: older ones
/// would be evicted at once anyway, so memory stays bounded for any jump.
fn skip_keys(
    store: &mut VecDeque<SkippedKey>,
    remote: &[u8; 32],
    generation: u32,
    chain_key: &Secret32,
    from: u32,
    to: u32,
) -> Result<Secret32, CryptoError> {
    let mut ck = chain_key.clone();
    for index in from..to {
        let (next, mk) = chain_step(&ck)?;
        if usize::try_from(to - index).unwrap_or(usize::MAX) <= MAX_SKIPPED_KEYS {
            push_skipped(
                store,
                SkippedKey {
                    remote: *remote,
                    generation,
                    index,
                    key: mk,
                },
            );
        }
        ck = next;
    }
    Ok(ck)
}

impl State {
    /// Associated data for the AEAD: both identities (initiator first), the
    /// ratchet header, then the caller's bytes.
    fn message_ad(&self, header: &RatchetHeader, caller_ad: &[u8]) -> Vec<u8> {
        let (first, second) = if self.initiator {
            (&self.local, &self.remote)
        } else {
            (&self.remote, &self.local)
        };
        let mut ad = Vec::with_capacity(128 + crate::RATCHET_HEADER_LEN + caller_ad.len());
        ad.extend_from_slice(&first.to_bytes());
        ad.extend_from_slice(&second.to_bytes());
        ad.extend_from_slice(&header.to_bytes());
        ad.extend_from_slice(caller_ad);
        ad
    }

    fn find_chain(&self, h: &RatchetHeader) -> Option<(&RecvDhChain, Option<&RecvChain>)> {
        let rec = self.recv.iter().find(|r| r.remote == h.dh)?;
        Some((
            rec,
            rec.chains.iter().find(|c| c.generation == h.generation),
        ))
    }

    /// Cheap bound checks before any cloning or key derivation.
    fn precheck(&self, h: &RatchetHeader) -> Result<(), CryptoError> {
        // No sender produces these (chains reseed after MAX_MESSAGES_PER_CHAIN).
        if h.index >= MAX_MESSAGES_PER_CHAIN || h.previous_chain_len > MAX_MESSAGES_PER_CHAIN {
            return Err(CryptoError::MalformedHeader);
        }
        // `next_gen` is `None` when the generation's chain already exists.
        let (next_gen, next_index) = match self.find_chain(h) {
            None => (Some(1), 0),
            Some((rec, None)) => (Some(rec.next_generation), 0),
            Some((_, Some(c))) => (None, c.next_index),
        };
        if let Some(next_gen) = next_gen
            && h.generation >= next_gen
        {
            let jump = h.generation - next_gen;
            if jump > MAX_GENERATION_JUMP {
                return Err(CryptoError::TooManySkipped {
                    requested: u64::from(jump),
                    limit: MAX_GENERATION_JUMP,
                });
            }
        }
        if h.index > next_index && h.index - next_index > MAX_SKIP {
            return Err(CryptoError::JumpTooFar {
                requested: u64::from(h.index - next_index),
                limit: MAX_SKIP,
            });
        }
        Ok(())
    }

    /// The in-order case on a live chain with nothing else to update: derives the
    /// chain's next keys without mutating anything.
    fn fast_path(&self, h: &RatchetHeader) -> Option<Result<FastCommit, CryptoError>> {
        let rec = self.recv.iter().position(|r| r.remote == h.dh)?;
        let record = self.recv.get(rec)?;
        let chain = record
            .chains
            .iter()
            .position(|c| c.generation == h.generation)?;
        let live = record.chains.get(chain)?;
        let ck = live.chain_key.as_ref()?;
        if live.next_index != h.index {
            return None;
        }
        // Closing the previous generation needs the slow path.
        if h.generation > 0
            && record
                .chains
                .iter()
                .any(|c| c.generation == h.generation - 1 && c.chain_key.is_some())
        {
            return None;
        }
        Some(chain_step(ck).map(|(chain_key, message_key)| FastCommit {
            rec,
            chain,
            chain_key,
            message_key,
        }))
    }

    fn commit_fast(&mut self, c: FastCommit) -> Result<(), CryptoError> {
        let chain = self
            .recv
            .get_mut(c.rec)
            .and_then(|r| r.chains.get_mut(c.chain))
            .ok_or(CryptoError::Internal("fast commit"))?;
        chain.next_index = chain
            .next_index
            .checked_add(1)
            .ok_or(CryptoError::CounterExhausted)?;
        chain.chain_key = Some(c.chain_key);
        self.pending_init = None;
        Ok(())
    }

    /// General receive path; runs on a clone that is committed only on success.
    fn open_slow(
        &mut self,
        h: &RatchetHeader,
        ad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        // 1. A key stored for an out-of-order message.
        if let Some(pos) = self.skipped.iter().position(|k| k.matches(h)) {
            let key = self
                .skipped
                .remove(pos)
                .ok_or(CryptoError::Internal("skipped"))?;
            let plaintext = decrypt_padded(&key.key, ciphertext, ad)?;
            self.after_receive(h)?;
            return Ok(plaintext);
        }
        // 2. The receiving DH chain for the sender's ratchet key (new key => root step).
        let rec_pos = match self.recv.iter().position(|r| r.remote == h.dh) {
            Some(p) => p,
            None => self.new_dh_chain(&h.dh)?,
        };
        // 3. The generation within it (new generation => reseed derivation).
        let rec = self
            .recv
            .get_mut(rec_pos)
            .ok_or(CryptoError::Internal("record"))?;
        let (chain_pos, created) = chain_for(rec, h)?;
        if created {
            self.epoch = self.epoch.saturating_add(1);
        }
        // 4. Advance the chain to the message index.
        let rec = self
            .recv
            .get_mut(rec_pos)
            .ok_or(CryptoError::Internal("record"))?;
        let remote = rec.remote;
        let chain = rec
            .chains
            .get_mut(chain_pos)
            .ok_or(CryptoError::Internal("chain"))?;
        let Some(ck) = chain.chain_key.as_ref() else {
            return Err(if h.index < chain.next_index {
                CryptoError::Duplicate
            } else {
                CryptoError::UnknownChain
            });
        };
        if h.index < chain.next_index {
            return Err(CryptoError::Duplicate);
        }
        let ck = skip_keys(
            &mut self.skipped,
            &remote,
            h.generation,
            ck,
            chain.next_index,
            h.index,
        )?;
        let (next_ck, mk) = chain_step(&ck)?;
        chain.chain_key = Some(next_ck);
        chain.next_index = h
            .index
            .checked_add(1)
            .ok_or(CryptoError::CounterExhausted)?;
        let plaintext = decrypt_padded(&mk, ciphertext, ad)?;
        self.after_receive(h)?;
        Ok(plaintext)
    }

    /// Receiving root step for a peer ratchet key never seen before.
    fn new_dh_chain(&mut self, remote: &[u8; 32]) -> Result<usize, CryptoError> {
        if self.retired_remote.contains(remote) {
            return Err(CryptoError::UnknownChain);
        }
        let step = root_step(&self.root_key, &dh(&self.ratchet_secret, remote)?)?;
        self.root_key = step.root_key;
        self.recv.push(RecvDhChain {
            remote: *remote,
            local_secret: self.ratchet_secret.clone(),
            next_seed: step.seed,
            next_generation: 1,
            skipped_seeds: Vec::new(),
            chains: vec![RecvChain {
                generation: 0,
                chain_key: Some(step.chain_key),
                next_index: 0,
            }],
        });
        while self.recv.len() > MAX_RECEIVING_DH_CHAINS {
            let old = self.recv.remove(0);
            self.retired_remote.push_back(old.remote);
            while self.retired_remote.len() > MAX_RETIRED_KEYS {
                self.retired_remote.pop_front();
            }
        }
        self.remote_ratchet = Some(*remote);
        if let Some(s) = self.send.take() {
            self.previous_send_len = s.index;
        }
        self.epoch = self.epoch.saturating_add(1);
        Ok(self.recv.len().saturating_sub(1))
    }

    /// Bookkeeping after a successful decryption.
    fn after_receive(&mut self, h: &RatchetHeader) -> Result<(), CryptoError> {
        self.pending_init = None;
        // The first message of generation g tells us how long generation g-1 was:
        // store its remaining keys and forget its chain key.
        if h.generation == 0 {
            return Ok(());
        }
        let Some(rec) = self.recv.iter_mut().find(|r| r.remote == h.dh) else {
            return Ok(());
        };
        let remote = rec.remote;
        let Some(prev) = rec
            .chains
            .iter_mut()
            .find(|c| c.generation == h.generation - 1)
        else {
            return Ok(());
        };
        let Some(ck) = prev.chain_key.as_ref() else {
            return Ok(());
        };
        let end = h.previous_chain_len;
        if end < prev.next_index || end > MAX_MESSAGES_PER_CHAIN {
            return Ok(());
        }
        skip_keys(
            &mut self.skipped,
            &remote,
            prev.generation,
            ck,
            prev.next_index,
            end,
        )?;
        prev.chain_key = None;
        prev.next_index = end;
        Ok(())
    }

    fn validate(&self) -> Result<(), &'static str> {
        self.policy.check().map_err(|_| "rotation policy")?;
        if self.skipped.len() > MAX_SKIPPED_KEYS
            || self.recv.len() > MAX_RECEIVING_DH_CHAINS
            || self.retired_remote.len() > MAX_RETIRED_KEYS
        {
            return Err("bounds");
        }
        if self.recv.iter().any(|r| {
            r.chains.len() > MAX_GENERATIONS_KEPT || r.skipped_seeds.len() > MAX_SKIPPED_SEEDS
        }) {
            return Err("bounds");
        }
        if x25519_public(&self.ratchet_secret) != self.ratchet_pub {
            return Err("ratchet key pair");
        }
        if let Some(s) = &self.send
            && (s.ratchet_pub != self.ratchet_pub
                || (s.generation == 0) != (s.reseed_pub == [0; 32]))
        {
            return Err("sending chain");
        }
        Ok(())
    }
}

/// Finds or creates the chain for `h.generation` in `rec`; returns `(position, created)`.
fn chain_for(rec: &mut RecvDhChain, h: &RatchetHeader) -> Result<(usize, bool), CryptoError> {
    if let Some(p) = rec.chains.iter().position(|c| c.generation == h.generation) {
        return Ok((p, false));
    }
    let seed = if h.generation < rec.next_generation {
        // A generation we skipped earlier (its seed was stored), or one long gone.
        let p = rec
            .skipped_seeds
            .iter()
            .position(|(g, _)| *g == h.generation)
            .ok_or(CryptoError::UnknownChain)?;
        rec.skipped_seeds.remove(p).1
    } else {
        let jump = h.generation - rec.next_generation;
        if jump > MAX_GENERATION_JUMP {
            return Err(CryptoError::TooManySkipped {
                requested: u64::from(jump),
                limit: MAX_GENERATION_JUMP,
            });
        }
        let mut seed = rec.next_seed.clone();
        for g in rec.next_generation..h.generation {
            let next = next_seed(&seed)?;
            if usize::try_from(h.generation - g).unwrap_or(usize::MAX) <= MAX_SKIPPED_SEEDS {
                rec.skipped_seeds.push((g, seed));
            }
            seed = next;
        }
        while rec.skipped_seeds.len() > MAX_SKIPPED_SEEDS {
            rec.skipped_seeds.remove(0);
        }
        rec.next_seed = next_seed(&seed)?;
        rec.next_generation = h
            .generation
            .checked_add(1)
            .ok_or(CryptoError::CounterExhausted)?;
        seed
    };
    let shared = dh(&rec.local_secret, &h.reseed)?;
    let chain_key = reseed_chain(&seed, &shared, h.generation, &h.reseed)?;
    rec.chains.push(RecvChain {
        generation: h.generation,
        chain_key: Some(chain_key),
        next_index: 0,
    });
    while rec.chains.len() > MAX_GENERATIONS_KEPT {
        rec.chains.remove(0);
    }
    Ok((rec.chains.len().saturating_sub(1), true))
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = &self.state;
        f.debug_struct("Session")
            .field("local", &st.local)
            .field("remote", &st.remote)
            .field("epoch", &st.epoch)
            .field("ratchet_pub", &st.ratchet_pub)
            .field("remote_ratchet", &st.remote_ratchet)
            .field("receiving_dh_chains", &st.recv.len())
            .field("skipped_keys", &st.skipped.len())
            .field("pending_init", &st.pending_init.is_some())
            .field("secrets", &"[redacted]")
            .finish()
    }
}

#[derive(Serialize)]
enum SessionRecordRef<'a> {
    V1(&'a State),
}

#[derive(Deserialize)]
enum SessionRecord {
    V1(State),
}

impl Serialize for Session {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        SessionRecordRef::V1(&self.state).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Session {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let SessionRecord::V1(state) = SessionRecord::deserialize(d)?;
        state.validate().map_err(|why| {
            serde::de::Error::custom(format_args!("{STATE_VERSION_NOTE}: invalid {why}"))
        })?;
        Ok(Self { state })
    }
}
