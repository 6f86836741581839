//! The run-to-completion worker: polls its ports in batches, runs each frame
//! through the pipeline and hands the results to the output ports' transmit
//! queues, flushed once per received batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;

use crate::counters::{DropReason, LocalPortCounters, Outcome, Stats};
use crate::fastmap::mac_key;
use crate::flowcache::{self, FlowCache};
use crate::handoff::{Fabric, Handed, LANE_DEPTH};
use crate::lb4::{ProbeKind, ProbeTarget};
use crate::lb4_health::{build_probe, probe_port, PROBE_LEN};
use crate::mirror::{erspan_header, MirrorState, MirrorTables, Tap, Target};
use crate::pipeline::{process, process_from_tunnel, strip_tunnel, Learned, NoTrace, Verdict};
use crate::port::{PacketBuf, Port, BATCH};
use crate::steer::Shard;
use crate::tables::Tables;

/// Learned MACs per worker; the table is allocated once at this size.
pub const LEARNED_MACS: usize = 16 * 1024;
/// Tracked connections per worker; the table is allocated once at this size
/// (about 300 bytes each, see `keel bench dataplane`).
pub const CONNECTIONS: usize = 64 * 1024;
/// Transmit queue depth per port: a flood can put one frame of every received
/// frame on each port, so one batch always fits.
const TX_DEPTH: usize = BATCH;
/// With several workers, busy rounds between folds of the private counters
/// into the shared atomics (an idle round always folds; a sole worker folds
/// every round): the shared lines bounce between cores, so they are touched
/// once per this many batches, not once per batch.
pub const FOLD_ROUNDS: u32 = 16;
/// Handed-over frames taken from one lane per round.
const LANE_DRAIN: usize = LANE_DEPTH / 4;
/// Flow-cache key "interface" of frames out of a tunnel: this plus their
/// tunnel port, beyond every real interface index
/// ([`crate::config::MAX_INTERFACES`]).
const TUNNEL_KEY_BASE: u16 = 64;
/// Idle wait when no port had traffic (bounds the latency of a stop request).
const IDLE_POLL_MS: i32 = 10;

struct TxQueue {
    bufs: Vec<PacketBuf>,
    len: usize,
}

/// A worker's forwarding state: what one frame's processing touches.
struct Core {
    ports: Vec<Box<dyn Port>>,
    tx: Vec<TxQueue>,
    learned: Learned,
    local: Vec<LocalPortCounters>,
    outcomes: [u64; Outcome::COUNT],
    mirror: MirrorState,
    /// `None` when the flow cache is switched off.
    cache: Option<FlowCache>,
    /// The frame's bytes past the cache key, kept on a cache miss to check the
    /// slow path left them alone (allocated once, buffer sized).
    tail: Vec<u8>,
    /// Frames this worker ran through the pipeline, handed to others,
    /// received from others and dropped because a lane was full.
    processed: u64,
    handed_off: u64,
    handed_in: u64,
    handoff_full: u64,
    /// Busy rounds since the last fold.
    unfolded: u32,
    probes: Probes,
}

/// Health-monitor rounds this worker has seen, and the probe it builds.
struct Probes {
    generation: u64,
    /// Per monitored load balancer of `generation`: its last round.
    seen: Vec<u64>,
    frame: [u8; PROBE_LEN],
}

