//! Parser tests with hostile descriptor chains, built with virtio-queue's
//! driver-side mock.
#![allow(clippy::cast_possible_truncation)] // test constants are small

use super::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

const MEM_SIZE: u64 = 0x100_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const SERIAL: [u8; ID_LEN] = *b"keel-test-serial-123";
const SECTORS: u64 = 2048; // 1 MiB disk

fn mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn view(readonly: bool, failed: bool) -> DiskView<'static> {
    DiskView {
        sectors: SECTORS,
        readonly,
        failed,
        serial: &SERIAL,
    }
}

fn header(mem: &GuestMemoryMmap<()>, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn parse_with(
    mem: &GuestMemoryMmap<()>,
    descs: &[(u64, u32, u16)],
    disk: &DiskView<'_>,
) -> (Request, Result<(), ParseError>) {
    let q = MockSplitQueue::new(mem, 16);
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
        .collect();
    let chain = q.build_desc_chain(&raw).unwrap();
    let mut r = Request::default();
    let res = r.parse(chain.head_index(), chain, mem, disk);
    (r, res)
}

fn rw(ty: u32, sector: u64, data: (u64, u32, u16)) -> (Request, Result<(), ParseError>) {
    let m = mem();
    header(&m, ty, sector);
    parse_with(
        &m,
        &[(HDR, 16, 0), data, (STATUS, 1, W)],
        &view(false, false),
    )
}

#[test]
fn valid_read_and_write() {
    let (r, res) = rw(VIRTIO_BLK_T_IN, 8, (DATA, 4096, W));
    res.unwrap();
    assert_eq!(r.kind, RequestKind::Read);
    assert_eq!(r.offset, 8 * 512);
    assert_eq!(r.len, 4096);
    assert_eq!(r.iovecs.0.len(), 1);
    assert_eq!(r.status_addr, Some(GuestAddress(STATUS)));
    assert_eq!(r.used_len(STATUS_OK), 4097);
    assert_eq!(r.used_len(STATUS_IOERR), 1);

    let (r, res) = rw(VIRTIO_BLK_T_OUT, SECTORS - 8, (DATA, 4096, 0));
    res.unwrap();
    assert_eq!(r.kind, RequestKind::Write);
    assert_eq!(r.used_len(STATUS_OK), 1);
}

#[test]
fn ranges_past_the_end_are_io_errors() {
    for sector in [SECTORS - 7, SECTORS, u64::MAX, u64::MAX / 512, u64::MAX - 7] {
        let (r, res) = rw(VIRTIO_BLK_T_IN, sector, (DATA, 4096, W));
        assert_eq!(res, Err(ParseError::OutOfRange), "sector {sector}");
        assert_eq!(res.unwrap_err().status(), Some(STATUS_IOERR));
        assert_eq!(r.status_addr, Some(GuestAddress(STATUS)));
    }
}

#[test]
fn data_outside_guest_memory_is_refused() {
    for addr in [MEM_SIZE, MEM_SIZE - 512, u64::MAX - 100] {
        let (_, res) = rw(VIRTIO_BLK_T_IN, 0, (addr, 4096, W));
        assert_eq!(res, Err(ParseError::GuestMemory), "addr {addr:#x}");
    }
    let (_, res) = rw(VIRTIO_BLK_T_OUT, 0, (DATA, 0xF0_0000, 0));
    assert_eq!(res, Err(ParseError::GuestMemory));
    // virtio-queue ends the chain at a descriptor it cannot accept; either
    // way the request fails without touching memory.
    let (_, res) = rw(VIRTIO_BLK_T_OUT, 0, (DATA, u32::MAX, 0));
    assert!(res.is_err());
}

#[test]
fn unaligned_lengths_and_wrong_directions_are_refused() {
    let (_, res) = rw(VIRTIO_BLK_T_IN, 0, (DATA, 100, W));
    assert_eq!(res, Err(ParseError::UnalignedLength(100)));
    let (_, res) = rw(VIRTIO_BLK_T_IN, 0, (DATA, 4096, 0));
    assert_eq!(res, Err(ParseError::DataDirection));
    let (_, res) = rw(VIRTIO_BLK_T_OUT, 0, (DATA, 4096, W));
    assert_eq!(res, Err(ParseError::DataDirection));
}

#[test]
fn unknown_types_are_unsupported() {
    let (_, res) = rw(99, 0, (DATA, 512, W));
    assert_eq!(res, Err(ParseError::UnsupportedType(99)));
    assert_eq!(res.unwrap_err().status(), Some(STATUS_UNSUPP));
}

#[test]
fn bad_header_or_status_descriptors() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let d = view(false, false);
    // writable header
    let (_, res) = parse_with(&m, &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)], &d);
    assert_eq!(res, Err(ParseError::HeaderDescriptor));
    // short header
    let (_, res) = parse_with(&m, &[(HDR, 8, 0), (DATA, 512, W), (STATUS, 1, W)], &d);
    assert_eq!(res, Err(ParseError::HeaderDescriptor));
    // header outside memory
    let (_, res) = parse_with(&m, &[(MEM_SIZE - 4, 16, 0), (STATUS, 1, W)], &d);
    assert_eq!(res, Err(ParseError::ReadHeader));
    // no status descriptor at all
    let (r, res) = parse_with(&m, &[(HDR, 16, 0)], &d);
    assert_eq!(res, Err(ParseError::NoStatusDescriptor));
    assert_eq!(res.unwrap_err().status(), None);
    assert_eq!(r.status_addr, None);
    // read-only status
    let (_, res) = parse_with(&m, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, 0)], &d);
    assert_eq!(res, Err(ParseError::NoStatusDescriptor));
    // zero-length status, status outside memory, status address overflow
    for (addr, len) in [(STATUS, 0), (MEM_SIZE, 1), (u64::MAX, 2)] {
        let (_, res) = parse_with(&m, &[(HDR, 16, 0), (addr, len, W)], &d);
        assert_eq!(res, Err(ParseError::NoStatusDescriptor), "{addr:#x}+{len}");
    }
    // status is the last byte of the last descriptor
    let (r, res) = parse_with(&m, &[(HDR, 16, 0), (STATUS, 8, W)], &d);
    assert_eq!(res, Err(ParseError::UnalignedLength(0)).or(Ok(())));
    assert_eq!(r.status_addr, Some(GuestAddress(STATUS + 7)));
}

