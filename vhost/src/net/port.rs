//! The data-plane side of a vhost-user-net NIC: the worker pops the guest's
//! TX chains into its packet buffers and copies frames into the guest's RX
//! buffers, one vring lock and at most one guest notification per batch.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use keel_dataplane::port::{PacketBuf, Port, PortError};
use vhost_user_backend::{VringState, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryMmap};

use crate::net::device::{Active, NetShared};

/// Offset of `num_buffers` in `struct virtio_net_hdr_mrg_rxbuf`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Most RX chains one frame may span (mergeable buffers are ≥ 1 KiB in
/// Linux; a 2 KiB frame never needs this many).
const MAX_CHAINS_PER_FRAME: usize = 16;

/// Frames held for the guest while its RX ring is full (a NIC's backpressure:
/// without it a burst meets an empty ring, is dropped, and TCP waits out a
/// retransmission timeout). Pre-allocated; flushed first on every round.
const BACKLOG: usize = 256;

/// A FIFO of pre-allocated buffers.
struct Backlog {
    bufs: Vec<PacketBuf>,
    head: usize,
    len: usize,
}

impl Backlog {
    fn new() -> Self {
        Self {
            bufs: (0..BACKLOG).map(|_| PacketBuf::default()).collect(),
            head: 0,
            len: 0,
        }
    }

    fn push(&mut self, frame: &[u8]) -> bool {
        if self.len == self.bufs.len() {
            return false;
        }
        let at = (self.head + self.len) % self.bufs.len();
        let ok = self.bufs.get_mut(at).is_some_and(|b| b.set(frame));
        if ok {
            self.len += 1;
        }
        ok
    }

    fn front(&self) -> Option<&PacketBuf> {
        (self.len > 0).then(|| self.bufs.get(self.head)).flatten()
    }

    fn pop(&mut self) {
        if self.len > 0 {
            self.head = (self.head + 1) % self.bufs.len();
            self.len -= 1;
        }
    }

    /// Writes held frames into the guest until its ring is full; returns how many.
    fn drain(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap<()>, active: &Active) -> usize {
        let mut n = 0;
        while let Some(b) = self.front() {
            if !write_frame(queue, mem, active, b.frame()) {
                break;
            }
            self.pop();
            n += 1;
        }
        n
    }
}

/// A vhost-user-net NIC as seen by the data-plane worker.
pub struct VhostNetPort {
    name: String,
    shared: Arc<NetShared>,
    generation: u64,
    active: Option<Active>,
    rx_dropped: u64,
    backlog: Backlog,
}

impl VhostNetPort {
    /// The port named `name` (what the desired state's `interface` refers
    /// to) fed by the connections published to `shared`.
    pub fn new(name: &str, shared: Arc<NetShared>) -> Self {
        Self {
            name: name.to_string(),
            shared,
            generation: 0,
            active: None,
            rx_dropped: 0,
            backlog: Backlog::new(),
        }
    }

    /// Picks up a new (or ended) connection; one atomic load per batch.
    fn refresh(&mut self) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.active = self.shared.active.lock().ok().and_then(|a| a.clone());
            self.generation = generation;
            // Frames held for an old connection are not the new guest's.
            self.backlog.len = 0;
            tracing::debug!(port = %self.name, connected = self.active.is_some(), "data plane picked up connection change");
        }
    }

    fn pop_tx(&mut self, bufs: &mut [PacketBuf]) -> Result<usize, PortError> {
        let Some(active) = &self.active else {
            return Ok(0);
        };
        let guard = active.mem.memory();
        let mem: &GuestMemoryMmap<()> = &guard;
        let mut state = active.tx.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return Ok(0);
        }
        let mut n = 0;
        let mut used = 0;
        while let Some(buf) = bufs.get_mut(n) {
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match read_chain(mem, chain, active.hdr_len, buf) {
                Some(len) => {
                    buf.len = len;
                    n += 1;
                }
                None => self.rx_dropped += 1,
            }
            state
                .get_queue_mut()
                .add_used(mem, head, 0)
                .map_err(|e| self.queue_err("TX used ring", e))?;
            used += 1;
        }
        if used > 0 {
            notify(&mut state, mem, &self.name)?;
        }
        Ok(n)
    }

    fn queue_err(&self, step: &'static str, e: virtio_queue::Error) -> PortError {
        PortError::Receive {
            name: format!("{} ({step})", self.name),
            source: std::io::Error::other(e.to_string()),
        }
    }
}