/// One worker thread's state: its ports, buffers, counters and learned MACs.
pub struct Worker {
    core: Core,
    tables: Arc<ArcSwap<Tables>>,
    stats: Arc<Stats>,
    rx: Vec<PacketBuf>,
    pollfds: Vec<libc::pollfd>,
    shard: Shard,
    fabric: Arc<Fabric>,
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
            core: Core {
                tx: ports
                    .iter()
                    .map(|_| TxQueue {
                        bufs: (0..TX_DEPTH).map(|_| PacketBuf::default()).collect(),
                        len: 0,
                    })
                    .collect(),
                local: vec![LocalPortCounters::default(); ports.len()],
                ports,
                learned: Learned::new(LEARNED_MACS).with_connections(CONNECTIONS),
                outcomes: [0; Outcome::COUNT],
                mirror: MirrorState::default(),
                cache: Some(FlowCache::new(flowcache::DEFAULT_ENTRIES)),
                tail: vec![0; PacketBuf::default().buffer_mut().len()],
                processed: 0,
                handed_off: 0,
                handed_in: 0,
                handoff_full: 0,
                unfolded: 0,
                probes: Probes {
                    generation: 0,
                    seen: Vec::with_capacity(64),
                    frame: [0; PROBE_LEN],
                },
            },
            tables,
            stats,
            rx: (0..BATCH).map(|_| PacketBuf::default()).collect(),
            pollfds,
            shard: Shard::SOLE,
            fabric: Fabric::new(1),
        }
    }

    /// Makes this worker `index` of the workers sharing `fabric`: it
    /// processes only the frames [`crate::steer`] gives it and hands the
    /// others over.
    pub fn with_shard(mut self, index: usize, fabric: Arc<Fabric>) -> Worker {
        self.shard = Shard {
            index,
            count: fabric.workers(),
        };
        self.core.learned.stateful.shard = self.shard;
        if let Some(fd) = fabric.wake(index).and_then(|w| w.fd()) {
            self.pollfds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        self.fabric = fabric;
        self
    }

    /// Switches the flow cache off (`0`) or sizes it to `entries`.
    pub fn with_flow_cache(mut self, entries: usize) -> Worker {
        self.core.cache = (entries > 0).then(|| FlowCache::new(entries));
        self
    }

    /// Replaces the connection table with one of `connections` entries
    /// (benchmarks size it to their flow count).
    pub fn with_connections(mut self, connections: usize) -> Worker {
        self.core.learned = Learned::new(LEARNED_MACS).with_connections(connections);
        self.core.learned.stateful.shard = self.shard;
        self
    }

    /// Bytes per tracked connection of this worker's table.
    pub fn conntrack_bytes_per_connection(&self) -> usize {
        self.core.learned.stateful.ct.bytes_per_connection()
    }

    /// One round over every port and every lane towards this worker;
    /// returns the number of frames received.
    // hot path: no allocation, no lock; one rx and at most one tx call per port per batch.
    pub fn poll_once(&mut self) -> usize {
        let Worker {
            core,
            tables,
            stats,
            rx,
            shard,
            fabric,
            ..
        } = self;
        let tables = tables.load();
        core.learned.sync(tables.generation);
        core.mirror.sync(tables.generation);
        if let Some(c) = core.cache.as_mut() {
            c.sync(&tables, core.learned.version());
        }
        core.send_probes(&tables, *shard);
        core.probe_neighbors(&tables);
        crate::stateful::serve_flush(stats, &mut core.learned.stateful);
        if shard.count > 1 {
            core.apply_learned(fabric, shard.index);
        }
        let mut total = 0;
        for i in 0..core.ports.len() {
            let Some(port) = core.ports.get_mut(i) else {
                break;
            };
            let n = port.rx_batch(rx).unwrap_or(0);
            let dropped = port.take_rx_dropped();
            let in_port = u16::try_from(i).unwrap_or(u16::MAX);
            if let Some(c) = core.local.get_mut(i) {
                c.drops[DropReason::Oversize.index()] += dropped;
            }
            if n == 0 {
                continue;
            }
            total += n;
            for buf in rx.iter_mut().take(n) {
                if shard.count > 1 {
                    let owner = crate::steer::frame_worker(&tables, buf.frame(), shard.count);
                    if owner != shard.index {
                        core.hand_over(fabric, shard.index, owner, in_port, buf);
                        continue;
                    }
                }
                core.process_frame(&tables, i, buf);
            }
            core.flush_all();
        }
        if shard.count > 1 {
            total += core.serve_lanes(&tables, fabric, shard.index);
            core.publish_learned(fabric, shard.index);
        }
        core.unfolded += 1;
        if total == 0 || shard.count == 1 || core.unfolded >= FOLD_ROUNDS {
            core.unfolded = 0;
            core.fold(stats, &tables, shard.index);
        }
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
        let wake = self
            .fabric
            .wake(self.shard.index)
            .filter(|_| self.shard.count > 1);
        if let Some(w) = wake {
            w.set_sleeping(true);
            if self.fabric.pending(self.shard.index) {
                w.set_sleeping(false);
                return;
            }
        }
        if self.pollfds.is_empty() {
            std::thread::yield_now();
        } else {
            let n = libc::nfds_t::try_from(self.pollfds.len()).unwrap_or(0);
            // SAFETY: pollfds is a live, correctly sized array of pollfd for the call.
            unsafe { libc::poll(self.pollfds.as_mut_ptr(), n, IDLE_POLL_MS) };
        }
        if let Some(w) = wake {
            w.set_sleeping(false);
            w.drain();
        }
    }

    /// Starts the worker on its own thread, pinned to `cpu` when given.
    pub fn spawn(self, stop: Arc<AtomicBool>) -> std::io::Result<JoinHandle<()>> {
        self.spawn_on(stop, None)
    }

    /// [`Worker::spawn`], pinning the thread to `cpu` (best effort: a
    /// refused pin is logged and the worker runs unpinned).
    pub fn spawn_on(
        self,
        stop: Arc<AtomicBool>,
        cpu: Option<usize>,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("keel-dp-worker-{}", self.shard.index))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to(cpu);
                }
                self.run(&stop)
            })
    }
}

