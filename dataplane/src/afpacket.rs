//! AF_PACKET port with a TPACKET_V3 receive ring (veth and TAP interfaces).
//!
//! Receive: the kernel fills blocks of a memory-mapped ring and hands each
//! whole block to user space; we walk its frames without a syscall and give
//! the block back. Transmit: one `sendmmsg(2)` per batch (the TPACKET_V3 TX
//! ring would save a copy, but `sendmmsg` is simpler and still one syscall
//! per batch).
//!
//! Raw `libc`: no maintained crate offers a TPACKET_V3 ring with a sound API
//! (`afpacket` and `pnet_datalink` use V1/V2 or recvfrom). The ring layout
//! offsets below are from `<linux/if_packet.h>`.
//!
//! Checksum offload: a frame a namespace sends through veth with TX checksum
//! offload on arrives with an unfilled checksum (CHECKSUM_PARTIAL) and we have
//! no `PACKET_VNET_HDR` handling yet, so the endpoints must run
//! `ethtool -K <if> tx off` (the integration tests do).

// The casts here narrow kernel ABI constants and ring fields to the widths
// <linux/if_packet.h> gives them; all values fit.
#![allow(clippy::cast_possible_truncation)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, Ordering};

use crate::port::{PacketBuf, Port, PortError, BATCH};

const TPACKET_V3: libc::c_int = 2;
const BLOCK_SIZE: usize = 1 << 18;
const BLOCK_COUNT: usize = 16;
const FRAME_SIZE: usize = 2048;
/// Hand a partly filled block to us after 1 ms, bounding added latency.
const RETIRE_BLOCK_MS: u32 = 1;

// struct tpacket_block_desc: version u32, offset_to_priv u32, then
// tpacket_hdr_v1 { block_status u32, num_pkts u32, offset_to_first_pkt u32, ... }.
const BLOCK_STATUS: usize = 8;
const BLOCK_NUM_PKTS: usize = 12;
const BLOCK_FIRST_PKT: usize = 16;
// struct tpacket3_hdr.
const PKT_NEXT_OFFSET: usize = 0;
const PKT_SNAPLEN: usize = 12;
const PKT_LEN: usize = 16;
const PKT_STATUS: usize = 20;
const PKT_MAC: usize = 24;
const PKT_VLAN_TCI: usize = 32;
const PKT_VLAN_TPID: usize = 36;
/// sockaddr_ll follows the 48-byte tpacket3_hdr; sll_pkttype is at +10.
const PKT_SLL_PKTTYPE: usize = 48 + 10;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;
// <linux/if_packet.h> (not in the locked libc version).
const PACKET_FANOUT: libc::c_int = 18;
const PACKET_FANOUT_HASH: u32 = 0;
const PACKET_FANOUT_FLAG_UNIQUEID: u32 = 0x2000;

