//! The run-to-completion worker: polls its ports in batches, runs each frame
//! through the pipeline and hands the results to the output ports' transmit
//! queues, flushed once per received batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;

use crate::counters::{DropReason, LocalPortCounters, Outcome, Stats};
use crate::flowcache::{self, FlowCache};
use crate::mirror::{erspan_header, MirrorState, MirrorTables, Tap, Target};
use crate::pipeline::{process, Learned, NoTrace, Verdict};
use crate::port::{PacketBuf, Port, BATCH};
use crate::tables::Tables;

/// Learned MACs per worker; the table is allocated once at this size.
pub const LEARNED_MACS: usize = 16 * 1024;
/// Tracked connections per worker; the table is allocated once at this size
/// (about 300 bytes each, see `keel bench dataplane`).
pub const CONNECTIONS: usize = 64 * 1024;
/// Transmit queue depth per port: a flood can put one frame of every received
/// frame on each port, so one batch always fits.
const TX_DEPTH: usize = BATCH;
/// Idle wait when no port had traffic (bounds the latency of a stop request).
const IDLE_POLL_MS: i32 = 10;

struct TxQueue {
    bufs: Vec<PacketBuf>,
    len: usize,
}

/// One worker thread's state: its ports, buffers, counters and learned MACs.
pub struct Worker {
    ports: Vec<Box<dyn Port>>,
    tables: Arc<ArcSwap<Tables>>,
    stats: Arc<Stats>,
    rx: Vec<PacketBuf>,
    tx: Vec<TxQueue>,
    learned: Learned,
    local: Vec<LocalPortCounters>,
    outcomes: [u64; Outcome::COUNT],
    pollfds: Vec<libc::pollfd>,
    mirror: MirrorState,
    /// `None` when the flow cache is switched off.
    cache: Option<FlowCache>,
    /// The frame's bytes past the cache key, kept on a cache miss to check the
    /// slow path left them alone (allocated once, buffer sized).
    tail: Vec<u8>,
}

impl Worker {
    /// A worker owning `ports`; port `i` is interface index `i` of the tables.
    /// All buffers are allocated here, none later.
    pub fn new(
        ports: Vec<Box<dyn Port>>,
        tables: Arc<ArcSwap<Tables>>,
        stats: Arc<Stats>,
    ) -> Worker {
        let pollfds = ports
            .iter()
            .filter_map(|p| p.poll_fd())
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        Worker {
            tx: ports
                .iter()
                .map(|_| TxQueue {
                    bufs: (0..TX_DEPTH).map(|_| PacketBuf::default()).collect(),
                    len: 0,
                })
                .collect(),
            local: vec![LocalPortCounters::default(); ports.len()],
            ports,
            tables,
            stats,
            rx: (0..BATCH).map(|_| PacketBuf::default()).collect(),
            learned: Learned::new(LEARNED_MACS).with_connections(CONNECTIONS),
            outcomes: [0; Outcome::COUNT],
            pollfds,
            mirror: MirrorState::default(),
            cache: Some(FlowCache::new(flowcache::DEFAULT_ENTRIES)),
            tail: vec![0; PacketBuf::default().buffer_mut().len()],
        }
    }

    /// Switches the flow cache off (`0`) or sizes it to `entries`.
    pub fn with_flow_cache(mut self, entries: usize) -> Worker {
        self.cache = (entries > 0).then(|| FlowCache::new(entries));
        self
    }

    /// Replaces the connection table with one of `connections` entries
    /// (benchmarks size it to their flow count).
    pub fn with_connections(mut self, connections: usize) -> Worker {
        self.learned = Learned::new(LEARNED_MACS).with_connections(connections);
        self
    }

    /// Bytes per tracked connection of this worker's table.
    pub fn conntrack_bytes_per_connection(&self) -> usize {
        self.learned.stateful.ct.bytes_per_connection()
    }

