//! On-disk and on-wire format of journal segments.
//!
//! A segment is `header | record* | trailer`, all little-endian:
//! - header: magic `KEELSEG1`, group id, site id, sequence number, the
//!   checksum of the previous segment (the chain), flags, the disk table
//!   (id, size) and a crc32c of the header;
//! - record: kind, disk id, data length, byte offset, crc32c over the
//!   record header and its data, then the data (writes and resync blocks);
//! - trailer: magic `KEELEND1`, record count, cut time (ms since the Unix
//!   epoch, source clock), total length, and the segment checksum: crc32c
//!   of every byte before it. The next segment carries this value as its
//!   `prev_checksum`.
//!
//! Records are encoded once, on the worker thread, straight into the
//! journal buffer ([`encode_record`]); the writer only frames them.

/// Segment header magic.
pub const SEGMENT_MAGIC: &[u8; 8] = b"KEELSEG1";
/// Segment trailer magic.
pub const TRAILER_MAGIC: &[u8; 8] = b"KEELEND1";
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 24;
/// Bytes of the trailer.
pub const TRAILER_LEN: usize = 8 + 8 + 8 + 8 + 4;
/// Most disks in one consistency group.
pub const MAX_DISKS: usize = 64;
/// Largest record payload accepted when decoding (a guest write is far
/// smaller; a resync block is one chunk).
pub const MAX_RECORD_DATA: u32 = 64 << 20;

/// What a record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// Guest write: `len` bytes of data at `offset`.
    Write = 1,
    /// Guest discard: the range reads zero.
    Discard = 2,
    /// Guest write-zeroes.
    WriteZeroes = 3,
    /// Guest flush: everything before it was durable at the source.
    Flush = 4,
    /// Resync block read from the source disk (data follows).
    ResyncData = 5,
    /// Resync block that is all zeros (no data).
    ResyncZero = 6,
    /// From here until [`RecordKind::ResyncEnd`] the replica is not at a
    /// crash-consistent point (writes were tracked only in a bitmap).
    ResyncBegin = 7,
    /// Every dirty block was resent: consistent again after this record.
    ResyncEnd = 8,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Write,
            2 => Self::Discard,
            3 => Self::WriteZeroes,
            4 => Self::Flush,
            5 => Self::ResyncData,
            6 => Self::ResyncZero,
            7 => Self::ResyncBegin,
            8 => Self::ResyncEnd,
            _ => return None,
        })
    }

    /// True when `len` bytes of data follow the record header.
    pub fn has_data(self) -> bool {
        matches!(self, Self::Write | Self::ResyncData)
    }
}

/// Errors of segment decoding: each names the invariant that broke.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Shorter than a header + trailer, or a field runs past the end.
    #[error("Segment truncated")]
    Truncated,
    /// Wrong header magic.
    #[error("Not a segment (bad magic)")]
    Magic,
    /// The header checksum does not match.
    #[error("Segment header checksum mismatch")]
    HeaderChecksum,
    /// Too many disks in the header.
    #[error("Disk table too large ({0})")]
    DiskTable(usize),
    /// A record's checksum does not match (torn or corrupted).
    #[error("Record {index} checksum mismatch at byte {at}")]
    RecordChecksum {
        /// Record number.
        index: u64,
        /// Byte offset in the segment.
        at: usize,
    },
    /// Unknown record kind.
    #[error("Unknown record kind {0} at byte {1}")]
    RecordKind(u8, usize),
    /// A record refers to a disk not in the header.
    #[error("Record for unknown disk {0}")]
    UnknownDisk(u16),
    /// A record's range runs past the end of its disk.
    #[error("Record range {offset}+{len} past the end of disk {disk}")]
    OutOfRange {
        /// Disk id.
        disk: u16,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// No valid trailer (the segment was never sealed).
    #[error("Segment not sealed (no trailer)")]
    NotSealed,
    /// Trailer fields disagree with the content.
    #[error("Segment trailer does not match its content")]
    Trailer,
    /// The segment checksum does not match.
    #[error("Segment checksum mismatch")]
    SegmentChecksum,
}

/// One disk of a consistency group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskEntry {
    /// Id within the group (records refer to it).
    pub id: u16,
    /// Size in bytes.
    pub size: u64,
}