/// An AF_PACKET socket bound to one interface.
pub struct AfPacketPort {
    name: String,
    fd: OwnedFd,
    ring: *mut u8,
    ring_len: usize,
    block: usize,
    /// Frames left in the current block (0 = not yet owned).
    left: u32,
    /// Offset of the next frame inside the current block.
    offset: usize,
    rx_dropped: u64,
    iovecs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

// SAFETY: the ring pointer and the iovec/mmsghdr pointers refer to memory this
// struct owns (the mapping) or that is only referenced during one `tx_batch`
// call; nothing is shared between threads.
unsafe impl Send for AfPacketPort {}

fn setup_err(name: &str, step: &'static str) -> PortError {
    PortError::Setup {
        name: name.to_string(),
        step,
        source: io::Error::last_os_error(),
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, opt: libc::c_int, value: &T) -> bool {
    let len = libc::socklen_t::try_from(size_of::<T>()).unwrap_or(0);
    // SAFETY: `value` points to a live T of `len` bytes for the duration of the call.
    unsafe { libc::setsockopt(fd, level, opt, (value as *const T).cast(), len) == 0 }
}

impl AfPacketPort {
    /// Opens the interface `name` (which must exist in this namespace).
    pub fn open(name: &str) -> Result<AfPacketPort, PortError> {
        Self::open_inner(name, None).map(|(p, _)| p)
    }

    /// Opens `name` as one member of a `PACKET_FANOUT_HASH` group: the
    /// kernel spreads the interface's frames over the group's sockets (one
    /// per worker), every frame of a flow direction to the same socket.
    /// `group` `None` creates a group with a kernel-chosen unique id
    /// (`PACKET_FANOUT_FLAG_UNIQUEID`), returned for the other members.
    ///
    /// Why the hash mode: it keeps each direction of a flow on one socket,
    /// so frames a worker hands to the flow's owner ([`crate::handoff`])
    /// stay in order. It is not the steering itself: the kernel's hash has
    /// a per-boot seed and knows nothing of NAT, so [`crate::steer`] decides.
    pub fn open_fanout(name: &str, group: Option<u16>) -> Result<(AfPacketPort, u16), PortError> {
        Self::open_inner(name, Some(group))
    }

    fn open_inner(
        name: &str,
        fanout: Option<Option<u16>>,
    ) -> Result<(AfPacketPort, u16), PortError> {
        let eth_p_all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(eth_p_all),
            )
        };
        if raw < 0 {
            return Err(setup_err(name, "socket"));
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if !setsockopt(raw, libc::SOL_PACKET, libc::PACKET_VERSION, &TPACKET_V3) {
            return Err(setup_err(name, "PACKET_VERSION"));
        }
        let frames = u32::try_from(BLOCK_SIZE * BLOCK_COUNT / FRAME_SIZE).unwrap_or(0);
        let req = libc::tpacket_req3 {
            tp_block_size: BLOCK_SIZE as u32,
            tp_block_nr: BLOCK_COUNT as u32,
            tp_frame_size: FRAME_SIZE as u32,
            tp_frame_nr: frames,
            tp_retire_blk_tov: RETIRE_BLOCK_MS,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        if !setsockopt(raw, libc::SOL_PACKET, libc::PACKET_RX_RING, &req) {
            return Err(setup_err(name, "PACKET_RX_RING"));
        }
        let ring_len = BLOCK_SIZE * BLOCK_COUNT;
        // SAFETY: maps the ring the kernel just allocated for this socket.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(setup_err(name, "mmap"));
        }
        let mut port = AfPacketPort {
            name: name.to_string(),
            fd,
            ring: ring.cast(),
            ring_len,
            block: 0,
            left: 0,
            offset: 0,
            rx_dropped: 0,
            iovecs: Vec::with_capacity(BATCH),
            msgs: Vec::with_capacity(BATCH),
        };
        // Our own transmissions would otherwise come back on the ring (kernel ≥ 4.20;
        // older kernels are covered by the PACKET_OUTGOING check in rx_batch).
        let _ = setsockopt(raw, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &1i32);
        let cname = CString::new(name).map_err(|_| PortError::Setup {
            name: name.to_string(),
            step: "interface name",
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: cname is a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(setup_err(name, "if_nametoindex"));
        }
        let ifindex = i32::try_from(ifindex).unwrap_or(0);
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = eth_p_all;
        sll.sll_ifindex = ifindex;
        let sll_len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).unwrap_or(0);
        // SAFETY: sll is a valid sockaddr_ll of sll_len bytes.
        if unsafe { libc::bind(raw, (&sll as *const libc::sockaddr_ll).cast(), sll_len) } != 0 {
            return Err(setup_err(name, "bind"));
        }
        let mut group = 0;
        if let Some(g) = fanout {
            let (id, flags) = match g {
                Some(id) => (id, 0),
                None => (0, PACKET_FANOUT_FLAG_UNIQUEID),
            };
            let arg: u32 = u32::from(id) | ((PACKET_FANOUT_HASH | flags) << 16);
            if !setsockopt(raw, libc::SOL_PACKET, PACKET_FANOUT, &arg) {
                return Err(setup_err(name, "PACKET_FANOUT"));
            }
            let mut got: u32 = 0;
            let mut len = libc::socklen_t::try_from(size_of::<u32>()).unwrap_or(0);
            // SAFETY: `got` is a live u32 of `len` bytes for the kernel to fill.
            let r = unsafe {
                libc::getsockopt(
                    raw,
                    libc::SOL_PACKET,
                    PACKET_FANOUT,
                    (&mut got as *mut u32).cast(),
                    &mut len,
                )
            };
            if r != 0 {
                return Err(setup_err(name, "get PACKET_FANOUT"));
            }
            group = (got & 0xffff) as u16;
        }
        // Promiscuous: VM MACs are not the interface's own (veth has no filter, TAP/NICs do).
        // SAFETY: packet_mreq is plain data; all-zero is a valid value.
        let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mreq.mr_ifindex = ifindex;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        if !setsockopt(raw, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq) {
            return Err(setup_err(name, "PACKET_ADD_MEMBERSHIP"));
        }
        port.iovecs.resize(
            BATCH,
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
        );
        // SAFETY: mmsghdr is plain data; all-zero is a valid value.
        port.msgs.resize(BATCH, unsafe { std::mem::zeroed() });
        Ok((port, group))
    }

    fn block_ptr(&self) -> *mut u8 {
        // SAFETY: block < BLOCK_COUNT, so the offset stays inside the mapping.
        unsafe { self.ring.add(self.block * BLOCK_SIZE) }
    }

    fn read_u32(&self, offset: usize) -> u32 {
        debug_assert!(offset + 4 <= BLOCK_SIZE);
        // SAFETY: callers keep offset + 4 within the current block; the ring is
        // shared with the kernel, hence volatile and unaligned-safe reads.
        u32::from_ne_bytes(unsafe {
            std::ptr::read_volatile(self.block_ptr().add(offset).cast::<[u8; 4]>())
        })
    }

    fn release_block(&mut self) {
        fence(Ordering::Release);
        // SAFETY: the status word lies inside the current block; writing
        // TP_STATUS_KERNEL hands the block back to the kernel.
        unsafe {
            std::ptr::write_volatile(
                self.block_ptr().add(BLOCK_STATUS).cast::<u32>(),
                libc::TP_STATUS_KERNEL,
            )
        };
        self.block = (self.block + 1) % BLOCK_COUNT;
        self.left = 0;
    }
}

impl Port for AfPacketPort {
    fn name(&self) -> &str {
        &self.name
    }

