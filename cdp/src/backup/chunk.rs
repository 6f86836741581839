//! Chunk identity (SHA-256 of the plaintext) and the on-disk chunk encoding.
//!
//! SHA-256 rather than BLAKE3: this CPU has SHA-NI, `sha2` uses it, and the
//! digest then runs several times faster than zstd-1 compresses (see
//! `keel bench backup`), so the hash is not the bottleneck; it also matches
//! Proxmox Backup Server's chunk ids and adds no dependency.
//!
//! File format: `KCH1` | codec (0 raw, 1 zstd; | 0x80 when sealed) |
//! plaintext length (u32 LE) | payload. A chunk that zstd cannot shrink is
//! stored raw. A sealed payload is `nonce | AES-256-GCM(payload)` with the
//! header as associated data, and the chunk is named by its keyed digest
//! (see [`crate::backup::key`]).

use sha2::Digest as _;

use crate::backup::key::ChunkKey;

const MAGIC: &[u8; 4] = b"KCH1";
const HEADER: usize = 9;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const SEALED: u8 = 0x80;
/// Largest chunk the format can describe (u32 length) and the repository
/// accepts.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

/// SHA-256 of a chunk's plaintext: the chunk's name in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }

    /// Lowercase hex (64 characters).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::from_hex(&s).ok_or_else(|| serde::de::Error::custom("bad chunk digest"))
    }
}

