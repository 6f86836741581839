//! The qcow2 header (QEMU's `docs/interop/qcow2.txt`): parsed and checked
//! at open, written at creation. All fields are big-endian.

// Offsets and sizes are u64 on disk and index memory as usize: keel runs on
// 64-bit hosts only (io_uring), and every size is bounded at open.
#![allow(clippy::cast_possible_truncation)]

use super::Qcow2Error;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Bytes of a version 2 header; version 3 adds fields up to 104.
const V2_LEN: u32 = 72;
/// The version 3 header keel writes (with the compression type byte, padded).
pub const V3_LEN: u32 = 112;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Byte offset of `autoclear_features`.
pub const AUTOCLEAR_OFFSET: u64 = 88;
/// Byte offsets of `size` and `l1_size`.
pub const SIZE_OFFSET: u64 = 24;
pub const L1_SIZE_OFFSET: u64 = 36;

/// The fields keel uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// Backing file name and its format (from the header extension).
    pub backing: Option<(String, Option<String>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn corrupt(what: impl Into<String>) -> Qcow2Error {
    Qcow2Error::Corrupt(what.into())
}

impl Header {
    /// Parses the first cluster of an image (`buf` holds at least its
    /// first 64 KiB or the whole file, whichever is shorter).
    pub fn parse(buf: &[u8]) -> Result<Self, Qcow2Error> {
        if buf.len() < V2_LEN as usize || be32(buf, 0) != MAGIC {
            return Err(corrupt("no qcow2 magic"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!("cluster_bits {cluster_bits}")));
        }
        if be32(buf, 32) != 0 {
            return Err(Qcow2Error::Unsupported("encrypted images".into()));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            incompatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_LEN,
            backing: None,
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(corrupt("short version 3 header"));
            }
            h.incompatible = be64(buf, 72);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 || h.header_length as usize > buf.len() {
                return Err(corrupt(format!("header_length {}", h.header_length)));
            }
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::Unsupported("an external data file".into()));
        }
        if h.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(Qcow2Error::Unsupported("extended L2 entries".into()));
        }
        if h.incompatible & INCOMPAT_COMPRESSION != 0 {
            return Err(Qcow2Error::Unsupported("zstd compression".into()));
        }
        if h.incompatible & !known != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "incompatible features {:#x}",
                h.incompatible & !known
            )));
        }
        if h.refcount_order != 4 {
            return Err(Qcow2Error::Unsupported(format!(
                "{}-bit refcounts (only 16)",
                1u64 << h.refcount_order.min(63)
            )));
        }
        let cluster = 1u64 << cluster_bits;
        for (name, off) in [
            ("l1_table_offset", h.l1_table_offset),
            ("refcount_table_offset", h.refcount_table_offset),
        ] {
            if off == 0 || off % cluster != 0 {
                return Err(corrupt(format!("{name} {off:#x} is not cluster aligned")));
            }
        }
        if h.refcount_table_clusters == 0 {
            return Err(corrupt("empty refcount table"));
        }
        h.backing = parse_backing(buf, &h, be64(buf, 8), be32(buf, 16))?;
        Ok(h)
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

fn parse_backing(
    buf: &[u8],
    h: &Header,
    offset: u64,
    len: u32,
) -> Result<Option<(String, Option<String>)>, Qcow2Error> {
    if offset == 0 {
        return Ok(None);
    }
    let end = offset
        .checked_add(u64::from(len))
        .filter(|&e| e <= h.cluster_size() && e <= buf.len() as u64 && len <= 1023)
        .ok_or_else(|| corrupt("backing file name outside the header cluster"))?;
    let name = std::str::from_utf8(&buf[offset as usize..end as usize])
        .map_err(|_| corrupt("backing file name is not UTF-8"))?
        .to_owned();
    // Header extensions follow the header up to the backing name.
    let mut at = h.header_length as usize;
    let mut format = None;
    while at + 8 <= buf.len().min(offset as usize) {
        let (kind, elen) = (be32(buf, at), be32(buf, at + 4) as usize);
        if kind == EXT_END {
            break;
        }
        let data = at + 8;
        let Some(next) = data
            .checked_add(elen.div_ceil(8) * 8)
            .filter(|&n| n <= buf.len())
        else {
            return Err(corrupt("header extension past the header cluster"));
        };
        if kind == EXT_BACKING_FORMAT {
            format = Some(
                std::str::from_utf8(&buf[data..data + elen])
                    .map_err(|_| corrupt("backing format is not UTF-8"))?
                    .to_owned(),
            );
        }
        at = next;
    }
    Ok(Some((name, format)))
}

/// Serializes a version 3 header plus the backing file extension and name
/// into the first cluster `out` (zeroed by the caller).
pub fn write_v3(h: &Header, out: &mut [u8]) -> Result<(), Qcow2Error> {
    let put32 = |o: &mut [u8], at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |o: &mut [u8], at: usize, v: u64| o[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(out, 0, MAGIC);
    put32(out, 4, 3);
    put32(out, 20, h.cluster_bits);
    put64(out, 24, h.size);
    put32(out, 36, h.l1_size);
    put64(out, 40, h.l1_table_offset);
    put64(out, 48, h.refcount_table_offset);
    put32(out, 56, h.refcount_table_clusters);
    put32(out, 96, 4);
    put32(out, 100, V3_LEN);
    let mut at = V3_LEN as usize;
    if let Some((name, format)) = &h.backing {
        let format = format.as_deref().unwrap_or("raw");
        put32(out, at, EXT_BACKING_FORMAT);
        put32(out, at + 4, format.len() as u32);
        let data = at + 8;
        out[data..data + format.len()].copy_from_slice(format.as_bytes());
        at = data + format.len().div_ceil(8) * 8;
        // End-of-extensions marker, then the name.
        at += 8;
        if name.len() > 1023 || at + name.len() > out.len() {
            return Err(Qcow2Error::Unsupported(
                "a backing file name that long".into(),
            ));
        }
        put64(out, 8, at as u64);
        put32(out, 16, name.len() as u32);
        out[at..at + name.len()].copy_from_slice(name.as_bytes());
    }
    Ok(())
}