    // hot path: no syscall; copies each frame out of the ring into a pool buffer.
    fn rx_batch(&mut self, bufs: &mut [PacketBuf]) -> Result<usize, PortError> {
        let mut n = 0;
        while n < bufs.len() {
            if self.left == 0 {
                if self.read_u32(BLOCK_STATUS) & libc::TP_STATUS_USER == 0 {
                    break;
                }
                fence(Ordering::Acquire);
                self.left = self.read_u32(BLOCK_NUM_PKTS);
                self.offset = self.read_u32(BLOCK_FIRST_PKT) as usize;
                if self.left == 0 {
                    self.release_block();
                    continue;
                }
            }
            // A frame header must lie inside the block; anything else means a
            // corrupt block, which we skip whole.
            if self
                .offset
                .checked_add(PKT_SLL_PKTTYPE + 2)
                .is_none_or(|end| end > BLOCK_SIZE)
            {
                self.release_block();
                continue;
            }
            let next = self.read_u32(self.offset + PKT_NEXT_OFFSET) as usize;
            let snaplen = self.read_u32(self.offset + PKT_SNAPLEN) as usize;
            let wire_len = self.read_u32(self.offset + PKT_LEN) as usize;
            let status = self.read_u32(self.offset + PKT_STATUS);
            let mac = (self.read_u32(self.offset + PKT_MAC) & 0xffff) as usize;
            let tci = self.read_u32(self.offset + PKT_VLAN_TCI) & 0xffff;
            let tpid = self.read_u32(self.offset + PKT_VLAN_TPID) & 0xffff;
            let pkttype = (self.read_u32(self.offset + PKT_SLL_PKTTYPE - 2) >> 16) as u8;
            let start = self.offset + mac;
            let in_block = start
                .checked_add(snaplen)
                .is_some_and(|end| end <= BLOCK_SIZE);
            if pkttype != libc::PACKET_OUTGOING && in_block {
                // SAFETY: [start, start + snaplen) is inside the current block,
                // which the kernel handed to us (TP_STATUS_USER) and won't touch
                // until we release it.
                let frame =
                    unsafe { std::slice::from_raw_parts(self.block_ptr().add(start), snaplen) };
                let vlan = status & libc::TP_STATUS_VLAN_VALID != 0;
                let tpid = if status & TP_STATUS_VLAN_TPID_VALID != 0 {
                    tpid as u16
                } else {
                    0x8100
                };
                let ok = snaplen == wire_len
                    && bufs.get_mut(n).is_some_and(|b| {
                        if vlan && frame.len() >= 12 {
                            // The kernel stripped the 802.1Q tag into metadata; put it back.
                            let buf = b.buffer_mut();
                            let total = frame.len() + 4;
                            match buf.get_mut(..total) {
                                Some(dst) => {
                                    dst[..12].copy_from_slice(&frame[..12]);
                                    dst[12..14].copy_from_slice(&tpid.to_be_bytes());
                                    dst[14..16].copy_from_slice(&(tci as u16).to_be_bytes());
                                    dst[16..].copy_from_slice(&frame[12..]);
                                    b.len = total;
                                    true
                                }
                                None => false,
                            }
                        } else {
                            b.set(frame)
                        }
                    });
                if ok {
                    n += 1;
                } else {
                    self.rx_dropped += 1;
                }
            }
            self.left -= 1;
            if self.left == 0 {
                self.release_block();
            } else {
                self.offset += next;
            }
        }
        Ok(n)
    }