    /// One round over every port; returns the number of frames received.
    // hot path: no allocation, no lock; one rx and at most one tx call per port per batch.
    pub fn poll_once(&mut self) -> usize {
        let Worker {
            ports,
            tables,
            stats,
            rx,
            tx,
            learned,
            local,
            outcomes,
            mirror,
            cache,
            tail,
            ..
        } = self;
        let tables = tables.load();
        learned.sync(tables.generation);
        mirror.sync(tables.generation);
        if let Some(c) = cache.as_mut() {
            c.sync(&tables, learned.version());
        }
        let mirrors = &tables.mirror;
        crate::stateful::serve_flush(stats, &mut learned.stateful);
        let mut total = 0;
        for i in 0..ports.len() {
            let Some(port) = ports.get_mut(i) else { break };
            let n = port.rx_batch(rx).unwrap_or(0);
            let dropped = port.take_rx_dropped();
            let in_port = u16::try_from(i).unwrap_or(u16::MAX);
            if let Some(c) = local.get_mut(i) {
                c.drops[DropReason::Oversize.index()] += dropped;
            }
            if n == 0 {
                continue;
            }
            total += n;
            for buf in rx.iter_mut().take(n) {
                if let Some(c) = local.get_mut(i) {
                    c.rx_packets += 1;
                    c.rx_bytes += buf.len as u64;
                }
                if let Some(taps) = mirrors.rx.get(i).filter(|t| !t.is_empty()) {
                    mirror_copies(mirrors, taps, buf.frame(), true, ports, tx, local, mirror);
                }
                let (data, len) = buf.parts_mut();
                let d = match cache.as_mut() {
                    None => process(&tables, learned, in_port, data, len, &mut NoTrace),
                    Some(c) => match c.lookup(in_port, data, *len) {
                        Ok(d) => d,
                        Err(miss) => {
                            let d = cached_slow_path(
                                c, miss, &tables, learned, in_port, data, len, tail,
                            );
                            c.sync(&tables, learned.version());
                            d
                        }
                    },
                };
                if let Some(o) = d.outcome {
                    outcomes[o.index()] += 1;
                }
                if d.learned {
                    outcomes[Outcome::MacLearned.index()] += 1;
                }
                let frame = buf.frame();
                match d.verdict {
                    Verdict::Drop(reason) => {
                        if let Some(c) = local.get_mut(i) {
                            c.drops[reason.index()] += 1;
                        }
                    }
                    Verdict::Unicast { port } => {
                        let out = usize::from(port);
                        enqueue(ports, tx, local, out, &[], frame);
                        if let Some(taps) = mirrors.tx.get(out).filter(|t| !t.is_empty()) {
                            mirror_copies(mirrors, taps, frame, false, ports, tx, local, mirror);
                        }
                    }
                    Verdict::Reply => {
                        enqueue(ports, tx, local, i, &[], frame);
                        if let Some(taps) = mirrors.tx.get(i).filter(|t| !t.is_empty()) {
                            mirror_copies(mirrors, taps, frame, false, ports, tx, local, mirror);
                        }
                    }
                    Verdict::Flood { switch, except } => {
                        let Some(sw) = tables.switches.get(switch as usize) else {
                            continue;
                        };
                        // Never back out the ingress interface, and once per interface.
                        let mut sent: u64 = 1 << (i % 64);
                        for m in sw.members.iter().filter(|m| **m != except) {
                            let Some(lp) = tables.lports.get(*m as usize) else {
                                continue;
                            };
                            let bit = 1u64 << (lp.port % 64);
                            if sent & bit == 0 {
                                sent |= bit;
                                let out = usize::from(lp.port);
                                enqueue(ports, tx, local, out, &[], frame);
                                if let Some(taps) = mirrors.tx.get(out).filter(|t| !t.is_empty()) {
                                    mirror_copies(
                                        mirrors, taps, frame, false, ports, tx, local, mirror,
                                    );
                                }
                            }
                        }
                    }
                }
            }
            for out in 0..tx.len() {
                flush(ports, tx, local, out);
            }
        }
        stats.fold(local, outcomes);
        if let Some(c) = cache.as_mut() {
            stats.fold_flow_cache(&mut c.counters);
        }
        learned.qos.fold(&tables.qos);
        learned.policy.fold(&tables.policies);
        mirror.fold(mirrors);
        let ct = &mut learned.stateful.ct;
        let entries = ct.len();
        stats.fold_conntrack(&mut ct.counters, entries);
        total
    }