/// The CPUs this process may run on, in order (for pinning workers).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size given.
    let ok = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    if !ok {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET reads the set in bounds for cpu < CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Pins the calling thread to `cpu` (best effort: a refusal is logged).
pub fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu < libc::CPU_SETSIZE as usize {
        // SAFETY: CPU_SET writes inside `set` for cpu < CPU_SETSIZE (checked).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a live cpu_set_t of the size given; 0 = this thread.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } != 0 {
        tracing::warn!(cpu, error = %std::io::Error::last_os_error(), "worker not pinned");
    }
}

impl Core {
    /// Passes `buf` to worker `to`, taking a free buffer in its place.
    // hot path (several workers): two lock-free ring operations, no copy.
    fn hand_over(
        &mut self,
        fabric: &Fabric,
        from: usize,
        to: usize,
        in_port: u16,
        buf: &mut PacketBuf,
    ) {
        let Some(lane) = fabric.lane(from, to) else {
            return;
        };
        let Some(mut spare) = lane.free.pop() else {
            self.handoff_full += 1;
            if let Some(c) = self.local.get_mut(usize::from(in_port)) {
                c.drops[DropReason::HandoffFull.index()] += 1;
            }
            return;
        };
        std::mem::swap(&mut spare, buf);
        match lane.full.push(Handed {
            in_port,
            buf: spare,
        }) {
            Ok(()) => {
                self.handed_off += 1;
                if let Some(w) = fabric.wake(to) {
                    w.wake();
                }
            }
            // Cannot happen (as many free buffers as slots); give it back.
            Err(h) => {
                let _ = lane.free.push(h.buf);
            }
        }
    }

    /// Sends the MACs learned this round to every other worker.
    fn publish_learned(&mut self, fabric: &Fabric, me: usize) {
        let (generation, learned) = self.learned.take_journal();
        for learn in learned {
            for to in 0..fabric.workers() {
                if let Some(lane) = fabric.lane(me, to) {
                    let _ = lane.learned.push((generation, learn));
                }
            }
        }
    }

    /// Applies the MACs other workers learned (before this round's frames).
    // hot path: one empty-queue check per peer when nothing was learned.
    fn apply_learned(&mut self, fabric: &Fabric, me: usize) {
        for from in 0..fabric.workers() {
            let Some(lane) = fabric.lane(from, me) else {
                continue;
            };
            while let Some((generation, learn)) = lane.learned.pop() {
                self.learned.learn_shared(generation, learn);
            }
        }
    }

    /// Processes the frames other workers handed to worker `me`.
    fn serve_lanes(&mut self, tables: &Tables, fabric: &Fabric, me: usize) -> usize {
        let mut total = 0;
        for from in 0..fabric.workers() {
            let Some(lane) = fabric.lane(from, me) else {
                continue;
            };
            // Up to a quarter lane per round: a peer hands over up to a
            // batch per port per round, and this worker's rounds are longer.
            let mut n = 0;
            while n < LANE_DRAIN {
                let Some(mut h) = lane.full.pop() else {
                    break;
                };
                n += 1;
                self.process_frame(tables, usize::from(h.in_port), &mut h.buf);
                let _ = lane.free.push(h.buf);
            }
            if n > 0 {
                self.handed_in += n as u64;
                total += n;
                self.flush_all();
            }
        }
        total
    }

