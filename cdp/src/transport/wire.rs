//! Frames between source and replica: `type u8 | length u32 | payload`.
//!
//! - `Hello` (replica → source, once after the handshake): group id,
//!   source site id, last applied sequence number and its checksum; the
//!   source continues from the next segment (resumable transfer).
//! - `Segment` (source → replica): sequence number, flags (bit 0: zstd),
//!   the segment file.
//! - `Ack` (replica → source): the segment is fsynced and applied.
//! - `Refuse` (replica → source): why a segment (or a digest request) was
//!   refused; the replica closes the connection.
//! - `DigestRequest` (source → replica, only between segments): the
//!   SHA-256 of `count` chunks of one replica disk, for a delta resync
//!   ([`super::digest`]).
//! - `Digests` (replica → source): one entry per requested chunk, absent
//!   where the replica disk does not hold the whole chunk.

use std::io::{Read, Write};

/// Largest frame accepted (a segment is sealed at 64 MiB by default).
pub const MAX_FRAME: u32 = 512 << 20;
/// `Segment` flag: the payload is zstd-compressed.
pub const FLAG_ZSTD: u8 = 1;
/// Version of the digest exchange (SHA-256 of the chunk bytes).
pub const DIGEST_VERSION: u8 = 1;
/// Most chunks in one digest request (bounds the answer to 33 KiB).
pub const MAX_DIGEST_BATCH: u32 = 1024;
/// Length of one digest.
pub const DIGEST_LEN: usize = 32;

/// Errors of reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed.
    #[error("Connection failed")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not a valid frame.
    #[error("Malformed frame: {0}")]
    Malformed(&'static str),
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See the module docs.
    Hello {
        /// Group id.
        group_id: u64,
        /// Source site id the replica expects.
        site_id: u64,
        /// Last applied segment.
        last_seq: u64,
        /// Its checksum.
        last_checksum: u32,
    },
    /// See the module docs.
    Segment {
        /// Sequence number.
        seq: u64,
        /// Flags.
        flags: u8,
        /// Segment bytes (compressed when flagged).
        bytes: Vec<u8>,
    },
    /// See the module docs.
    Ack {
        /// Applied segment.
        seq: u64,
    },
    /// See the module docs.
    Refuse {
        /// Reason.
        reason: String,
    },
    /// See the module docs.
    DigestRequest {
        /// [`DIGEST_VERSION`].
        version: u8,
        /// Disk id.
        disk: u16,
        /// Chunk size (the source journal's).
        chunk_bytes: u64,
        /// Source disk size: the last chunk is cut there.
        disk_size: u64,
        /// First chunk.
        first_chunk: u64,
        /// Chunks, at most [`MAX_DIGEST_BATCH`].
        count: u32,
    },
    /// See the module docs.
    Digests {
        /// [`DIGEST_VERSION`].
        version: u8,
        /// Disk id.
        disk: u16,
        /// First chunk.
        first_chunk: u64,
        /// One per chunk; `None`: the replica does not hold it whole.
        digests: Vec<Option<[u8; DIGEST_LEN]>>,
    },
}

