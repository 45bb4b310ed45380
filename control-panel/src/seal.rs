//! Sealing states in transit: a device model's saved state moving to
//! another server, a VM's snapshot moving to another client platform. The
//! stores seal what `put_state` is given and open what `take_state` takes,
//! so callers never see a sealed blob and a blob that was altered, sealed
//! by another cluster, or left too long is refused with the reason.
//!
//! **Construction:** ChaCha20-Poly1305 (the `chacha20poly1305` crate, an
//! IETF AEAD) under a 256-bit key derived from the cluster key with
//! BLAKE3's `derive_key` and a context of its own, a random 96-bit nonce
//! per blob (random nonces are safe for far more blobs than a cluster
//! moves), the state's name (`device/7`, `vm/100`) and the blob's header as
//! associated data (so a blob cannot be replayed under another name), and
//! an expiry time inside the encrypted part ([`STATE_TTL`] after sealing by
//! default). The header carries a short fingerprint of the cluster key
//! (derived with another context), so "sealed under another key" and
//! "altered" are told apart.
//!
//! ```text
//! "DMFS" | version 1 | key fingerprint (8) | nonce (12) | ChaCha20(expires_unix u64 LE | state) | Poly1305 tag (16)
//! ```
//!
//! Pure functions of their inputs: time and randomness are passed in.

use std::time::Duration;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use dmfabric_wire::auth::Secret;

/// How long a state in transit may wait for its receiver by default.
pub const STATE_TTL: Duration = Duration::from_secs(10 * 60);

const MAGIC: &[u8; 4] = b"DMFS";
const VERSION: u8 = 1;
const FINGERPRINT_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Magic, version, fingerprint, nonce.
const HEADER_LEN: usize = 4 + 1 + FINGERPRINT_LEN + NONCE_LEN;
/// The expiry time at the start of the encrypted part.
const EXPIRY_LEN: usize = 8;
/// The smallest blob: a sealed empty state.
pub const MIN_SEALED_LEN: usize = HEADER_LEN + EXPIRY_LEN + TAG_LEN;

/// KDF contexts (BLAKE3 asks for an application, a date and a purpose).
const KEY_CONTEXT: &str = "dmfabric 2026-12-01 state in transit sealing key v1";
const FINGERPRINT_CONTEXT: &str = "dmfabric 2026-12-01 cluster key fingerprint v1";

/// Why a blob is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("it is not a sealed state (too short or an unknown format): refused")]
    NotSealed,
    #[error("it was sealed under another cluster key (a store shared by two clusters?): refused")]
    WrongKey,
    #[error("it was altered or corrupted in transit (its authentication tag does not match): refused")]
    Tampered,
    #[error("it expired {ago} s ago (a state waits for its receiver {ttl} s): refused; send it again")]
    Expired { ago: u64, ttl: u64 },
    #[error("A state of {0} bytes is more than one nonce may seal")]
    TooLarge(usize),
    #[error("No randomness from the operating system for a nonce: {0}")]
    Random(String),
}

/// The key states are sealed with, derived from the cluster key.
#[derive(Clone)]
pub struct StateKey {
    aead: ChaCha20Poly1305,
    fingerprint: [u8; FINGERPRINT_LEN],
}

/// A store's state key, derived once from the cluster key it reads and
/// kept for the store's life.
#[derive(Debug, Default)]
pub(crate) struct StateKeyCache(std::sync::Mutex<Option<StateKey>>);

impl StateKeyCache {
    /// The kept key, or the one `cluster` reads (kept if it reads).
    pub(crate) fn get<E>(&self, cluster: impl FnOnce() -> Result<Secret, E>) -> Result<StateKey, E> {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = cached.as_ref() {
            return Ok(k.clone());
        }
        let k = StateKey::new(&cluster()?);
        *cached = Some(k.clone());
        Ok(k)
    }
}

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKey(..)")
    }
}

impl StateKey {
    pub fn new(cluster: &Secret) -> StateKey {
        let key = blake3::derive_key(KEY_CONTEXT, cluster.as_bytes());
        let print = blake3::derive_key(FINGERPRINT_CONTEXT, cluster.as_bytes());
        let mut fingerprint = [0u8; FINGERPRINT_LEN];
        fingerprint.copy_from_slice(&print[..FINGERPRINT_LEN]);
        StateKey { aead: ChaCha20Poly1305::new(&key.into()), fingerprint }
    }