/// Signals the guest unless it asked not to be (one eventfd write per batch).
fn notify(
    state: &mut VringState<crate::net::device::GuestMem>,
    mem: &GuestMemoryMmap<()>,
    name: &str,
) -> Result<(), PortError> {
    let needed = state
        .get_queue_mut()
        .needs_notification(mem)
        .unwrap_or(true);
    if needed {
        state
            .signal_used_queue()
            .map_err(|source| PortError::Transmit {
                name: name.to_string(),
                source,
            })?;
    }
    Ok(())
}

/// Copies one guest TX chain (header + frame, in any number of readable
/// descriptors) into `buf` without the header, completing a partial
/// checksum; `None` when the chain is malformed (write-only descriptor, bad
/// address, checksum offsets outside the frame) or the frame does not fit.
// hot path: no allocation; one bounds-checked copy per descriptor.
fn read_chain<M>(
    mem: &GuestMemoryMmap<()>,
    chain: virtio_queue::DescriptorChain<M>,
    hdr_len: usize,
    buf: &mut PacketBuf,
) -> Option<usize>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let dst = buf.buffer_mut();
    let mut header = [0u8; 12];
    let mut got_hdr = 0usize;
    let mut len = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return None;
        }
        let dlen = usize::try_from(desc.len()).ok()?;
        let from_hdr = (hdr_len - got_hdr).min(dlen);
        if from_hdr > 0 {
            mem.read_slice(header.get_mut(got_hdr..got_hdr + from_hdr)?, desc.addr())
                .ok()?;
            got_hdr += from_hdr;
        }
        let data = dlen - from_hdr;
        if data == 0 {
            continue;
        }
        let addr = desc.addr().checked_add(from_hdr as u64)?;
        let end = len.checked_add(data)?;
        mem.read_slice(dst.get_mut(len..end)?, addr).ok()?;
        len = end;
    }
    if got_hdr < hdr_len {
        return None;
    }
    if header[0] & NEEDS_CSUM != 0 {
        let start = usize::from(u16::from_le_bytes([header[6], header[7]]));
        let offset = usize::from(u16::from_le_bytes([header[8], header[9]]));
        complete_checksum(dst.get_mut(..len)?, start, offset)?;
    }
    Some(len)
}

/// VIRTIO_NET_HDR_F_NEEDS_CSUM: the guest left the L4 checksum to us.
const NEEDS_CSUM: u8 = 1;

/// Completes a checksum-partial frame (VIRTIO_NET_F_CSUM): the field at
/// `start + offset` holds the pseudo-header sum; the checksum over
/// `frame[start..]` goes there, as Linux's `skb_checksum_help` does. Done
/// at ingress because data-plane ports carry no offload metadata, so every
/// destination gets a complete frame. `None` when the offsets lie outside
/// the frame (a hostile guest).
// hot path for offloading guests: one pass over the L4 payload, no allocation.
fn complete_checksum(frame: &mut [u8], start: usize, offset: usize) -> Option<()> {
    let field = start.checked_add(offset)?;
    if field.checked_add(2)? > frame.len() {
        return None;
    }
    let sum = keel_dataplane::packet::checksum::finish(
        keel_dataplane::packet::checksum::accumulate(0, frame.get(start..)?),
    );
    let sum = if sum == 0 { 0xffff } else { sum };
    frame
        .get_mut(field..field + 2)?
        .copy_from_slice(&sum.to_be_bytes());
    Some(())
}