#[test]
fn readonly_and_failed_disks() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let descs = [(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)];
    let (_, res) = parse_with(&m, &descs, &view(true, false));
    assert_eq!(res, Err(ParseError::ReadOnly));
    assert_eq!(res.unwrap_err().status(), Some(STATUS_IOERR));
    header(&m, VIRTIO_BLK_T_IN, 0);
    let descs = [(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)];
    parse_with(&m, &descs, &view(true, false)).1.unwrap();
    let (_, res) = parse_with(&m, &descs, &view(false, true));
    assert_eq!(res, Err(ParseError::DiskFailed));
}

#[test]
fn flush_and_get_id() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_FLUSH, 12345);
    let (r, res) = parse_with(&m, &[(HDR, 16, 0), (STATUS, 1, W)], &view(false, false));
    res.unwrap();
    assert_eq!(r.kind, RequestKind::Flush);

    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let (r, res) = parse_with(
        &m,
        &[(HDR, 16, 0), (DATA, 64, W), (STATUS, 1, W)],
        &view(false, false),
    );
    res.unwrap();
    let mut got = [0u8; ID_LEN];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, SERIAL);
    assert_eq!(r.used_len(STATUS_OK), 21);
    // an answer buffer outside memory is an I/O error, not a crash
    let (_, res) = parse_with(
        &m,
        &[(HDR, 16, 0), (MEM_SIZE - 4, 64, W), (STATUS, 1, W)],
        &view(false, false),
    );
    assert_eq!(res, Err(ParseError::WriteId));
}

fn discard_seg(m: &GuestMemoryMmap<()>, at: u64, sector: u64, num: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    m.write_slice(&s, GuestAddress(at)).unwrap();
}