    /// Sends the probes of the health-monitor rounds started since the last
    /// poll, those whose flow this worker owns ([`crate::lb4_health`]).
    // once per poll: an atomic load per monitored load balancer.
    fn send_probes(&mut self, tables: &Tables, shard: Shard) {
        let lb = &tables.stateful.lb;
        if lb.monitors.is_empty() {
            return;
        }
        if self.probes.generation != tables.generation {
            self.probes.generation = tables.generation;
            self.probes.seen.clear();
            self.probes
                .seen
                .extend(lb.monitors.iter().map(|m| m.round.load(Ordering::Relaxed)));
            return;
        }
        let mut sent = false;
        for (i, m) in lb.monitors.iter().enumerate() {
            let round = m.round.load(Ordering::Relaxed);
            match self.probes.seen.get_mut(i) {
                Some(seen) if *seen != round => *seen = round,
                _ => continue,
            }
            for target in &m.targets {
                sent |= self.send_probe(tables, shard, target, m.spec.kind, round);
            }
        }
        if sent {
            self.flush_all();
        }
    }

    /// Queues the SYN of `target`'s probe, through its port's security
    /// group like routed traffic; false when it cannot be sent from here.
    /// Asks the neighbors whose last confirmation is getting old, with a
    /// unicast ARP request to the MAC known for them (as Linux probes a
    /// stale neighbor), so a neighbor that answers stays and one that moved
    /// or left is forgotten ([`crate::pipeline::NEIGHBOR_EXPIRE_S`]).
    fn probe_neighbors(&mut self, tables: &Tables) {
        while let Some((switch, ip)) = self.learned.next_neighbor_probe() {
            let Some(sw) = tables.switches.get(switch as usize) else {
                continue;
            };
            let (Some(gw), Some(mac)) = (sw.gateway, self.learned.neighbor(switch, ip)) else {
                continue;
            };
            let out = sw
                .macs
                .get(&mac_key(&mac))
                .copied()
                .or_else(|| self.learned.lookup(switch, &mac))
                .and_then(|l| tables.lports.get(l as usize))
                .map(|l| usize::from(l.port));
            let Some(out) = out else { continue };
            let frame = &mut self.probes.frame;
            let mut len = 0;
            if !crate::pipeline::arp_request_in_place(frame, &mut len, sw.vlan, gw.mac, gw.ip, ip) {
                continue;
            }
            // Unicast to the MAC known for it: only that neighbor answers.
            if let Some(dst) = frame.get_mut(..6) {
                dst.copy_from_slice(&mac);
            }
            let Some(frame) = self.probes.frame.get(..len) else {
                continue;
            };
            enqueue(
                &mut self.ports,
                &mut self.tx,
                &mut self.local,
                out,
                &[],
                frame,
            );
        }
    }