/// Writes `frame` (after a virtio-net header) into as many RX chains as it
/// needs; `false` (and the queue rewound) when the guest has too few buffers.
// hot path: no allocation; chains are tracked in a stack array.
fn write_frame(
    queue: &mut Queue,
    mem: &GuestMemoryMmap<()>,
    active: &Active,
    frame: &[u8],
) -> bool {
    write_frame_with(queue, mem, active.hdr_len, active.mergeable, frame)
}

fn write_frame_with(
    queue: &mut Queue,
    mem: &GuestMemoryMmap<()>,
    hdr_len: usize,
    mergeable: bool,
    frame: &[u8],
) -> bool {
    let start = queue.next_avail();
    let mut header = [0u8; 12];
    header[NUM_BUFFERS_OFFSET] = 1;
    let header = &header[..hdr_len];
    let total = header.len() + frame.len();
    let mut chains = [(0u16, 0u32); MAX_CHAINS_PER_FRAME];
    let mut nchains = 0;
    let mut written = 0usize;
    let mut num_buffers_at: Option<GuestAddress> = None;
    while written < total {
        let chain = match queue.pop_descriptor_chain(mem) {
            Some(c) if nchains < MAX_CHAINS_PER_FRAME => c,
            _ => {
                queue.set_next_avail(start);
                return false;
            }
        };
        let head = chain.head_index();
        let mut chain_len = 0u32;
        for desc in chain {
            if written == total {
                break;
            }
            if !desc.is_write_only() {
                queue.set_next_avail(start);
                return false;
            }
            let dlen = usize::try_from(desc.len()).unwrap_or(0);
            let mut off = 0usize;
            while off < dlen && written < total {
                let addr = desc.addr().unchecked_add(off as u64);
                let (src, copied) = if written < header.len() {
                    let part = &header[written..];
                    let n = part.len().min(dlen - off);
                    if written <= NUM_BUFFERS_OFFSET && NUM_BUFFERS_OFFSET + 2 <= written + n {
                        num_buffers_at =
                            Some(addr.unchecked_add((NUM_BUFFERS_OFFSET - written) as u64));
                    }
                    (&part[..n], n)
                } else {
                    let part = &frame[written - header.len()..];
                    let n = part.len().min(dlen - off);
                    (&part[..n], n)
                };
                if mem.write_slice(src, addr).is_err() {
                    queue.set_next_avail(start);
                    return false;
                }
                off += copied;
                written += copied;
                chain_len += u32::try_from(copied).unwrap_or(0);
            }
        }
        if let Some(slot) = chains.get_mut(nchains) {
            *slot = (head, chain_len);
        }
        nchains += 1;
        if !mergeable && written < total {
            // Without mergeable buffers the frame must fit one chain.
            queue.set_next_avail(start);
            return false;
        }
    }
    if mergeable && nchains > 1 {
        let Some(at) = num_buffers_at else {
            queue.set_next_avail(start);
            return false;
        };
        let count = u16::try_from(nchains).unwrap_or(1).to_le_bytes();
        if mem.write_slice(&count, at).is_err() {
            queue.set_next_avail(start);
            return false;
        }
    }
    for (head, len) in chains.iter().take(nchains) {
        if queue.add_used(mem, *head, *len).is_err() {
            return false;
        }
    }
    true
}

impl Port for VhostNetPort {
    fn name(&self) -> &str {
        &self.name
    }

    // hot path: one vring lock per batch, no allocation, at most one
    // notification; the wake eventfd is read only after a kick.
    fn rx_batch(&mut self, bufs: &mut [PacketBuf]) -> Result<usize, PortError> {
        self.refresh();
        if self.backlog.len > 0 {
            self.tx_batch(&[])?;
        }
        let n = self.pop_tx(bufs)?;
        if n > 0 {
            return Ok(n);
        }
        // Idle: consume the wake-up, then look again so a kick that raced
        // with the first look is not slept through.
        if self.shared.kicked.swap(false, Ordering::AcqRel) {
            let _ = self.shared.wake.read();
            self.refresh();
            return self.pop_tx(bufs);
        }
        Ok(0)
    }