#[test]
fn discard_and_write_zeroes_segments() {
    let m = mem();
    let d = view(false, false);
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    discard_seg(&m, DATA, 8, 16, 0);
    discard_seg(&m, DATA + 16, 100, 8, 0);
    let descs = [(HDR, 16, 0), (DATA, 32, 0), (STATUS, 1, W)];
    let (r, res) = parse_with(&m, &descs, &d);
    res.unwrap();
    assert_eq!(r.nsegs, 2);
    assert_eq!(
        r.segments[0],
        Segment {
            offset: 4096,
            len: 8192,
            unmap: false
        }
    );
    assert_eq!(r.segments[1].offset, 100 * 512);

    // reserved flag on discard
    discard_seg(&m, DATA + 16, 100, 8, 1);
    let (_, res) = parse_with(&m, &descs, &d);
    assert_eq!(res, Err(ParseError::UnsupportedFlags(1)));
    // past the end, overflowing
    discard_seg(&m, DATA + 16, SECTORS - 4, 8, 0);
    assert_eq!(parse_with(&m, &descs, &d).1, Err(ParseError::OutOfRange));
    discard_seg(&m, DATA + 16, u64::MAX - 2, 8, 0);
    assert_eq!(parse_with(&m, &descs, &d).1, Err(ParseError::OutOfRange));
    // not whole segments, no segments, too many
    let (_, res) = parse_with(&m, &[(HDR, 16, 0), (DATA, 20, 0), (STATUS, 1, W)], &d);
    assert_eq!(res, Err(ParseError::SegmentLayout));
    let (_, res) = parse_with(&m, &[(HDR, 16, 0), (STATUS, 1, W)], &d);
    assert_eq!(res, Err(ParseError::SegmentLayout));
    let (_, res) = parse_with(&m, &[(HDR, 16, 0), (DATA, 16 * 9, 0), (STATUS, 1, W)], &d);
    assert_eq!(res, Err(ParseError::TooManySegments));

    // write zeroes with UNMAP is allowed, unknown flags are not
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    discard_seg(&m, DATA, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let descs = [(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)];
    let (r, res) = parse_with(&m, &descs, &d);
    res.unwrap();
    assert!(r.segments[0].unmap);
    discard_seg(&m, DATA, 0, 8, 0x80);
    assert_eq!(
        parse_with(&m, &descs, &d).1,
        Err(ParseError::UnsupportedFlags(0x80))
    );
    // on a read-only disk
    assert_eq!(
        parse_with(&m, &descs, &view(true, false)).1,
        Err(ParseError::ReadOnly)
    );
}

#[test]
fn too_many_data_segments() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let q = MockSplitQueue::new(&m, 1024);
    let mut raw = vec![RawDescriptor::from(SplitDescriptor::new(HDR, 16, 0, 0))];
    for i in 0..300u64 {
        raw.push(RawDescriptor::from(SplitDescriptor::new(
            DATA + i * 512,
            512,
            W,
            0,
        )));
    }
    raw.push(RawDescriptor::from(SplitDescriptor::new(STATUS, 1, W, 0)));
    let chain = q.build_desc_chain(&raw).unwrap();
    let mut r = Request::default();
    let res = r.parse(chain.head_index(), chain, &m, &view(false, false));
    assert_eq!(res, Err(ParseError::TooManySegments));
    assert_eq!(r.iovecs.0.capacity(), MAX_IOVECS, "no reallocation");
}

#[test]
fn descriptor_loop_terminates() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let q = MockSplitQueue::new(&m, 16);
    let next = VRING_DESC_F_NEXT as u16;
    // 0 -> 1 -> 2 -> 1 -> 2 ... a loop the guest built on purpose.
    let raw = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, W | next, 2)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, W | next, 1)),
    ];
    q.add_desc_chains(&raw, 0).unwrap();
    let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
    let chain = queue.iter(&m).unwrap().next().unwrap();
    let mut r = Request::default();
    // The walk ends at the queue size; whatever comes out must be an
    // ordinary error or a bounded parse, never a hang or panic.
    let res = r.parse(chain.head_index(), chain, &m, &view(false, false));
    assert!(r.iovecs.0.len() <= 16);
    let _ = res;
    let _ = queue.next_avail();
}

#[test]
fn indirect_chain_is_parsed() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_OUT, 4);
    // Indirect table at 0x40_0000 with header, two data, status.
    let table = 0x40_0000u64;
    let next = VRING_DESC_F_NEXT as u16;
    let entries = [
        SplitDescriptor::new(HDR, 16, next, 1),
        SplitDescriptor::new(DATA, 512, next, 2),
        SplitDescriptor::new(DATA + 4096, 1024, next, 3),
        SplitDescriptor::new(STATUS, 1, W, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        m.write_obj(*e, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let q = MockSplitQueue::new(&m, 16);
    let raw = [RawDescriptor::from(SplitDescriptor::new(
        table,
        64,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ))];
    let chain = q.build_desc_chain(&raw).unwrap();
    let mut r = Request::default();
    r.parse(chain.head_index(), chain, &m, &view(false, false))
        .unwrap();
    assert_eq!(r.kind, RequestKind::Write);
    assert_eq!(r.len, 1536);
    assert_eq!(r.offset, 2048);
    assert_eq!(r.iovecs.0.len(), 2);
}