    fn send_probe(
        &mut self,
        tables: &Tables,
        shard: Shard,
        target: &ProbeTarget,
        kind: ProbeKind,
        round: u64,
    ) -> bool {
        let Some(sw) = tables.switches.get(target.switch as usize) else {
            return false;
        };
        let (Some(gw), 0) = (sw.gateway, sw.vlan) else {
            return false;
        };
        let Some(mac) = sw
            .arp
            .get(&u32::from(target.ip))
            .copied()
            .or_else(|| self.learned.neighbor(target.switch, target.ip))
        else {
            return false;
        };
        let lport = sw
            .macs
            .get(&mac_key(&mac))
            .copied()
            .or_else(|| self.learned.lookup(target.switch, &mac));
        let (Some(lport), Some(sport)) = (lport, probe_port(target.slot)) else {
            return false;
        };
        let Some(out_lp) = tables.lports.get(lport as usize) else {
            return false;
        };
        let out = usize::from(out_lp.port);
        let seq = u32::try_from(round & 0xffff_ffff).unwrap_or(0);
        let n = build_probe(
            &mut self.probes.frame,
            kind,
            mac,
            gw.mac,
            gw.ip,
            target.ip,
            sport,
            target.port,
            seq,
        );
        let frame = &self.probes.frame[..n];
        if crate::steer::frame_worker(tables, frame, shard.count) != shard.index {
            return false;
        }
        let Ok(p) = crate::packet::parse(frame) else {
            return false;
        };
        if crate::stateful::to_lport(
            tables,
            &mut self.learned.stateful,
            lport,
            &p,
            frame,
            &mut NoTrace,
        )
        .is_err()
        {
            return false;
        }
        // A member on another host: the probe goes through its tunnel.
        let tunnel = match (out_lp.remote, tables.overlay.as_ref(), sw.vni) {
            (None, _, _) => None,
            (Some(ep), Some(o), Some(vni)) => match o.header(ep, vni, sport, n) {
                Some(h) => Some(h),
                None => return false,
            },
            _ => return false,
        };
        if let Some(c) = tables.stateful.lb.probes_sent.get(target.slot as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        enqueue(
            &mut self.ports,
            &mut self.tx,
            &mut self.local,
            out,
            tunnel.as_ref().map_or(&[][..], |h| &h[..]),
            frame,
        )
    }

    fn flush_all(&mut self) {
        for out in 0..self.tx.len() {
            flush(&mut self.ports, &mut self.tx, &mut self.local, out);
        }
    }

    /// Runs one frame received on interface `i` through the pipeline and
    /// queues its copies.
    fn process_frame(&mut self, tables: &Tables, i: usize, buf: &mut PacketBuf) {
        let Core {
            ports,
            tx,
            learned,
            local,
            outcomes,
            mirror,
            cache,
            tail,
            processed,
            ..
        } = self;
        let mirrors = &tables.mirror;
        let in_port = u16::try_from(i).unwrap_or(u16::MAX);
        *processed += 1;
        if let Some(c) = local.get_mut(i) {
            c.rx_packets += 1;
            c.rx_bytes += buf.len as u64;
        }
        if let Some(taps) = mirrors.rx.get(i).filter(|t| !t.is_empty()) {
            mirror_copies(mirrors, taps, buf.frame(), true, ports, tx, local, mirror);
        }
        let (data, len) = buf.parts_mut();
        let from_tunnel = tables
            .overlay
            .as_ref()
            .is_some_and(|o| usize::from(o.port) == i);
        let d = if from_tunnel {
            // Stripped first, then cached on the inner frame, keyed by its
            // tunnel port (beyond any interface index, so no clash).
            match strip_tunnel(tables, learned, data, len, &mut NoTrace) {
                Err(d) => d,
                Ok(lport) => {
                    let run = |l: &mut Learned, b: &mut [u8], n: &mut usize| {
                        process_from_tunnel(tables, l, lport, b, n, &mut NoTrace)
                    };
                    let key = u16::try_from(lport)
                        .ok()
                        .and_then(|l| l.checked_add(TUNNEL_KEY_BASE));
                    match (cache.as_mut(), key) {
                        (Some(c), Some(key)) => match c.lookup(key, data, *len) {
                            Ok(d) => d,
                            Err(miss) => {
                                let d = cached_slow_path(c, miss, learned, data, len, tail, run);
                                c.sync(tables, learned.version());
                                d
                            }
                        },
                        _ => run(learned, data, len),
                    }
                }
            }
        } else {
            let run = |l: &mut Learned, b: &mut [u8], n: &mut usize| {
                process(tables, l, in_port, b, n, &mut NoTrace)
            };
            match cache.as_mut() {
                None => run(learned, data, len),
                Some(c) => match c.lookup(in_port, data, *len) {
                    Ok(d) => d,
                    Err(miss) => {
                        let d = cached_slow_path(c, miss, learned, data, len, tail, run);
                        c.sync(tables, learned.version());
                        d
                    }
                },
            }
        };
        if let Some(o) = d.outcome {
            outcomes[o.index()] += 1;
        }
        if d.learned {
            outcomes[Outcome::MacLearned.index()] += 1;
        }
        outcomes[Outcome::OverlayDecap.index()] += std::mem::take(&mut learned.decapped);
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
            Verdict::Consumed => {}
            Verdict::Tunnel {
                endpoint,
                vni,
                entropy,
            } => {
                let header = tables
                    .overlay
                    .as_ref()
                    .and_then(|o| Some((o.port, o.header(endpoint, vni, entropy, frame.len())?)));
                match header {
                    Some((out, h)) => {
                        if enqueue(ports, tx, local, usize::from(out), &h, frame) {
                            outcomes[Outcome::OverlayEncap.index()] += 1;
                        }
                    }
                    None => {
                        if let Some(c) = local.get_mut(i) {
                            c.drops[DropReason::OverlayUnknownVni.index()] += 1;
                        }
                    }
                }
            }
            Verdict::Flood { switch, except } => {
                let Some(sw) = tables.switches.get(switch as usize) else {
                    return;
                };
                // Never back out the ingress interface, and once per interface.
                let mut sent: u64 = 1 << (i % 64);
                for m in sw.members.iter().filter(|m| **m != except) {
                    let Some(lp) = tables
                        .lports
                        .get(*m as usize)
                        .filter(|l| l.remote.is_none())
                    else {
                        continue;
                    };
                    let bit = 1u64 << (lp.port % 64);
                    if sent & bit == 0 {
                        sent |= bit;
                        let out = usize::from(lp.port);
                        enqueue(ports, tx, local, out, &[], frame);
                        if let Some(taps) = mirrors.tx.get(out).filter(|t| !t.is_empty()) {
                            mirror_copies(mirrors, taps, frame, false, ports, tx, local, mirror);
                        }
                    }
                }
                // Head-end replication, never for what came out of a tunnel.
                if let (Some(o), Some(vni)) = (tables.overlay.as_ref(), sw.vni) {
                    if i != usize::from(o.port) && !sw.flood_endpoints.is_empty() {
                        replicate(o, sw, vni, frame, i, ports, tx, local, outcomes);
                    }
                }
            }
        }
    }