    /// Polls until `stop` is set, sleeping in `poll(2)` while idle.
    pub fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            if self.poll_once() == 0 {
                self.idle();
            }
        }
    }

    fn idle(&mut self) {
        if self.pollfds.is_empty() {
            std::thread::yield_now();
            return;
        }
        let n = libc::nfds_t::try_from(self.pollfds.len()).unwrap_or(0);
        // SAFETY: pollfds is a live, correctly sized array of pollfd for the call.
        unsafe { libc::poll(self.pollfds.as_mut_ptr(), n, IDLE_POLL_MS) };
    }

    /// Starts the worker on its own thread.
    pub fn spawn(self, stop: Arc<AtomicBool>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("keel-dp-worker".into())
            .spawn(move || self.run(&stop))
    }
}

/// Runs the pipeline on a cache miss and stores the result when it can be
/// replayed exactly (see [`crate::flowcache`]).
// hot path (misses): one copy of the frame's tail to prove it unchanged.
#[allow(clippy::too_many_arguments)]
fn cached_slow_path(
    c: &mut FlowCache,
    miss: Option<flowcache::Miss>,
    tables: &crate::tables::Tables,
    learned: &mut Learned,
    in_port: u16,
    data: &mut [u8],
    len: &mut usize,
    tail: &mut [u8],
) -> crate::pipeline::Decision {
    let Some(miss) = miss else {
        return process(tables, learned, in_port, data, len, &mut NoTrace);
    };
    let in_len = *len;
    let keyed = in_len.min(flowcache::KEY_BYTES);
    let saved = match (data.get(keyed..in_len), tail.get_mut(..in_len - keyed)) {
        (Some(src), Some(dst)) => {
            dst.copy_from_slice(src);
            true
        }
        _ => false,
    };
    let d = process(tables, learned, in_port, data, len, &mut NoTrace);
    let unchanged =
        saved && *len == in_len && data.get(keyed..in_len) == tail.get(..in_len - keyed);
    if let Some(out) = data.get(..*len) {
        c.insert(&miss, &d, out, unchanged);
    }
    d
}

/// Queues `prefix` + `frame` for interface `out`; `false` when it did not fit a buffer.
fn enqueue(
    ports: &mut [Box<dyn Port>],
    tx: &mut [TxQueue],
    local: &mut [LocalPortCounters],
    out: usize,
    prefix: &[u8],
    frame: &[u8],
) -> bool {
    let full = tx.get(out).is_some_and(|q| q.len == q.bufs.len());
    if full {
        flush(ports, tx, local, out);
    }
    if let Some(q) = tx.get_mut(out) {
        if let Some(b) = q.bufs.get_mut(q.len) {
            if b.set_prefixed(prefix, frame) {
                q.len += 1;
                return true;
            }
        }
    }
    false
}

/// Sends the copies of `frame` its interface's taps select ([`crate::mirror`]).
/// `out`: the frame was received from the port (else it is delivered to it).
// hot path (interfaces with taps only): one copy per selecting session.
#[allow(clippy::too_many_arguments)]
fn mirror_copies(
    m: &MirrorTables,
    taps: &[Tap],
    frame: &[u8],
    out: bool,
    ports: &mut [Box<dyn Port>],
    tx: &mut [TxQueue],
    local: &mut [LocalPortCounters],
    st: &mut MirrorState,
) {
    for tap in taps {
        let Some(s) = m.selects(tap, frame, out) else {
            continue;
        };
        let ok = match s.target {
            Target::Port(p) => enqueue(ports, tx, local, usize::from(p), &[], frame),
            Target::Erspan { port, template } => {
                let seq = st.next_seq(tap.session);
                let tagged = frame.get(12..14) == Some(&[0x81, 0x00]);
                let h = erspan_header(&template, frame.len(), seq, tagged);
                enqueue(ports, tx, local, usize::from(port), &h, frame)
            }
        };
        st.count(tap.session, frame.len(), ok);
    }
}

