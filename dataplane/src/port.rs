//! The port seam: what the engine needs from any packet I/O backend
//! (AF_PACKET here, vhost-user-net in keel-vhost; DPDK later), plus the
//! in-memory generator/sink port used by benchmarks and engine tests.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes per packet buffer: a 1500-byte MTU frame plus a VLAN tag, with room
/// for in-place rewrites (tag push, ICMP error) to grow it.
pub const BUF_SIZE: usize = 2048;
/// Frames per poll of one port.
pub const BATCH: usize = 32;

/// One pre-allocated packet buffer.
pub struct PacketBuf {
    data: Box<[u8]>,
    /// Frame length within `data`.
    pub len: usize,
}

impl Default for PacketBuf {
    fn default() -> Self {
        PacketBuf {
            data: vec![0; BUF_SIZE].into_boxed_slice(),
            len: 0,
        }
    }
}

impl PacketBuf {
    /// The frame.
    pub fn frame(&self) -> &[u8] {
        self.data.get(..self.len).unwrap_or(&[])
    }

    /// The whole buffer, for backends writing a frame and for in-place rewrites.
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// The buffer and the length together (the pipeline rewrites both).
    pub fn parts_mut(&mut self) -> (&mut [u8], &mut usize) {
        (&mut self.data, &mut self.len)
    }

    /// Copies `prefix` then `frame` in (an encapsulation header and the
    /// frame); `false` (and unchanged) when they do not fit.
    pub fn set_prefixed(&mut self, prefix: &[u8], frame: &[u8]) -> bool {
        let n = prefix.len();
        match self.data.get_mut(..n + frame.len()) {
            Some(dst) => {
                dst[..n].copy_from_slice(prefix);
                dst[n..].copy_from_slice(frame);
                self.len = n + frame.len();
                true
            }
            None => false,
        }
    }

    /// Copies `frame` in; `false` (and unchanged) when it does not fit.
    pub fn set(&mut self, frame: &[u8]) -> bool {
        match self.data.get_mut(..frame.len()) {
            Some(dst) => {
                dst.copy_from_slice(frame);
                self.len = frame.len();
                true
            }
            None => false,
        }
    }
}

/// Why a port operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("Interface {name:?}: {step} failed")]
    Setup {
        name: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("Interface {name:?}: receive failed")]
    Receive {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Interface {name:?}: transmit failed")]
    Transmit {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// A packet I/O backend owned by one worker.
pub trait Port: Send {
    /// Interface name (what the desired state's `interface` refers to).
    fn name(&self) -> &str;
    /// Fills up to `bufs.len()` buffers with received frames; returns how many.
    /// Must not block.
    fn rx_batch(&mut self, bufs: &mut [PacketBuf]) -> Result<usize, PortError>;
    /// Sends the frames; returns how many were accepted. At most one syscall.
    fn tx_batch(&mut self, bufs: &[PacketBuf]) -> Result<usize, PortError>;
    /// A descriptor that becomes readable when frames arrive, for idle waits.
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }
    /// Frames the backend had to drop since the last call (e.g. larger than a buffer).
    fn take_rx_dropped(&mut self) -> u64 {
        0
    }
}

/// What a [`MemPort`] has sent, readable from other threads.
#[derive(Debug, Default)]
pub struct SinkCounters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Copies of sent frames, kept only when capturing (tests).
    pub captured: Mutex<Vec<Vec<u8>>>,
}

/// In-memory port: replays template frames on receive (a generator) and
/// counts what it is asked to send (a sink).
pub struct MemPort {
    name: String,
    frames: Vec<Vec<u8>>,
    next: usize,
    /// Frames still to generate.
    remaining: u64,
    sink: Arc<SinkCounters>,
    capture: bool,
}

impl MemPort {
    /// A port generating `count` frames cycling through `frames`.
    pub fn generator(name: &str, frames: Vec<Vec<u8>>, count: u64) -> MemPort {
        MemPort {
            name: name.into(),
            frames,
            next: 0,
            remaining: count,
            sink: Arc::default(),
            capture: false,
        }
    }

    /// A port that generates nothing and counts what it sends.
    pub fn sink(name: &str) -> MemPort {
        MemPort::generator(name, Vec::new(), 0)
    }

    /// Also keep copies of sent frames (allocates per frame: tests only).
    pub fn capturing(mut self) -> MemPort {
        self.capture = true;
        self
    }

    /// Counters shared with the port.
    pub fn counters(&self) -> Arc<SinkCounters> {
        Arc::clone(&self.sink)
    }

    /// Frames left to generate.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }
}

impl Port for MemPort {
    fn name(&self) -> &str {
        &self.name
    }

    // hot path: one memcpy per frame, no allocation.
    fn rx_batch(&mut self, bufs: &mut [PacketBuf]) -> Result<usize, PortError> {
        if self.frames.is_empty() {
            return Ok(0);
        }
        let mut n = 0;
        for buf in bufs.iter_mut() {
            if self.remaining == 0 {
                break;
            }
            let frame = self.frames.get(self.next).map_or(&[][..], Vec::as_slice);
            if buf.set(frame) {
                n += 1;
            }
            self.next = if self.next + 1 == self.frames.len() {
                0
            } else {
                self.next + 1
            };
            self.remaining -= 1;
        }
        Ok(n)
    }

    // hot path: counts only (unless capturing for a test).
    fn tx_batch(&mut self, bufs: &[PacketBuf]) -> Result<usize, PortError> {
        let bytes: usize = bufs.iter().map(|b| b.len).sum();
        self.sink
            .packets
            .fetch_add(bufs.len() as u64, Ordering::Relaxed);
        self.sink.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if self.capture {
            let mut captured = self.sink.captured.lock().unwrap_or_else(|e| e.into_inner());
            captured.extend(bufs.iter().map(|b| b.frame().to_vec()));
        }
        Ok(bufs.len())
    }
}
