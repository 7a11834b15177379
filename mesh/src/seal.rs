//! Sealed datagrams: authenticated encryption of whole datagrams under a cluster key.
//!
//! A sealed datagram wraps a complete plaintext datagram (header, checksum and body):
//!
//! ```text
//! 0      2         3          4       5                  13                  37
//! | "SB" | version | kind = 9 | flags | cluster id (u64)  | nonce (24 bytes)  | ciphertext ... | tag (16) |
//! ```
//!
//! The cipher is XChaCha20-Poly1305. Everything before the ciphertext is associated
//! data, so the cluster id and header cannot be changed unnoticed. The nonce is a
//! random 16-byte prefix drawn when the node starts, then a 64-bit counter: a prefix
//! and counter pair is never used twice, whichever key seals, so no nonce repeats for a
//! key (two starts drawing the same 128-bit prefix is beyond reach). The counter also
//! serves replay protection: a receiver remembers, per sender prefix, the highest
//! counter it opened and which of the 1,024 below it, and refuses any it has seen or
//! that is older than that window.
//!
//! A keyring holds up to [`MAX_KEYS`] keys: the primary seals, every key opens (the
//! primary is tried first). Rotation without downtime: install the new key on every
//! node, then make it primary on every node, then remove the old one.

use std::collections::BTreeMap;
use std::fmt;

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};

use crate::wire::{ClusterId, MAGIC, VERSION};

/// The kind byte of a sealed datagram (plaintext kinds are 1 to 8).
pub(crate) const SEALED_KIND: u8 = 9;
/// Bytes before the ciphertext: the header and the nonce.
const HEAD_LEN: usize = 13 + NONCE_LEN;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes sealing adds to a plaintext datagram.
pub const SEAL_OVERHEAD: usize = HEAD_LEN + TAG_LEN;
/// Keys a keyring holds at most.
pub const MAX_KEYS: usize = 16;
/// Sender prefixes whose replay windows are kept; past this, the one heard from
/// longest ago is forgotten.
const MAX_SENDERS: usize = 4096;
/// Counters below a sender's highest that are still told apart.
const WINDOW: u64 = 1024;

/// A 256-bit cluster key. Its `Debug` output shows the fingerprint, never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; 32]);

impl ClusterKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> ClusterKey {
        ClusterKey(bytes)
    }

    /// A key from 64 hexadecimal digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<ClusterKey, KeyError> {
        let text = text.trim();
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KeyError::BadKey);
        }
        let mut bytes = [0; 32];
        for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| KeyError::BadKey)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| KeyError::BadKey)?;
        }
        Ok(ClusterKey(bytes))
    }

    /// The key as 64 lowercase hexadecimal digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A short name for the key that does not reveal it: the first 8 bytes of its
    /// authentication tag over nothing under an all-zero nonce, in hex.
    pub fn fingerprint(&self) -> String {
        let cipher = XChaCha20Poly1305::new(&Key::from(self.0));
        let tag = cipher
            .encrypt_inout_detached(&XNonce::default(), b"syncbus key", (&mut [][..]).into())
            .unwrap_or_default();
        tag[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({})", self.fingerprint())
    }
}

/// How a node with keys treats plaintext, so a running cluster can move to sealed
/// datagrams without a split: every node goes to `Open` (with the same key), then
/// every node to `Seal`, then every node to `Require`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SealMode {
    /// Sends plaintext; opens sealed datagrams and accepts plaintext.
    Open,
    /// Sends sealed datagrams; still accepts plaintext.
    Seal,
    /// Sends sealed datagrams and drops plaintext, counting it. The default.
    #[default]
    Require,
}

impl SealMode {
    /// Whether outgoing datagrams are sealed.
    pub fn seals(self) -> bool {
        self != SealMode::Open
    }
}

/// The keys and mode a node starts with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encryption {
    /// Installed keys; the first is the primary, which seals. At least one, at most
    /// [`MAX_KEYS`].
    pub keys: Vec<ClusterKey>,
    /// Default [`SealMode::Require`].
    pub mode: SealMode,
}

impl Encryption {
    /// Sealing with `key`, plaintext refused.
    pub fn new(key: ClusterKey) -> Encryption {
        Encryption {
            keys: vec![key],
            mode: SealMode::Require,
        }
    }
}

