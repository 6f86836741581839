//! The index of one backup point: every chunk of the disk, in order.
//!
//! An index names *all* chunks of the disk (an incremental inherits the
//! unchanged ones from its parent when it is written), so each point
//! restores on its own and deleting another point never breaks it.
//!
//! File format: one line of JSON, then one line with the SHA-256 of that
//! JSON (hex), so a bit flip or truncation is detected on load.

use crate::backup::chunk::Digest;

/// How a point was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Every chunk was read.
    Full,
    /// Only the chunks the CBT bitmap marked dirty were read.
    Incremental,
}

/// The CBT bitmap a point was taken against.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CbtSource {
    /// Bitmap name on the disk.
    pub bitmap: String,
    /// 0 for a full point, parent's + 1 for an incremental.
    pub generation: u64,
}

/// One backup point.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupIndex {
    /// Point id (`<disk>-<unix millis>`).
    pub id: String,
    /// Which disk / volume this is a backup of.
    pub disk: String,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Full or incremental.
    pub kind: Kind,
    /// The point an incremental inherited its unchanged chunks from.
    pub parent: Option<String>,
    /// The CBT bitmap it was taken against, if any.
    pub cbt: Option<CbtSource>,
    /// Why a requested incremental became a full, if it did.
    pub fallback: Option<String>,
    /// One entry per chunk; `None` is an all-zero chunk (nothing stored).
    pub chunks: Vec<Option<Digest>>,
    /// Fingerprint of the key its chunks are encrypted with (and named
    /// under); none for a plain point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
}

/// Why an index file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The checksum line is missing or does not match.
    #[error("Index checksum mismatch (corrupt or truncated)")]
    Checksum,
    /// The JSON does not parse.
    #[error("Index does not parse")]
    Parse(#[source] serde_json::Error),
    /// Sizes and chunk count disagree.
    #[error("Index geometry is inconsistent")]
    Geometry,
}

impl BackupIndex {
    /// Byte offset of chunk `i`.
    pub fn offset(&self, i: usize) -> u64 {
        i as u64 * self.chunk_size
    }

    /// Length of chunk `i` (the last may be short).
    pub fn chunk_len(&self, i: usize) -> u64 {
        self.chunk_size.min(self.disk_size - self.offset(i))
    }

    /// The file bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, IndexError> {
        let mut out = serde_json::to_vec(self).map_err(IndexError::Parse)?;
        let sum = Digest::of(&out).to_hex();
        out.push(b'\n');
        out.extend_from_slice(sum.as_bytes());
        out.push(b'\n');
        Ok(out)
    }

    /// Parses and checks a file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IndexError> {
        let text = bytes.strip_suffix(b"\n").ok_or(IndexError::Checksum)?;
        let nl = text
            .iter()
            .rposition(|&b| b == b'\n')
            .ok_or(IndexError::Checksum)?;
        let (json, sum) = (&text[..nl], &text[nl + 1..]);
        let sum = std::str::from_utf8(sum).map_err(|_| IndexError::Checksum)?;
        if Digest::from_hex(sum) != Some(Digest::of(json)) {
            return Err(IndexError::Checksum);
        }
        let index: Self = serde_json::from_slice(json).map_err(IndexError::Parse)?;
        if index.chunk_size == 0
            || index.disk_size.div_ceil(index.chunk_size) != index.chunks.len() as u64
        {
            return Err(IndexError::Geometry);
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BackupIndex {
        BackupIndex {
            id: "vm1-disk0-1".into(),
            disk: "vm1-disk0".into(),
            disk_size: 10 << 20,
            chunk_size: 4 << 20,
            created_ms: 1,
            kind: Kind::Incremental,
            parent: Some("vm1-disk0-0".into()),
            cbt: Some(CbtSource {
                bitmap: "default".into(),
                generation: 1,
            }),
            fallback: None,
            chunks: vec![Some(Digest::of(b"a")), None, Some(Digest::of(b"b"))],
            encryption: None,
        }
    }

    #[test]
    fn roundtrip_and_corruption() {
        let idx = sample();
        assert_eq!(idx.chunk_len(2), 2 << 20);
        let bytes = idx.to_bytes().unwrap();
        assert_eq!(BackupIndex::from_bytes(&bytes).unwrap(), idx);
        for pos in [0, 10, bytes.len() / 2, bytes.len() - 5] {
            let mut bad = bytes.clone();
            bad[pos] ^= 1;
            assert!(BackupIndex::from_bytes(&bad).is_err(), "flip at {pos}");
        }
        assert!(BackupIndex::from_bytes(&bytes[..bytes.len() - 10]).is_err());
        let mut wrong = sample();
        wrong.chunks.pop();
        assert!(matches!(
            BackupIndex::from_bytes(&wrong.to_bytes().unwrap()),
            Err(IndexError::Geometry)
        ));
    }
}