    // hot path: one sendmmsg(2) per batch; the header arrays are pre-allocated.
    fn tx_batch(&mut self, bufs: &[PacketBuf]) -> Result<usize, PortError> {
        let mut sent = 0;
        for chunk in bufs.chunks(BATCH) {
            for ((iov, msg), b) in self.iovecs.iter_mut().zip(self.msgs.iter_mut()).zip(chunk) {
                let frame = b.frame();
                *iov = libc::iovec {
                    iov_base: frame.as_ptr().cast_mut().cast(),
                    iov_len: frame.len(),
                };
                msg.msg_hdr.msg_iov = iov;
                msg.msg_hdr.msg_iovlen = 1;
                msg.msg_len = 0;
            }
            let count = u32::try_from(chunk.len()).unwrap_or(0);
            // SAFETY: msgs[..count] point to iovecs that point into `bufs`, all
            // alive for the duration of the call; the kernel only reads them.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    self.msgs.as_mut_ptr(),
                    count,
                    libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock || sent > 0 {
                    return Ok(sent);
                }
                return Err(PortError::Transmit {
                    name: self.name.clone(),
                    source: e,
                });
            }
            let r = usize::try_from(r).unwrap_or(0);
            sent += r;
            if r < chunk.len() {
                break;
            }
        }
        Ok(sent)
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn take_rx_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.rx_dropped)
    }
}

impl Drop for AfPacketPort {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping created in `open`; nothing refers to it afterwards.
        unsafe { libc::munmap(self.ring.cast(), self.ring_len) };
    }
}