/// Why a keyring operation was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The node started without encryption; keys cannot be added to it running,
    /// because its datagrams have no room for the seal.
    #[error("this node started without encryption; restart it with a key")]
    NoEncryption,
    /// Not 64 hexadecimal digits.
    #[error("a cluster key is 64 hexadecimal digits (32 bytes)")]
    BadKey,
    /// The key is not installed.
    #[error("key {0} is not installed")]
    NotInstalled(String),
    /// The primary key cannot be removed.
    #[error("key {0} is the primary key; make another key primary first")]
    Primary(String),
    /// The keyring is full.
    #[error("a keyring holds at most {MAX_KEYS} keys")]
    Full,
    /// No keys given.
    #[error("encryption needs at least one key")]
    Empty,
}

/// Why a sealed datagram was not opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Too short to be sealed.
    Truncated,
    /// No installed key opens it: a wrong key, a forgery, or damage on the way.
    Unauthenticated,
    /// Opened before, or older than the replay window.
    Replayed,
}

/// Whether a datagram is sealed, judging by its header alone.
pub(crate) fn is_sealed(datagram: &[u8]) -> bool {
    datagram.len() > 4
        && datagram[0..2] == MAGIC
        && datagram[2] == VERSION
        && datagram[3] == SEALED_KIND
}

/// The cluster id of a sealed datagram's header.
pub(crate) fn sealed_cluster(datagram: &[u8]) -> Option<ClusterId> {
    let bytes: [u8; 8] = datagram.get(5..13)?.try_into().ok()?;
    Some(ClusterId(u64::from_be_bytes(bytes)))
}

/// Seals `datagram` as a node of `cluster` would with `key`, the nonce made of `prefix`
/// and `counter`: for tools and tests that build sealed datagrams by hand (a node seals
/// its own). A (prefix, counter) pair must never be used twice under one key.
pub fn seal_datagram(
    key: &ClusterKey,
    cluster: ClusterId,
    prefix: [u8; 16],
    counter: u64,
    datagram: &[u8],
) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(&Key::from(key.0));
    seal_with(&cipher, cluster, prefix, counter, datagram)
}

fn seal_with(
    cipher: &XChaCha20Poly1305,
    cluster: ClusterId,
    prefix: [u8; 16],
    counter: u64,
    datagram: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(datagram.len() + SEAL_OVERHEAD);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(SEALED_KIND);
    out.push(0);
    out.extend_from_slice(&cluster.0.to_be_bytes());
    out.extend_from_slice(&prefix);
    out.extend_from_slice(&counter.to_be_bytes());
    out.extend_from_slice(datagram);
    let (head, body) = out.split_at_mut(HEAD_LEN);
    let nonce = XNonce::try_from(&head[13..]).unwrap_or_default();
    // Encryption fails only for messages over 256 GiB.
    let tag = cipher
        .encrypt_inout_detached(&nonce, head, body.into())
        .unwrap_or_default();
    out.extend_from_slice(&tag);
    out
}

/// A sealed datagram, opened.
pub(crate) struct Opened {
    /// The plaintext datagram inside.
    pub(crate) plain: Vec<u8>,
    sender: [u8; 16],
    counter: u64,
}

/// A node's keyring, its nonce counter and the replay windows of its senders.
pub(crate) struct Sealer {
    /// The primary first.
    keys: Vec<(ClusterKey, XChaCha20Poly1305)>,
    mode: SealMode,
    prefix: [u8; 16],
    counter: u64,
    senders: BTreeMap<[u8; 16], ReplayWindow>,
    /// Counts opened datagrams; orders senders by how recently they were heard.
    opened: u64,
}

impl Sealer {
    pub(crate) fn new(encryption: &Encryption, prefix: [u8; 16]) -> Result<Sealer, KeyError> {
        if encryption.keys.is_empty() {
            return Err(KeyError::Empty);
        }
        if encryption.keys.len() > MAX_KEYS {
            return Err(KeyError::Full);
        }
        let mut sealer = Sealer {
            keys: Vec::new(),
            mode: encryption.mode,
            prefix,
            counter: 0,
            senders: BTreeMap::new(),
            opened: 0,
        };
        for key in &encryption.keys {
            sealer.install(key.clone())?;
        }
        Ok(sealer)
    }

    pub(crate) fn mode(&self) -> SealMode {
        self.mode
    }

    pub(crate) fn set_mode(&mut self, mode: SealMode) {
        self.mode = mode;
    }

    /// Fingerprints of the installed keys, the primary first.
    pub(crate) fn fingerprints(&self) -> Vec<String> {
        self.keys.iter().map(|(key, _)| key.fingerprint()).collect()
    }