/// Why a stored chunk could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// Header missing, wrong magic or unknown codec.
    #[error("Chunk header is corrupt")]
    Header,
    /// zstd rejected the payload.
    #[error("Chunk payload does not decompress")]
    Decompress(#[source] std::io::Error),
    /// Decoded length differs from the header's.
    #[error("Chunk length {got} differs from its header's {want}")]
    Length {
        /// From the header.
        want: usize,
        /// Decoded.
        got: usize,
    },
    /// The plaintext does not hash to the chunk's name.
    #[error("Chunk content does not match its digest")]
    DigestMismatch,
    /// Compressing failed.
    #[error("Cannot compress chunk")]
    Compress(#[source] std::io::Error),
    /// The chunk is encrypted and no key was given.
    #[error("Chunk is encrypted: its point's key is needed")]
    KeyRequired,
    /// Decryption failed: another key, or the chunk was altered.
    #[error("Chunk does not decrypt with the given key (wrong key or altered)")]
    Unseal,
    /// Encrypting failed.
    #[error("Cannot encrypt chunk")]
    Seal(#[source] crate::backup::key::KeyError),
}

/// Per-thread compressor (keeps zstd's context across chunks).
pub struct Encoder {
    zstd: zstd::bulk::Compressor<'static>,
}

impl Encoder {
    /// Compressor at zstd `level` (1 is PBS's choice: fast, fair ratio).
    pub fn new(level: i32) -> Result<Self, ChunkError> {
        Ok(Self {
            zstd: zstd::bulk::Compressor::new(level).map_err(ChunkError::Compress)?,
        })
    }

    /// The stored form of `data`, sealed with `key` when given.
    pub fn encode(&mut self, data: &[u8], key: Option<&ChunkKey>) -> Result<Vec<u8>, ChunkError> {
        let len = u32::try_from(data.len()).map_err(|_| ChunkError::Header)?;
        let packed = self.zstd.compress(data).map_err(ChunkError::Compress)?;
        let (codec, payload) = if packed.len() < data.len() {
            (CODEC_ZSTD, &packed[..])
        } else {
            (CODEC_RAW, data)
        };
        let codec = if key.is_some() { codec | SEALED } else { codec };
        let mut out = Vec::with_capacity(HEADER + payload.len() + 32);
        out.extend_from_slice(MAGIC);
        out.push(codec);
        out.extend_from_slice(&len.to_le_bytes());
        match key {
            Some(key) => {
                let sealed = key.seal(&out, payload).map_err(ChunkError::Seal)?;
                out.extend_from_slice(&sealed);
            }
            None => out.extend_from_slice(payload),
        }
        Ok(out)
    }
}

/// Plaintext of a stored chunk, checked against `digest` (the keyed digest
/// when `key` is given).
pub fn decode(
    stored: &[u8],
    digest: &Digest,
    key: Option<&ChunkKey>,
) -> Result<Vec<u8>, ChunkError> {
    if stored.len() < HEADER || &stored[..4] != MAGIC {
        return Err(ChunkError::Header);
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&stored[5..HEADER]);
    let want = usize::try_from(u32::from_le_bytes(len)).map_err(|_| ChunkError::Header)?;
    let codec = stored[4];
    let opened;
    let payload = if codec & SEALED != 0 {
        let key = key.ok_or(ChunkError::KeyRequired)?;
        opened = key
            .open(&stored[..HEADER], &stored[HEADER..])
            .ok_or(ChunkError::Unseal)?;
        &opened[..]
    } else {
        &stored[HEADER..]
    };
    let plain = match codec & !SEALED {
        CODEC_RAW => payload.to_vec(),
        CODEC_ZSTD => zstd::bulk::decompress(payload, want).map_err(ChunkError::Decompress)?,
        _ => return Err(ChunkError::Header),
    };
    if plain.len() != want {
        return Err(ChunkError::Length {
            want,
            got: plain.len(),
        });
    }
    let named = match key {
        Some(key) => key.digest(&plain),
        None => Digest::of(&plain),
    };
    if named != *digest {
        return Err(ChunkError::DigestMismatch);
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_compressible_and_random() {
        let mut enc = Encoder::new(1).unwrap();
        let text = b"keel backup ".repeat(1000);
        let stored = enc.encode(&text, None).unwrap();
        assert!(stored.len() < text.len() / 4, "compressed");
        assert_eq!(decode(&stored, &Digest::of(&text), None).unwrap(), text);

        // incompressible data is stored raw
        let mut x = 0x1234_5678_u32;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_le_bytes()[0]
            })
            .collect();
        let stored = enc.encode(&random, None).unwrap();
        assert_eq!(stored[4], CODEC_RAW);
        assert_eq!(decode(&stored, &Digest::of(&random), None).unwrap(), random);
    }

    #[test]
    fn corruption_is_detected() {
        let mut enc = Encoder::new(1).unwrap();
        let data = b"abcdefgh".repeat(4096);
        let d = Digest::of(&data);
        let stored = enc.encode(&data, None).unwrap();
        for pos in [0, 4, 6, HEADER + 3, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[pos] ^= 0x40;
            assert!(decode(&bad, &d, None).is_err(), "flip at {pos} detected");
        }
        assert!(
            decode(&stored[..stored.len() - 2], &d, None).is_err(),
            "truncated"
        );
        assert!(decode(&stored[..3], &d, None).is_err());
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
    }

    #[test]
    fn sealed_chunks_need_their_key_and_hide_their_content() {
        let key = ChunkKey::from_hex(&"ab".repeat(32)).unwrap();
        let other = ChunkKey::from_hex(&"cd".repeat(32)).unwrap();
        let mut enc = Encoder::new(1).unwrap();
        let data = b"KEEL-SECRET-PAYLOAD ".repeat(2000);
        let d = key.digest(&data);
        let stored = enc.encode(&data, Some(&key)).unwrap();
        assert!(stored.len() < data.len() / 4, "compressed before sealing");
        assert!(!stored.windows(11).any(|w| w == b"KEEL-SECRET"));
        assert_eq!(decode(&stored, &d, Some(&key)).unwrap(), data);
        assert!(matches!(
            decode(&stored, &d, None),
            Err(ChunkError::KeyRequired)
        ));
        assert!(matches!(
            decode(&stored, &d, Some(&other)),
            Err(ChunkError::Unseal)
        ));
        for pos in [4, 6, HEADER + 1, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[pos] ^= 0x01;
            assert!(
                decode(&bad, &d, Some(&key)).is_err(),
                "flip at {pos} detected"
            );
        }
    }
}