fn flush(
    ports: &mut [Box<dyn Port>],
    tx: &mut [TxQueue],
    local: &mut [LocalPortCounters],
    out: usize,
) {
    let (Some(q), Some(port), Some(c)) = (tx.get_mut(out), ports.get_mut(out), local.get_mut(out))
    else {
        return;
    };
    if q.len == 0 {
        return;
    }
    let frames = q.bufs.get(..q.len).unwrap_or(&[]);
    let sent = port.tx_batch(frames).unwrap_or(0).min(q.len);
    for b in frames.iter().take(sent) {
        c.tx_packets += 1;
        c.tx_bytes += b.len as u64;
    }
    c.drops[DropReason::TxFailed.index()] += (q.len - sent) as u64;
    q.len = 0;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::config::ConfigHandle;
    use crate::packet::build::icmp_echo;
    use crate::port::MemPort;
    use crate::testutil::{interfaces, topology};

    #[test]
    fn worker_switches_floods_routes_and_counts() {
        let handle = ConfigHandle::new(interfaces());
        handle.apply(topology()).unwrap();
        let vm1 = [2, 0, 0, 0, 0, 1];
        let frames = vec![
            icmp_echo(
                [2, 0, 0, 0, 0, 2],
                vm1,
                "10.0.1.10".parse().unwrap(),
                "10.0.1.11".parse().unwrap(),
                64,
                b"x",
            ),
            icmp_echo(
                [0xff; 6],
                vm1,
                "10.0.1.10".parse().unwrap(),
                "10.0.1.255".parse().unwrap(),
                64,
                b"x",
            ),
            icmp_echo(
                [2, 0, 0, 0, 0xff, 1],
                vm1,
                "10.0.1.10".parse().unwrap(),
                "10.0.2.10".parse().unwrap(),
                64,
                b"x",
            ),
            icmp_echo(
                [2, 0, 0, 0, 0, 2],
                [2, 0, 0, 0, 0, 0x66],
                "10.0.1.10".parse().unwrap(),
                "10.0.1.11".parse().unwrap(),
                64,
                b"x",
            ),
        ];
        // 100 rounds of the 4 frames: more than one batch, so queues wrap.
        let ports: Vec<MemPort> = interfaces()
            .iter()
            .enumerate()
            .map(|(i, n)| {
                if i == 0 {
                    MemPort::generator(n, frames.clone(), 400)
                } else {
                    MemPort::sink(n).capturing()
                }
            })
            .collect();
        let sinks: Vec<_> = ports.iter().map(MemPort::counters).collect();
        let ports: Vec<Box<dyn Port>> = ports
            .into_iter()
            .map(|p| Box::new(p) as Box<dyn Port>)
            .collect();
        let stats = Arc::new(Stats::new(&interfaces()));
        let mut w = Worker::new(ports, handle.tables(), Arc::clone(&stats));
        while w.poll_once() > 0 {}
        let sent = |i: usize| sinks[i].packets.load(Ordering::Relaxed);
        // p1 (vm2): unicast + flood; p2 (vm3): routed; uplink: flood only; p3 other switch: nothing.
        assert_eq!(
            (sent(0), sent(1), sent(2), sent(3), sent(4)),
            (0, 200, 100, 0, 100)
        );
        let routed = sinks[2].captured.lock().unwrap();
        assert!(routed.iter().all(|f| f[22] == 63), "TTL decremented");
        let snap = stats.snapshot();
        let p0 = snap.port("p0").unwrap();
        assert_eq!(p0.rx_packets, 400);
        assert_eq!(p0.drops.get("spoofed_mac"), Some(&100));
        assert_eq!(snap.port("p2").unwrap().tx_packets, 100);
        assert_eq!(snap.outcomes["routed"], 100);
        assert_eq!(snap.outcomes["l2_flood"], 100);
        assert_eq!(snap.outcomes["l2_unicast"], 100);
    }
}