impl Frame {
    /// Writes the frame.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), WireError> {
        let mut p = Vec::new();
        let ty = match self {
            Frame::Hello {
                group_id,
                site_id,
                last_seq,
                last_checksum,
            } => {
                p.extend_from_slice(&group_id.to_le_bytes());
                p.extend_from_slice(&site_id.to_le_bytes());
                p.extend_from_slice(&last_seq.to_le_bytes());
                p.extend_from_slice(&last_checksum.to_le_bytes());
                1
            }
            Frame::Segment { seq, flags, bytes } => {
                p.reserve(9 + bytes.len());
                p.extend_from_slice(&seq.to_le_bytes());
                p.push(*flags);
                p.extend_from_slice(bytes);
                2
            }
            Frame::Ack { seq } => {
                p.extend_from_slice(&seq.to_le_bytes());
                3
            }
            Frame::Refuse { reason } => {
                p.extend_from_slice(reason.as_bytes());
                4
            }
            Frame::DigestRequest {
                version,
                disk,
                chunk_bytes,
                disk_size,
                first_chunk,
                count,
            } => {
                p.push(*version);
                p.extend_from_slice(&disk.to_le_bytes());
                p.extend_from_slice(&chunk_bytes.to_le_bytes());
                p.extend_from_slice(&disk_size.to_le_bytes());
                p.extend_from_slice(&first_chunk.to_le_bytes());
                p.extend_from_slice(&count.to_le_bytes());
                5
            }
            Frame::Digests {
                version,
                disk,
                first_chunk,
                digests,
            } => {
                let count = u32::try_from(digests.len())
                    .map_err(|_| WireError::Malformed("too many digests"))?;
                p.reserve(15 + digests.len() * (1 + DIGEST_LEN));
                p.push(*version);
                p.extend_from_slice(&disk.to_le_bytes());
                p.extend_from_slice(&first_chunk.to_le_bytes());
                p.extend_from_slice(&count.to_le_bytes());
                for d in digests {
                    match d {
                        Some(h) => {
                            p.push(1);
                            p.extend_from_slice(h);
                        }
                        None => p.extend_from_slice(&[0; 1 + DIGEST_LEN]),
                    }
                }
                6
            }
        };
        let len = u32::try_from(p.len()).map_err(|_| WireError::Malformed("frame too large"))?;
        let mut h = [0u8; 5];
        h[0] = ty;
        h[1..].copy_from_slice(&len.to_le_bytes());
        w.write_all(&h)?;
        w.write_all(&p)?;
        w.flush()?;
        Ok(())
    }

    /// Reads one frame (the peer is untrusted: lengths are bounded).
    pub fn read_from(r: &mut impl Read) -> Result<Frame, WireError> {
        let mut h = [0u8; 5];
        r.read_exact(&mut h)?;
        let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]);
        if len > MAX_FRAME {
            return Err(WireError::Malformed("frame too large"));
        }
        let mut p = vec![0u8; len as usize];
        r.read_exact(&mut p)?;
        let u64_at = |p: &[u8], at: usize| -> Result<u64, WireError> {
            let mut a = [0u8; 8];
            a.copy_from_slice(
                p.get(at..at + 8)
                    .ok_or(WireError::Malformed("short frame"))?,
            );
            Ok(u64::from_le_bytes(a))
        };
        Ok(match h[0] {
            1 => {
                if p.len() != 28 {
                    return Err(WireError::Malformed("bad hello"));
                }
                Frame::Hello {
                    group_id: u64_at(&p, 0)?,
                    site_id: u64_at(&p, 8)?,
                    last_seq: u64_at(&p, 16)?,
                    last_checksum: u32::from_le_bytes([p[24], p[25], p[26], p[27]]),
                }
            }
            2 => {
                if p.len() < 9 {
                    return Err(WireError::Malformed("bad segment frame"));
                }
                let seq = u64_at(&p, 0)?;
                let flags = p[8];
                p.drain(..9);
                Frame::Segment {
                    seq,
                    flags,
                    bytes: p,
                }
            }
            3 if p.len() == 8 => Frame::Ack {
                seq: u64_at(&p, 0)?,
            },
            4 => Frame::Refuse {
                reason: String::from_utf8_lossy(&p).into_owned(),
            },
            5 => {
                if p.len() != 31 {
                    return Err(WireError::Malformed("bad digest request"));
                }
                let count = u32::from_le_bytes([p[27], p[28], p[29], p[30]]);
                if count == 0 || count > MAX_DIGEST_BATCH {
                    return Err(WireError::Malformed("digest request count out of range"));
                }
                Frame::DigestRequest {
                    version: p[0],
                    disk: u16::from_le_bytes([p[1], p[2]]),
                    chunk_bytes: u64_at(&p, 3)?,
                    disk_size: u64_at(&p, 11)?,
                    first_chunk: u64_at(&p, 19)?,
                    count,
                }
            }
            6 => {
                if p.len() < 15 {
                    return Err(WireError::Malformed("bad digests frame"));
                }
                let count = u32::from_le_bytes([p[11], p[12], p[13], p[14]]);
                if count == 0 || count > MAX_DIGEST_BATCH {
                    return Err(WireError::Malformed("digest count out of range"));
                }
                let body = &p[15..];
                if body.len() != count as usize * (1 + DIGEST_LEN) {
                    return Err(WireError::Malformed("digests frame length mismatch"));
                }
                let mut digests = Vec::with_capacity(count as usize);
                for e in body.chunks_exact(1 + DIGEST_LEN) {
                    let mut h = [0u8; DIGEST_LEN];
                    h.copy_from_slice(&e[1..]);
                    digests.push(match e[0] {
                        1 => Some(h),
                        0 if h == [0; DIGEST_LEN] => None,
                        _ => return Err(WireError::Malformed("bad digest entry")),
                    });
                }
                Frame::Digests {
                    version: p[0],
                    disk: u16::from_le_bytes([p[1], p[2]]),
                    first_chunk: u64_at(&p, 3)?,
                    digests,
                }
            }
            _ => return Err(WireError::Malformed("unknown frame type")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_and_garbage_is_refused() {
        let frames = [
            Frame::Hello {
                group_id: 1,
                site_id: 2,
                last_seq: 3,
                last_checksum: 4,
            },
            Frame::Segment {
                seq: 9,
                flags: FLAG_ZSTD,
                bytes: vec![1, 2, 3],
            },
            Frame::Ack { seq: 9 },
            Frame::Refuse {
                reason: "replay".into(),
            },
            Frame::DigestRequest {
                version: DIGEST_VERSION,
                disk: 3,
                chunk_bytes: 65536,
                disk_size: 1 << 30,
                first_chunk: 1024,
                count: 1024,
            },
            Frame::Digests {
                version: DIGEST_VERSION,
                disk: 3,
                first_chunk: 1024,
                digests: vec![Some([7; DIGEST_LEN]), None],
            },
        ];
        let mut buf = Vec::new();
        for f in &frames {
            f.write_to(&mut buf).unwrap();
        }
        let mut r = &buf[..];
        for f in &frames {
            assert_eq!(&Frame::read_from(&mut r).unwrap(), f);
        }
        assert!(Frame::read_from(&mut &[9u8, 0, 0, 0, 0][..]).is_err());
        assert!(Frame::read_from(&mut &[2u8, 255, 255, 255, 255][..]).is_err());
        assert!(Frame::read_from(&mut &[1u8, 1, 0, 0, 0, 7][..]).is_err());
    }

    fn digests_frame(count: u32, entries: &[u8]) -> Vec<u8> {
        let mut p = vec![DIGEST_VERSION, 0, 0];
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&count.to_le_bytes());
        p.extend_from_slice(entries);
        let mut f = vec![6u8];
        f.extend_from_slice(&u32::try_from(p.len()).unwrap().to_le_bytes());
        f.extend_from_slice(&p);
        f
    }

    #[test]
    fn garbage_digest_frames_are_refused() {
        let entry = |tag: u8, fill: u8| {
            let mut e = vec![tag];
            e.extend_from_slice(&[fill; DIGEST_LEN]);
            e
        };
        // Well-formed: one present, one absent.
        let ok = [entry(1, 9), entry(0, 0)].concat();
        assert!(Frame::read_from(&mut &digests_frame(2, &ok)[..]).is_ok());
        let bad = [
            digests_frame(3, &ok),                        // fewer entries than counted
            digests_frame(1, &ok),                        // more entries than counted
            digests_frame(0, &[]),                        // empty
            digests_frame(MAX_DIGEST_BATCH + 1, &[]),     // over the limit
            digests_frame(1, &entry(2, 9)),               // unknown tag
            digests_frame(1, &entry(0, 9)),               // absent but with a digest
            digests_frame(1, &entry(1, 9)[..DIGEST_LEN]), // torn entry
        ];
        for (i, f) in bad.iter().enumerate() {
            assert!(
                matches!(Frame::read_from(&mut &f[..]), Err(WireError::Malformed(_))),
                "garbage frame {i} accepted"
            );
        }
        let mut req = vec![5u8, 31, 0, 0, 0, DIGEST_VERSION];
        req.extend_from_slice(&[0; 26]);
        req.extend_from_slice(&(MAX_DIGEST_BATCH + 1).to_le_bytes());
        req.truncate(5 + 31);
        assert!(
            Frame::read_from(&mut &req[..]).is_err(),
            "request over the limit"
        );
    }
}