    /// Folds this round's private counts into the shared ones.
    fn fold(&mut self, stats: &Stats, tables: &Tables, me: usize) {
        stats.fold(&mut self.local, &mut self.outcomes);
        if let Some(c) = self.cache.as_mut() {
            stats.fold_flow_cache(&mut c.counters);
        }
        self.learned.qos.fold(&tables.qos);
        self.learned.policy.fold(&tables.policies);
        self.learned.stateful.lb.fold(&tables.stateful.lb);
        self.mirror.fold(&tables.mirror);
        let ct = &mut self.learned.stateful.ct;
        let entries = ct.len();
        stats.fold_conntrack(me, &mut ct.counters, entries);
        stats.fold_worker(
            me,
            [
                &mut self.processed,
                &mut self.handed_off,
                &mut self.handed_in,
                &mut self.handoff_full,
            ],
        );
    }
}

/// Runs the pipeline on a cache miss and stores the result when it can be
/// replayed exactly (see [`crate::flowcache`]).
// hot path (misses): one copy of the frame's tail to prove it unchanged.
fn cached_slow_path(
    c: &mut FlowCache,
    miss: Option<flowcache::Miss>,
    learned: &mut Learned,
    data: &mut [u8],
    len: &mut usize,
    tail: &mut [u8],
    run: impl FnOnce(&mut Learned, &mut [u8], &mut usize) -> crate::pipeline::Decision,
) -> crate::pipeline::Decision {
    let Some(miss) = miss else {
        return run(learned, data, len);
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
    let d = run(learned, data, len);
    let unchanged =
        saved && *len == in_len && data.get(keyed..in_len) == tail.get(..in_len - keyed);
    if let Some(out) = data.get(..*len) {
        c.insert(&miss, &d, out, unchanged);
    }
    d
}

/// Sends a flooded frame encapsulated to every endpoint holding a port of `sw`.
// hot path (overlay floods only): one header per endpoint, on the stack.
#[allow(clippy::too_many_arguments)]
fn replicate(
    o: &crate::overlay::OverlayTables,
    sw: &crate::tables::Switch,
    vni: u32,
    frame: &[u8],
    in_port: usize,
    ports: &mut [Box<dyn Port>],
    tx: &mut [TxQueue],
    local: &mut [LocalPortCounters],
    outcomes: &mut [u64; Outcome::COUNT],
) {
    if !o.fits(frame.len()) {
        if let Some(c) = local.get_mut(in_port) {
            c.drops[DropReason::OverlayTooBig.index()] += 1;
        }
        return;
    }
    let entropy = frame
        .get(6..12)
        .map_or(0, |m| u16::from_be_bytes([m[4] ^ m[0], m[5] ^ m[2]]));
    for ep in &sw.flood_endpoints {
        if let Some(h) = o.header(*ep, vni, entropy, frame.len()) {
            if enqueue(ports, tx, local, usize::from(o.port), &h, frame) {
                outcomes[Outcome::OverlayEncap.index()] += 1;
            }
        }
    }
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

    /// A stale neighbor is probed with an ARP request sent to its own MAC
    /// out of the port it is behind (not broadcast).
    #[test]
    fn stale_neighbors_are_probed_by_unicast_arp() {
        const HOST: [u8; 6] = [2, 0, 0, 0, 0x77, 1];
        const GW_A: [u8; 6] = [2, 0, 0, 0, 0xff, 1];
        const UP: usize = 4;
        let handle = ConfigHandle::new(interfaces());
        handle.apply(topology()).unwrap();
        let host: std::net::Ipv4Addr = "10.0.1.77".parse().unwrap();
        let gw: std::net::Ipv4Addr = "10.0.1.1".parse().unwrap();
        let reply = crate::packet::build::arp(2, GW_A, HOST, host, GW_A, gw, None);
        let ports: Vec<MemPort> = interfaces()
            .iter()
            .enumerate()
            .map(|(i, n)| {
                if i == UP {
                    MemPort::generator(n, vec![reply.clone()], 1).capturing()
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
        assert_eq!(w.core.learned.neighbor(0, host), Some(HOST));
        w.core.learned.queue_neighbor_probe(0, host);
        let tables = w.tables.load();
        w.core.probe_neighbors(&tables);
        w.core.flush_all();
        let sent = sinks[UP].captured.lock().unwrap();
        let probe = sent.last().expect("a probe went out of the uplink");
        assert_eq!(&probe[0..6], &HOST, "to the neighbor's MAC");
        assert_eq!(&probe[6..12], &GW_A);
        assert_eq!(&probe[12..14], &[0x08, 0x06]);
        assert_eq!(&probe[20..22], &[0, 1], "a request");
        assert_eq!(&probe[22..28], &GW_A, "from the router's leg");
        assert_eq!(&probe[28..32], &gw.octets());
        assert_eq!(&probe[38..42], &host.octets());
        for (i, s) in sinks.iter().enumerate() {
            if i != UP {
                assert!(s.captured.lock().unwrap().is_empty(), "port {i}");
            }
        }
    }
}

#[cfg(test)]
mod multi_worker_tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::config::ConfigHandle;
    use crate::packet::build::ipv4;
    use crate::port::MemPort;
    use crate::testutil::{interfaces, topology};

    /// Two workers, each generating vm1 → vm2 UDP flows on its own copy of
    /// the ports: every frame is delivered once, by its owner, and both
    /// workers process and hand over frames.
    #[test]
    fn two_workers_steer_hand_over_and_deliver_everything() {
        let handle = ConfigHandle::new(interfaces());
        handle.apply(topology()).unwrap();
        let frames: Vec<Vec<u8>> = (0..64u16)
            .map(|i| {
                let mut udp = [0u8; 8];
                udp[0..2].copy_from_slice(&(10000 + i).to_be_bytes());
                udp[2..4].copy_from_slice(&53u16.to_be_bytes());
                udp[4..6].copy_from_slice(&8u16.to_be_bytes());
                ipv4(
                    [2, 0, 0, 0, 0, 2],
                    [2, 0, 0, 0, 0, 1],
                    None,
                    "10.0.1.10".parse().unwrap(),
                    "10.0.1.11".parse().unwrap(),
                    64,
                    17,
                    &udp,
                )
            })
            .collect();
        let per_worker = 6400u64;
        let stats = Arc::new(Stats::with_workers(&interfaces(), 2));
        let fabric = Fabric::new(2);
        let mut sinks = Vec::new();
        let mut workers: Vec<Worker> = (0..2)
            .map(|w| {
                let ports: Vec<Box<dyn Port>> = interfaces()
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let p = if i == 0 {
                            MemPort::generator(n, frames.clone(), per_worker)
                        } else {
                            MemPort::sink(n)
                        };
                        if i == 1 {
                            sinks.push(p.counters());
                        }
                        Box::new(p) as Box<dyn Port>
                    })
                    .collect();
                Worker::new(ports, handle.tables(), Arc::clone(&stats))
                    .with_shard(w, Arc::clone(&fabric))
            })
            .collect();
        loop {
            let n: usize = workers.iter_mut().map(Worker::poll_once).sum();
            if n == 0 && !fabric.pending(0) && !fabric.pending(1) {
                break;
            }
        }
        let delivered: u64 = sinks
            .iter()
            .map(|s| s.packets.load(Ordering::Relaxed))
            .sum();
        assert_eq!(delivered, 2 * per_worker);
        let snap = stats.snapshot();
        assert_eq!(snap.port("p0").unwrap().rx_packets, 2 * per_worker);
        assert!(snap.port("p0").unwrap().drops.is_empty());
        assert_eq!(snap.outcomes["l2_unicast"], 2 * per_worker);
        for w in &snap.workers {
            assert!(
                w["processed"] > 0 && w["handed_off"] > 0 && w["handed_in"] > 0,
                "{w:?}"
            );
            assert_eq!(w["handoff_full"], 0);
        }
        let processed: u64 = snap.workers.iter().map(|w| w["processed"]).sum();
        assert_eq!(processed, 2 * per_worker);
    }

    fn udp(dst: [u8; 6], src: [u8; 6], sip: &str, dip: &str, sport: u16, dport: u16) -> Vec<u8> {
        let mut udp = [0u8; 8];
        udp[0..2].copy_from_slice(&sport.to_be_bytes());
        udp[2..4].copy_from_slice(&dport.to_be_bytes());
        udp[4..6].copy_from_slice(&8u16.to_be_bytes());
        ipv4(
            dst,
            src,
            None,
            sip.parse().unwrap(),
            dip.parse().unwrap(),
            64,
            17,
            &udp,
        )
    }

    /// A MAC learned by one worker (behind the learning uplink) is known to
    /// the other before its next round: a frame to it is unicast, not flooded.
    #[test]
    fn a_mac_learned_on_one_worker_is_not_flooded_by_the_other() {
        let handle = ConfigHandle::new(interfaces());
        handle.apply(topology()).unwrap();
        let tables = handle.tables().load_full();
        let (vm1, ext) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 0x77]);
        let owned_by = |w: usize, f: &dyn Fn(u16) -> Vec<u8>| {
            (1000..2000u16)
                .map(f)
                .find(|fr| crate::steer::frame_worker(&tables, fr, 2) == w)
                .unwrap()
        };
        // Worker 0 sees ext's frame on the uplink; worker 1 then sends vm1 → ext.
        let from_ext = owned_by(0, &|p| udp(vm1, ext, "10.0.1.77", "10.0.1.10", p, 53));
        let to_ext = owned_by(1, &|p| udp(ext, vm1, "10.0.1.10", "10.0.1.77", 53, p));
        let stats = Arc::new(Stats::with_workers(&interfaces(), 2));
        let fabric = Fabric::new(2);
        let mut sinks = Vec::new();
        let mut workers: Vec<Worker> = [(4, from_ext), (0, to_ext)]
            .into_iter()
            .enumerate()
            .map(|(w, (gen_port, frame))| {
                let mut mine = Vec::new();
                let ports: Vec<Box<dyn Port>> = interfaces()
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let p = if i == gen_port {
                            MemPort::generator(n, vec![frame.clone()], 1)
                        } else {
                            MemPort::sink(n)
                        };
                        mine.push(p.counters());
                        Box::new(p) as Box<dyn Port>
                    })
                    .collect();
                sinks.push(mine);
                Worker::new(ports, handle.tables(), Arc::clone(&stats))
                    .with_shard(w, Arc::clone(&fabric))
            })
            .collect();
        workers[0].poll_once();
        workers[1].poll_once();
        // Idle rounds fold the counters.
        while workers.iter_mut().map(Worker::poll_once).sum::<usize>() > 0 {}
        let sent = |w: usize, i: usize| sinks[w][i].packets.load(Ordering::Relaxed);
        // Worker 1: vm1 → ext went to the uplink only (p1 = vm2 got nothing).
        assert_eq!((sent(1, 4), sent(1, 1)), (1, 0));
        let snap = stats.snapshot();
        assert_eq!(snap.outcomes["l2_flood"], 0, "{snap:?}");
        assert_eq!(snap.outcomes["l2_unicast"], 2, "{snap:?}");
    }
}