/// Segment header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Consistency group.
    pub group_id: u64,
    /// Source site.
    pub site_id: u64,
    /// Sequence number, from 1, no gaps.
    pub seq: u64,
    /// Segment checksum of segment `seq - 1` (0 for the first).
    pub prev_checksum: u32,
    /// Reserved flags (0).
    pub flags: u32,
    /// The group's disks.
    pub disks: Vec<DiskEntry>,
}

impl SegmentHeader {
    /// Encoded header bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(48 + self.disks.len() * 10);
        b.extend_from_slice(SEGMENT_MAGIC);
        b.extend_from_slice(&self.group_id.to_le_bytes());
        b.extend_from_slice(&self.site_id.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.prev_checksum.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        let n = u16::try_from(self.disks.len()).unwrap_or(u16::MAX);
        b.extend_from_slice(&n.to_le_bytes());
        for d in &self.disks {
            b.extend_from_slice(&d.id.to_le_bytes());
            b.extend_from_slice(&d.size.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a header; returns it and its encoded length.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), FormatError> {
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(8)? != SEGMENT_MAGIC {
            return Err(FormatError::Magic);
        }
        let group_id = r.u64()?;
        let site_id = r.u64()?;
        let seq = r.u64()?;
        let prev_checksum = r.u32()?;
        let flags = r.u32()?;
        let n = usize::from(r.u16()?);
        if n > MAX_DISKS {
            return Err(FormatError::DiskTable(n));
        }
        let mut disks = Vec::with_capacity(n);
        for _ in 0..n {
            disks.push(DiskEntry {
                id: r.u16()?,
                size: r.u64()?,
            });
        }
        let end = r.at;
        if r.u32()? != crc32c::crc32c(&bytes[..end]) {
            return Err(FormatError::HeaderChecksum);
        }
        Ok((
            Self {
                group_id,
                site_id,
                seq,
                prev_checksum,
                flags,
                disks,
            },
            r.at,
        ))
    }
}

/// Bytes [`encode_record`] needs for a record with `data_len` bytes of data.
#[inline]
pub fn record_len(data_len: usize) -> usize {
    RECORD_HEADER_LEN + data_len
}

/// hot path: appends one record to `out` without reallocating (the caller
/// checked `out` has [`record_len`] spare capacity). `fill` writes exactly
/// `data_len` bytes of payload into the slice it is given.
#[inline]
pub fn encode_record(
    out: &mut Vec<u8>,
    kind: RecordKind,
    disk: u16,
    offset: u64,
    len: u64,
    data_len: usize,
    fill: impl FnOnce(&mut [u8]),
) {
    let start = out.len();
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0] = kind as u8;
    h[2..4].copy_from_slice(&disk.to_le_bytes());
    // Ranges are ≤ 4 GiB per record (a virtio-blk request is far smaller;
    // discards are split by the device at 1 GiB).
    h[4..8].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&h);
    out.resize(start + RECORD_HEADER_LEN + data_len, 0);
    fill(&mut out[start + RECORD_HEADER_LEN..]);
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&out[start..start + 16]),
        &out[start + RECORD_HEADER_LEN..],
    );
    out[start + 16..start + 20].copy_from_slice(&crc.to_le_bytes());
}

/// One decoded record, borrowing its data from the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Kind.
    pub kind: RecordKind,
    /// Disk id.
    pub disk: u16,
    /// Byte offset.
    pub offset: u64,
    /// Range length.
    pub len: u64,
    /// Payload (writes and resync data), empty otherwise.
    pub data: &'a [u8],
}

/// Iterates the records in `bytes` (no header, no trailer); stops with an
/// error at the first record that does not check out.
pub fn records(bytes: &[u8]) -> RecordIter<'_> {
    RecordIter {
        b: bytes,
        at: 0,
        index: 0,
    }
}

/// See [`records`].
pub struct RecordIter<'a> {
    b: &'a [u8],
    at: usize,
    index: u64,
}