    /// Installs a key that opens datagrams; the first installed is the primary.
    pub(crate) fn install(&mut self, key: ClusterKey) -> Result<(), KeyError> {
        if self.keys.iter().any(|(k, _)| *k == key) {
            return Ok(());
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(KeyError::Full);
        }
        let cipher = XChaCha20Poly1305::new(&Key::from(key.0));
        self.keys.push((key, cipher));
        Ok(())
    }

    /// Makes an installed key the primary.
    pub(crate) fn make_primary(&mut self, key: &ClusterKey) -> Result<(), KeyError> {
        let at = self.position(key)?;
        let entry = self.keys.remove(at);
        self.keys.insert(0, entry);
        Ok(())
    }

    /// Removes an installed key other than the primary.
    pub(crate) fn remove(&mut self, key: &ClusterKey) -> Result<(), KeyError> {
        match self.position(key)? {
            0 => Err(KeyError::Primary(key.fingerprint())),
            at => {
                self.keys.remove(at);
                Ok(())
            }
        }
    }

    fn position(&self, key: &ClusterKey) -> Result<usize, KeyError> {
        self.keys
            .iter()
            .position(|(k, _)| k == key)
            .ok_or_else(|| KeyError::NotInstalled(key.fingerprint()))
    }

    /// Seals a plaintext datagram of `cluster` under the primary key.
    pub(crate) fn seal(&mut self, cluster: ClusterId, datagram: &[u8]) -> Vec<u8> {
        self.counter += 1;
        let (_, cipher) = &self.keys[0];
        seal_with(cipher, cluster, self.prefix, self.counter, datagram)
    }

    /// Opens a sealed datagram: the plaintext datagram inside, and who sealed it with
    /// which counter, for [`accept`](Self::accept) once the caller has checked the
    /// datagram is one it takes (so a datagram refused for its kind never uses up its
    /// counter).
    pub(crate) fn open(&mut self, datagram: &[u8]) -> Result<Opened, OpenError> {
        if datagram.len() < SEAL_OVERHEAD {
            return Err(OpenError::Truncated);
        }
        let (head, rest) = datagram.split_at(HEAD_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce = XNonce::try_from(&head[13..]).map_err(|_| OpenError::Truncated)?;
        let tag = Tag::try_from(tag).map_err(|_| OpenError::Truncated)?;
        let mut plain = ciphertext.to_vec();
        let opened = self.keys.iter().any(|(_, cipher)| {
            // A failed attempt leaves the buffer as it was.
            cipher
                .decrypt_inout_detached(&nonce, head, plain.as_mut_slice().into(), &tag)
                .is_ok()
        });
        if !opened {
            return Err(OpenError::Unauthenticated);
        }
        let mut sender = [0; 16];
        sender.copy_from_slice(&head[13..29]);
        let mut counter = [0; 8];
        counter.copy_from_slice(&head[29..37]);
        Ok(Opened {
            plain,
            sender,
            counter: u64::from_be_bytes(counter),
        })
    }

    /// Accepts an opened datagram's counter once; called only for authentic datagrams,
    /// so only key holders can make this node remember senders.
    pub(crate) fn accept(&mut self, opened: &Opened) -> Result<(), OpenError> {
        let (sender, counter) = (opened.sender, opened.counter);
        self.opened += 1;
        if self.senders.len() >= MAX_SENDERS && !self.senders.contains_key(&sender) {
            let stalest = self
                .senders
                .iter()
                .min_by_key(|(_, window)| window.heard)
                .map(|(prefix, _)| *prefix);
            if let Some(prefix) = stalest {
                self.senders.remove(&prefix);
            }
        }
        let heard = self.opened;
        let window = self.senders.entry(sender).or_insert(ReplayWindow {
            top: counter,
            seen: [0; (WINDOW / 64) as usize],
            heard,
        });
        window.heard = heard;
        window.accept(counter)
    }
}

/// The highest counter opened from one sender, and which of the `WINDOW` below it.
struct ReplayWindow {
    top: u64,
    /// Bit `i` set: counter `top - i` was opened.
    seen: [u64; (WINDOW / 64) as usize],
    heard: u64,
}

impl ReplayWindow {
    fn accept(&mut self, counter: u64) -> Result<(), OpenError> {
        if counter > self.top {
            self.shift(counter - self.top);
            self.top = counter;
        } else if self.top - counter >= WINDOW {
            return Err(OpenError::Replayed);
        }
        let age = (self.top - counter) as usize;
        let (word, bit) = (age / 64, age % 64);
        if self.seen[word] & (1 << bit) != 0 {
            return Err(OpenError::Replayed);
        }
        self.seen[word] |= 1 << bit;
        Ok(())
    }