    /// Seal `state`, named `name`, to expire at `expires_unix`, with a
    /// fresh random nonce.
    pub fn seal(&self, name: &str, state: &[u8], expires_unix: u64) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| SealError::Random(e.to_string()))?;
        self.seal_with(name, state, expires_unix, nonce)
    }

    /// [`StateKey::seal`] with a given nonce (never reuse one).
    pub fn seal_with(
        &self,
        name: &str,
        state: &[u8],
        expires_unix: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Vec<u8>, SealError> {
        let mut blob = Vec::with_capacity(MIN_SEALED_LEN + state.len());
        blob.extend_from_slice(MAGIC);
        blob.push(VERSION);
        blob.extend_from_slice(&self.fingerprint);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&expires_unix.to_le_bytes());
        blob.extend_from_slice(state);
        let (header, body) = blob.split_at_mut(HEADER_LEN);
        let aad = associated(header, name);
        // Fails only past ChaCha20's 256 GiB per nonce.
        let tag = self
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, body)
            .map_err(|_| SealError::TooLarge(state.len()))?;
        blob.extend_from_slice(&tag);
        Ok(blob)
    }

    /// Open a blob sealed under `name`, at `now_unix`: the state, or why
    /// it is refused.
    pub fn open(&self, name: &str, mut blob: Vec<u8>, now_unix: u64) -> Result<Vec<u8>, SealError> {
        if blob.len() < MIN_SEALED_LEN || &blob[..4] != MAGIC || blob[4] != VERSION {
            return Err(SealError::NotSealed);
        }
        if blob[5..5 + FINGERPRINT_LEN] != self.fingerprint {
            return Err(SealError::WrongKey);
        }
        let tag_at = blob.len() - TAG_LEN;
        let tag = *Tag::from_slice(&blob[tag_at..]);
        blob.truncate(tag_at);
        let (header, body) = blob.split_at_mut(HEADER_LEN);
        let aad = associated(header, name);
        let nonce = *Nonce::from_slice(&header[5 + FINGERPRINT_LEN..]);
        self.aead.decrypt_in_place_detached(&nonce, &aad, body, &tag).map_err(|_| SealError::Tampered)?;
        let mut expiry = [0u8; EXPIRY_LEN];
        expiry.copy_from_slice(&body[..EXPIRY_LEN]);
        let expires = u64::from_le_bytes(expiry);
        if now_unix > expires {
            return Err(SealError::Expired { ago: now_unix - expires, ttl: STATE_TTL.as_secs() });
        }
        blob.drain(..HEADER_LEN + EXPIRY_LEN);
        Ok(blob)
    }
}

/// The associated data: the header, then the state's name.
fn associated(header: &[u8], name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + name.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(name.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_wire::auth::SECRET_LEN;

    fn key(b: u8) -> StateKey {
        StateKey::new(&Secret::from_bytes([b; SECRET_LEN]))
    }

    #[test]
    fn a_sealed_state_opens_once_and_hides_its_bytes() {
        let k = key(1);
        let state: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let blob = k.seal("vm/100", &state, 1000).unwrap();
        assert_eq!(blob.len(), MIN_SEALED_LEN + state.len());
        assert!(blob.windows(32).all(|w| w != &state[..32]), "encrypted");
        assert_eq!(k.open("vm/100", blob.clone(), 1000).unwrap(), state);
        // Random nonces: the same state seals differently.
        assert_ne!(k.seal("vm/100", &state, 1000).unwrap(), blob);
        assert_eq!(k.open("x", k.seal("x", &[], 5).unwrap(), 0).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn tampered_renamed_wrong_key_and_expired_blobs_are_refused_by_name() {
        let k = key(1);
        let blob = k.seal_with("device/7", b"uart state", 1000, [9; NONCE_LEN]).unwrap();
        for at in [HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + EXPIRY_LEN, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[at] ^= 1;
            assert_eq!(k.open("device/7", bad, 0), Err(SealError::Tampered), "byte {at}");
        }
        assert_eq!(k.open("device/8", blob.clone(), 0), Err(SealError::Tampered), "another name");
        assert_eq!(key(2).open("device/7", blob.clone(), 0), Err(SealError::WrongKey));
        assert_eq!(
            k.open("device/7", blob.clone(), 1061).unwrap_err().to_string(),
            "it expired 61 s ago (a state waits for its receiver 600 s): refused; send it again"
        );
        assert!(k.open("device/7", blob.clone(), 1000).is_ok(), "good until its expiry");
        assert_eq!(k.open("device/7", blob[..MIN_SEALED_LEN - 1].to_vec(), 0), Err(SealError::NotSealed));
        assert_eq!(k.open("device/7", b"{\"plain\":1}".to_vec(), 0), Err(SealError::NotSealed));
        let mut truncated = blob.clone();
        truncated.truncate(blob.len() - 3);
        assert_eq!(k.open("device/7", truncated, 0), Err(SealError::Tampered));
        assert_eq!(format!("{k:?}"), "StateKey(..)");
    }
}
