//! Encryption keys of backup points (one per VDC in the control plane).
//!
//! A point taken with a key stores every chunk sealed with AES-256-GCM
//! (random 96-bit nonce per chunk, the chunk header as associated data),
//! and names each chunk by HMAC-SHA256 of its plaintext under a key derived
//! from the same secret, never by its bare SHA-256: a chunk's name then
//! says nothing about its content to whoever reads the repository, and
//! chunks of different keys never deduplicate into each other (within one
//! key they still do). This is Proxmox Backup Server's scheme.
//!
//! The 32-byte secret is the key; the cipher and MAC keys are derived
//! from it with HMAC-SHA256 under fixed labels, and so is the fingerprint
//! that points record to say which key they need.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};

use crate::backup::chunk::Digest;

type HmacSha256 = Hmac<sha2::Sha256>;

/// Bytes of a key's secret.
pub const KEY_LEN: usize = 32;
/// Bytes of the nonce stored before each sealed chunk.
pub const NONCE_LEN: usize = 12;

/// Why a key could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not 64 hex characters.
    #[error("A backup key is 64 hex characters (32 bytes)")]
    Format,
    /// The system's random source failed.
    #[error("Cannot draw random bytes")]
    Random(#[source] getrandom::Error),
}

/// A point encryption key.
pub struct ChunkKey {
    mac: [u8; 32],
    cipher: Aes256Gcm,
    fingerprint: String,
}

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("ChunkKey")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

fn derive(secret: &[u8; KEY_LEN], label: &[u8]) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label);
    mac.finalize().into_bytes().into()
}

impl ChunkKey {
    /// The key with this secret.
    pub fn from_secret(secret: &[u8; KEY_LEN]) -> Self {
        let enc = derive(secret, b"keel backup chunk cipher");
        Self {
            mac: derive(secret, b"keel backup chunk id"),
            cipher: Aes256Gcm::new(&enc.into()),
            fingerprint: hex::encode(&derive(secret, b"keel backup key fingerprint")[..8]),
        }
    }

    /// A key from its hex form (as [`ChunkKey::generate_hex`] makes).
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let mut secret = [0u8; KEY_LEN];
        hex::decode_to_slice(s.trim(), &mut secret).map_err(|_| KeyError::Format)?;
        Ok(Self::from_secret(&secret))
    }

    /// A new random secret, in hex.
    pub fn generate_hex() -> Result<String, KeyError> {
        let mut secret = [0u8; KEY_LEN];
        getrandom::getrandom(&mut secret).map_err(KeyError::Random)?;
        Ok(hex::encode(secret))
    }

    /// Which key this is (16 hex characters; safe to show and store).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The name of a chunk with this plaintext under this key.
    pub fn digest(&self, data: &[u8]) -> Digest {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.mac).expect("any key length");
        mac.update(data);
        Digest(mac.finalize().into_bytes().into())
    }

    /// `nonce | ciphertext+tag` of `data`, bound to `header`.
    pub(crate) fn seal(&self, header: &[u8], data: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(KeyError::Random)?;
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: data,
                    aad: header,
                },
            )
            // AES-GCM fails only on inputs beyond 64 GiB; chunks are ≤ 64 MiB.
            .map_err(|_| KeyError::Format)?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The plaintext of [`ChunkKey::seal`]'s output; `None` when it was
    /// sealed with another key or altered (header included).
    pub(crate) fn open(&self, header: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: header,
                },
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_deterministic_from_their_secret_and_distinct() {
        let a = ChunkKey::from_hex(&"11".repeat(32)).unwrap();
        let a2 = ChunkKey::from_hex(&"11".repeat(32)).unwrap();
        let b = ChunkKey::from_hex(&"22".repeat(32)).unwrap();
        assert_eq!(a.fingerprint(), a2.fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 16);
        assert_eq!(a.digest(b"x"), a2.digest(b"x"));
        assert_ne!(a.digest(b"x"), b.digest(b"x"));
        assert_ne!(a.digest(b"x"), Digest::of(b"x"), "keyed, not the bare hash");
        assert!(!format!("{a:?}").contains("1111"), "Debug hides the secret");
        assert!(ChunkKey::from_hex("abc").is_err());
        let g = ChunkKey::generate_hex().unwrap();
        assert_eq!(g.len(), 64);
        assert_ne!(g, ChunkKey::generate_hex().unwrap());
    }

    #[test]
    fn sealed_data_opens_only_with_its_key_and_header() {
        let a = ChunkKey::from_hex(&"11".repeat(32)).unwrap();
        let b = ChunkKey::from_hex(&"22".repeat(32)).unwrap();
        let sealed = a.seal(b"head", b"secret data").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(a.open(b"head", &sealed).unwrap(), b"secret data");
        assert!(a.open(b"HEAD", &sealed).is_none(), "header bound");
        assert!(b.open(b"head", &sealed).is_none(), "other key");
        let mut flipped = sealed.clone();
        flipped[NONCE_LEN + 2] ^= 1;
        assert!(a.open(b"head", &flipped).is_none(), "tampered");
        assert_ne!(
            sealed,
            a.seal(b"head", b"secret data").unwrap(),
            "fresh nonce"
        );
    }
}