    // hot path: one vring lock per batch, no allocation, at most one
    // notification.
    fn tx_batch(&mut self, bufs: &[PacketBuf]) -> Result<usize, PortError> {
        self.refresh();
        let Some(active) = &self.active else {
            return Ok(0);
        };
        let guard = active.mem.memory();
        let mem: &GuestMemoryMmap<()> = &guard;
        let mut state = active.rx.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return Ok(0);
        }
        // Held frames first, so the guest sees them in order.
        let mut written = self.backlog.drain(state.get_queue_mut(), mem, active);
        let mut accepted = 0;
        for buf in bufs {
            if self.backlog.len == 0 && write_frame(state.get_queue_mut(), mem, active, buf.frame())
            {
                written += 1;
            } else if !self.backlog.push(buf.frame()) {
                break;
            }
            accepted += 1;
        }
        if written > 0 {
            notify(&mut state, mem, &self.name)?;
        }
        Ok(accepted)
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.shared.wake.as_raw_fd())
    }

    fn take_rx_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.rx_dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// VRING_DESC_F_WRITE (2) at the descriptor flags width.
    const WRITE: u16 = 2;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const BUFS: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    /// `n` guest RX buffers of `size` bytes, one descriptor per chain.
    fn rx_chains(m: &GuestMemoryMmap<()>, n: u16, size: u32) -> Queue {
        let vq = MockSplitQueue::new(m, 256);
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    BUFS + u64::from(i) * 0x1000,
                    size,
                    WRITE,
                    0,
                ))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        vq.create_queue::<Queue>().unwrap()
    }

    fn used(q: &Queue, m: &GuestMemoryMmap<()>, i: u64) -> (u32, u32) {
        let base = q.used_ring() + 4 + i * 8;
        let id: u32 = m.read_obj(GuestAddress(base)).unwrap();
        let len: u32 = m.read_obj(GuestAddress(base + 4)).unwrap();
        (id, len)
    }

    #[test]
    fn mergeable_frame_spans_chains_and_counts_them() {
        let m = mem();
        let mut q = rx_chains(&m, 8, 64);
        let frame: Vec<u8> = (0..200u8).collect();
        assert!(write_frame_with(&mut q, &m, 12, true, &frame));
        // 12 + 200 bytes in 64-byte buffers: 4 chains.
        assert_eq!(q.next_used(), 4);
        assert_eq!(used(&q, &m, 0), (0, 64));
        assert_eq!(used(&q, &m, 3), (3, 20));
        let nb: u16 = m.read_obj(GuestAddress(BUFS + 10)).unwrap();
        assert_eq!(nb, 4, "num_buffers");
        let mut got = vec![0u8; 200];
        let mut at = 0;
        for i in 0..4u64 {
            let (skip, len) = if i == 0 {
                (12, 52)
            } else {
                (0, 64.min(200 - at))
            };
            m.read_slice(
                &mut got[at..at + len],
                GuestAddress(BUFS + i * 0x1000 + skip),
            )
            .unwrap();
            at += len;
        }
        assert_eq!(got, frame);
    }

    #[test]
    fn too_few_buffers_rewinds_and_writes_nothing() {
        let m = mem();
        let mut q = rx_chains(&m, 2, 64);
        assert!(!write_frame_with(&mut q, &m, 12, true, &[7u8; 200]));
        assert_eq!((q.next_avail(), q.next_used()), (0, 0));
        // Without mergeable buffers one chain must hold the whole frame.
        assert!(!write_frame_with(&mut q, &m, 12, false, &[7u8; 100]));
        assert_eq!(q.next_avail(), 0);
        assert!(write_frame_with(&mut q, &m, 12, false, &[7u8; 50]));
        assert_eq!(q.next_used(), 1);
        assert_eq!(used(&q, &m, 0), (0, 62));
    }

    #[test]
    fn tx_chain_is_read_without_header_and_bad_chains_are_refused() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        // Header alone, then the frame split over two descriptors.
        m.write_slice(&[0u8; 12], GuestAddress(BUFS)).unwrap();
        m.write_slice(&[1u8; 30], GuestAddress(BUFS + 0x1000))
            .unwrap();
        m.write_slice(&[2u8; 34], GuestAddress(BUFS + 0x2000))
            .unwrap();
        let chain = vq
            .build_desc_chain(&[
                RawDescriptor::from(SplitDescriptor::new(BUFS, 12, 0, 0)),
                RawDescriptor::from(SplitDescriptor::new(BUFS + 0x1000, 30, 0, 0)),
                RawDescriptor::from(SplitDescriptor::new(BUFS + 0x2000, 34, 0, 0)),
            ])
            .unwrap();
        let mut buf = PacketBuf::default();
        assert_eq!(read_chain(&m, chain, 12, &mut buf), Some(64));
        buf.len = 64;
        assert_eq!(&buf.frame()[..30], &[1u8; 30]);
        assert_eq!(&buf.frame()[30..], &[2u8; 34]);
        // A write-only descriptor in a TX chain, an address outside guest
        // memory, a frame larger than a buffer: refused, no panic.
        for desc in [
            SplitDescriptor::new(BUFS, 64, WRITE, 0),
            SplitDescriptor::new(0x20_0000 - 8, 64, 0, 0),
            SplitDescriptor::new(BUFS, 4096, 0, 0),
        ] {
            let chain = vq.build_desc_chain(&[RawDescriptor::from(desc)]).unwrap();
            assert_eq!(read_chain(&m, chain, 12, &mut buf), None, "{desc:?}");
        }
    }

    #[test]
    fn checksum_partial_tx_frame_is_completed() {
        use keel_dataplane::packet::checksum::{accumulate, finish};
        // Ethernet + IPv4 (20) + TCP (20) + payload, checksum computed in full.
        let mut frame = vec![0u8; 14 + 20 + 20 + 37];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45;
        frame[23] = 6;
        frame[26..30].copy_from_slice(&[10, 0, 1, 10]);
        frame[30..34].copy_from_slice(&[10, 0, 2, 10]);
        for (i, b) in frame[34..].iter_mut().enumerate() {
            *b = u8::try_from(i % 251).unwrap();
        }
        frame[34 + 16..34 + 18].fill(0);
        let tcp_len = u16::try_from(frame.len() - 34).unwrap();
        let mut pseudo = accumulate(0, &frame[26..34]);
        pseudo = accumulate(pseudo, &[0, 6]);
        pseudo = accumulate(pseudo, &tcp_len.to_be_bytes());
        let full = finish(accumulate(pseudo, &frame[34..]));
        // What a guest with VIRTIO_NET_F_CSUM sends: the folded pseudo-header sum.
        let folded = !finish(pseudo);
        frame[34 + 16..34 + 18].copy_from_slice(&folded.to_be_bytes());
        let mut header = [0u8; 12];
        header[0] = NEEDS_CSUM;
        header[6..8].copy_from_slice(&34u16.to_le_bytes());
        header[8..10].copy_from_slice(&16u16.to_le_bytes());

        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        m.write_slice(&header, GuestAddress(BUFS)).unwrap();
        m.write_slice(&frame, GuestAddress(BUFS + 12)).unwrap();
        let len = u32::try_from(12 + frame.len()).unwrap();
        let chain = vq
            .build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(BUFS, len, 0, 0))])
            .unwrap();
        let mut buf = PacketBuf::default();
        assert_eq!(read_chain(&m, chain, 12, &mut buf), Some(frame.len()));
        buf.len = frame.len();
        let got = u16::from_be_bytes([buf.frame()[50], buf.frame()[51]]);
        assert_eq!(got, full);

        // Offsets beyond the frame from a hostile guest: refused.
        header[8..10].copy_from_slice(&2000u16.to_le_bytes());
        m.write_slice(&header, GuestAddress(BUFS)).unwrap();
        let chain = vq
            .build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(BUFS, len, 0, 0))])
            .unwrap();
        assert_eq!(read_chain(&m, chain, 12, &mut buf), None);
    }
}