impl RecordIter<'_> {
    /// Bytes consumed by the valid records so far.
    pub fn position(&self) -> usize {
        self.at
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<Record<'a>, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at == self.b.len() {
            return None;
        }
        let at = self.at;
        let rest = &self.b[at..];
        if rest.len() < RECORD_HEADER_LEN {
            self.at = self.b.len();
            return Some(Err(FormatError::Truncated));
        }
        let Some(kind) = RecordKind::from_u8(rest[0]) else {
            self.at = self.b.len();
            return Some(Err(FormatError::RecordKind(rest[0], at)));
        };
        let disk = u16::from_le_bytes([rest[2], rest[3]]);
        let len32 = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&rest[8..16]);
        let offset = u64::from_le_bytes(off);
        let crc = u32::from_le_bytes([rest[16], rest[17], rest[18], rest[19]]);
        let data_len = if kind.has_data() { len32 } else { 0 };
        let bad = FormatError::RecordChecksum {
            index: self.index,
            at,
        };
        if data_len > MAX_RECORD_DATA {
            self.at = self.b.len();
            return Some(Err(bad));
        }
        let end = RECORD_HEADER_LEN + data_len as usize;
        if rest.len() < end {
            self.at = self.b.len();
            return Some(Err(bad));
        }
        let data = &rest[RECORD_HEADER_LEN..end];
        if crc32c::crc32c_append(crc32c::crc32c(&rest[..16]), data) != crc {
            self.at = self.b.len();
            return Some(Err(bad));
        }
        self.at += end;
        self.index += 1;
        Some(Ok(Record {
            kind,
            disk,
            offset,
            len: u64::from(len32),
            data,
        }))
    }
}

/// Segment trailer fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Records in the segment.
    pub records: u64,
    /// When the segment was cut (ms since the epoch, source clock).
    pub cut_ms: u64,
    /// Segment length including the trailer.
    pub total_len: u64,
    /// crc32c of every byte before the checksum field.
    pub checksum: u32,
}

/// Encodes the trailer of a segment whose bytes so far (header and
/// records) have crc32c `crc_so_far` and length `len_so_far`.
pub fn encode_trailer(crc_so_far: u32, len_so_far: u64, records: u64, cut_ms: u64) -> Vec<u8> {
    let mut t = Vec::with_capacity(TRAILER_LEN);
    t.extend_from_slice(TRAILER_MAGIC);
    t.extend_from_slice(&records.to_le_bytes());
    t.extend_from_slice(&cut_ms.to_le_bytes());
    t.extend_from_slice(&(len_so_far + TRAILER_LEN as u64).to_le_bytes());
    let crc = crc32c::crc32c_append(crc_so_far, &t);
    t.extend_from_slice(&crc.to_le_bytes());
    t
}

/// A fully verified sealed segment.
#[derive(Debug)]
pub struct Segment<'a> {
    /// Header.
    pub header: SegmentHeader,
    /// Trailer.
    pub trailer: Trailer,
    /// The record bytes (verify them with [`records`]).
    pub body: &'a [u8],
}

impl<'a> Segment<'a> {
    /// Verifies a whole sealed segment: header, every record (kind, disk,
    /// range within the disk, checksum), trailer and segment checksum.
    pub fn verify(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let (header, hlen) = SegmentHeader::decode(bytes)?;
        if bytes.len() < hlen + TRAILER_LEN {
            return Err(FormatError::NotSealed);
        }
        let tstart = bytes.len() - TRAILER_LEN;
        let t = &bytes[tstart..];
        if &t[..8] != TRAILER_MAGIC {
            return Err(FormatError::NotSealed);
        }
        let mut r = Reader { b: t, at: 8 };
        let trailer = Trailer {
            records: r.u64()?,
            cut_ms: r.u64()?,
            total_len: r.u64()?,
            checksum: r.u32()?,
        };
        if crc32c::crc32c(&bytes[..bytes.len() - 4]) != trailer.checksum {
            return Err(FormatError::SegmentChecksum);
        }
        if trailer.total_len != bytes.len() as u64 {
            return Err(FormatError::Trailer);
        }
        let body = &bytes[hlen..tstart];
        let mut count = 0u64;
        for rec in records(body) {
            let rec = rec?;
            check_range(&header, &rec)?;
            count += 1;
        }
        if count != trailer.records {
            return Err(FormatError::Trailer);
        }
        Ok(Self {
            header,
            trailer,
            body,
        })
    }

    /// The (already verified) records.
    pub fn records(&self) -> impl Iterator<Item = Record<'a>> {
        records(self.body).filter_map(Result::ok)
    }
}

