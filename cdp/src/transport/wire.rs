//! Frames between source and replica: `type u8 | length u32 | payload`.
//!
//! - `Hello` (replica → source, once after the handshake): group id,
//!   source site id, last applied sequence number and its checksum; the
//!   source continues from the next segment (resumable transfer).
//! - `Segment` (source → replica): sequence number, flags (bit 0: zstd),
//!   the segment file.
//! - `Ack` (replica → source): the segment is fsynced and applied.
//! - `Refuse` (replica → source): why a segment was refused; the replica
//!   closes the connection.

use std::io::{Read, Write};

/// Largest frame accepted (a segment is sealed at 64 MiB by default).
pub const MAX_FRAME: u32 = 512 << 20;
/// `Segment` flag: the payload is zstd-compressed.
pub const FLAG_ZSTD: u8 = 1;

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
}