    /// Ages every remembered counter by `by`.
    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.seen = [0; (WINDOW / 64) as usize];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        for i in (0..self.seen.len()).rev() {
            let from = i.checked_sub(words);
            let high = from.map_or(0, |j| self.seen[j] << bits);
            let low = match from.and_then(|j| j.checked_sub(1)) {
                Some(k) if bits > 0 => self.seen[k] >> (64 - bits),
                _ => 0,
            };
            self.seen[i] = high | low;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(key: u8, prefix: u8) -> Sealer {
        let encryption = Encryption::new(ClusterKey::from_bytes([key; 32]));
        Sealer::new(&encryption, [prefix; 16]).unwrap()
    }

    const CLUSTER: ClusterId = ClusterId(7);

    #[test]
    fn a_sealed_datagram_opens_once_with_the_key_and_never_without() {
        let (mut alice, mut bob, mut eve) = (sealer(1, 1), sealer(1, 2), sealer(2, 3));
        let sealed = alice.seal(CLUSTER, b"hello, cluster");
        assert!(is_sealed(&sealed));
        assert_eq!(sealed.len(), 14 + SEAL_OVERHEAD);
        let opened = bob.open(&sealed).unwrap();
        assert_eq!(opened.plain, b"hello, cluster");
        assert_eq!(bob.accept(&opened), Ok(()));
        let again = bob.open(&sealed).unwrap();
        assert_eq!(bob.accept(&again), Err(OpenError::Replayed));
        assert_eq!(eve.open(&sealed).err(), Some(OpenError::Unauthenticated));
        // Any change to header, nonce, ciphertext or tag is caught.
        for at in [3, 6, 20, 40, sealed.len() - 1] {
            let mut bent = alice.seal(CLUSTER, b"hello, cluster");
            bent[at] ^= 1;
            assert!(bob.open(&bent).is_err(), "byte {at}");
        }
        assert_eq!(bob.open(&sealed[..20]).err(), Some(OpenError::Truncated));
    }

    #[test]
    fn rotation_opens_with_every_installed_key_and_seals_with_the_primary() {
        let (old, new) = (
            ClusterKey::from_bytes([1; 32]),
            ClusterKey::from_bytes([2; 32]),
        );
        let (mut alice, mut bob) = (sealer(1, 1), sealer(1, 2));
        bob.install(new.clone()).unwrap();
        alice.install(new.clone()).unwrap();
        alice.make_primary(&new).unwrap();
        let under_new = alice.seal(CLUSTER, b"x");
        assert!(bob.open(&under_new).is_ok());
        assert_eq!(
            alice.remove(&new),
            Err(KeyError::Primary(new.fingerprint()))
        );
        alice.remove(&old).unwrap();
        assert_eq!(alice.fingerprints(), vec![new.fingerprint()]);
        let stranger = ClusterKey::from_bytes([9; 32]);
        assert!(matches!(
            alice.make_primary(&stranger),
            Err(KeyError::NotInstalled(_))
        ));
    }

    #[test]
    fn the_replay_window_accepts_reordering_and_refuses_repeats_and_the_too_old() {
        let mut window = ReplayWindow {
            top: 100,
            seen: [0; (WINDOW / 64) as usize],
            heard: 0,
        };
        assert_eq!(window.accept(100), Ok(()));
        assert_eq!(window.accept(100), Err(OpenError::Replayed));
        for counter in [98, 99, 170, 101, 300, 1200] {
            assert_eq!(window.accept(counter), Ok(()), "{counter}");
        }
        for counter in [98, 170, 300, 1200, 1200 - WINDOW, 5] {
            assert_eq!(
                window.accept(counter),
                Err(OpenError::Replayed),
                "{counter}"
            );
        }
        assert_eq!(window.accept(1199), Ok(()));
        assert_eq!(window.accept(1200 - WINDOW + 1), Ok(()));
    }

    #[test]
    fn keys_read_from_hex_and_never_show_in_debug() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let key = ClusterKey::from_hex(hex).unwrap();
        assert_eq!(key.to_hex(), hex);
        assert!(!format!("{key:?}").contains("0011"));
        assert_eq!(key.fingerprint().len(), 16);
        let signed = format!("+{}", &hex[1..]);
        for bad in ["", "00", &hex[1..], &format!("{}zz", &hex[2..]), &signed] {
            assert_eq!(ClusterKey::from_hex(bad), Err(KeyError::BadKey), "{bad:?}");
        }
    }
}