/// A record's disk must be in the header and its range inside that disk.
fn check_range(h: &SegmentHeader, r: &Record<'_>) -> Result<(), FormatError> {
    if matches!(
        r.kind,
        RecordKind::Flush | RecordKind::ResyncBegin | RecordKind::ResyncEnd
    ) {
        return Ok(());
    }
    let d = h
        .disks
        .iter()
        .find(|d| d.id == r.disk)
        .ok_or(FormatError::UnknownDisk(r.disk))?;
    match r.offset.checked_add(r.len) {
        Some(end) if end <= d.size => Ok(()),
        _ => Err(FormatError::OutOfRange {
            disk: r.disk,
            offset: r.offset,
            len: r.len,
        }),
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.at.checked_add(n).ok_or(FormatError::Truncated)?;
        let s = self.b.get(self.at..end).ok_or(FormatError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

/// Builds a sealed segment in memory (tests, resync tools).
pub fn build_segment(header: &SegmentHeader, body: &[u8], cut_ms: u64) -> Vec<u8> {
    let mut s = header.encode();
    s.extend_from_slice(body);
    let n = records(body).filter(Result::is_ok).count() as u64;
    let crc = crc32c::crc32c(&s);
    let t = encode_trailer(crc, s.len() as u64, n, cut_ms);
    s.extend_from_slice(&t);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn header(seq: u64, prev: u32) -> SegmentHeader {
        SegmentHeader {
            group_id: 7,
            site_id: 1,
            seq,
            prev_checksum: prev,
            flags: 0,
            disks: vec![DiskEntry {
                id: 0,
                size: 1 << 20,
            }],
        }
    }

    fn body() -> Vec<u8> {
        let mut b = Vec::with_capacity(1 << 16);
        encode_record(&mut b, RecordKind::Write, 0, 4096, 8, 8, |d| {
            d.copy_from_slice(b"abcdefgh")
        });
        encode_record(&mut b, RecordKind::Flush, 0, 0, 0, 0, |_| {});
        encode_record(&mut b, RecordKind::Discard, 0, 8192, 4096, 0, |_| {});
        b
    }

    #[test]
    fn record_and_segment_roundtrip() {
        let seg = build_segment(&header(3, 99), &body(), 1234);
        let s = Segment::verify(&seg).unwrap();
        assert_eq!(s.header, header(3, 99));
        assert_eq!(s.trailer.records, 3);
        assert_eq!(s.trailer.cut_ms, 1234);
        let recs: Vec<_> = s.records().collect();
        assert_eq!(recs[0].kind, RecordKind::Write);
        assert_eq!(recs[0].offset, 4096);
        assert_eq!(recs[0].data, b"abcdefgh");
        assert_eq!(recs[1].kind, RecordKind::Flush);
        assert_eq!(recs[2].kind, RecordKind::Discard);
        assert_eq!(recs[2].len, 4096);
        assert!(recs[2].data.is_empty());
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let seg = build_segment(&header(1, 0), &body(), 5);
        for i in 0..seg.len() {
            let mut bad = seg.clone();
            bad[i] ^= 0x40;
            assert!(
                Segment::verify(&bad).is_err(),
                "flip at byte {i} undetected"
            );
        }
    }

    #[test]
    fn torn_tail_keeps_only_whole_records() {
        let b = body();
        for cut in 0..b.len() {
            let valid: Vec<_> = records(&b[..cut]).take_while(Result::is_ok).collect();
            let whole = [0, 32, 56, 80].iter().filter(|&&e| e <= cut).count() - 1;
            assert_eq!(valid.len(), whole, "cut at {cut}");
        }
        // An unsealed segment (no trailer) is refused as a whole.
        let seg = build_segment(&header(1, 0), &b, 5);
        assert_eq!(
            Segment::verify(&seg[..seg.len() - 3]).unwrap_err(),
            FormatError::NotSealed
        );
    }

    #[test]
    fn records_out_of_the_disk_are_refused() {
        let mut b = Vec::with_capacity(256);
        encode_record(
            &mut b,
            RecordKind::Discard,
            0,
            (1 << 20) - 512,
            4096,
            0,
            |_| {},
        );
        let seg = build_segment(&header(1, 0), &b, 5);
        assert!(matches!(
            Segment::verify(&seg),
            Err(FormatError::OutOfRange { .. })
        ));
        let mut b = Vec::with_capacity(256);
        encode_record(&mut b, RecordKind::Discard, 3, 0, 512, 0, |_| {});
        let seg = build_segment(&header(1, 0), &b, 5);
        assert_eq!(
            Segment::verify(&seg).unwrap_err(),
            FormatError::UnknownDisk(3)
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(Segment::verify(b"").unwrap_err(), FormatError::Truncated);
        assert_eq!(
            Segment::verify(&[0xAB; 300]).unwrap_err(),
            FormatError::Magic
        );
    }
}
