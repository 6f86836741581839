//! The stateful pipeline stages: security groups on the way out of and into
//! a logical port (`security_group_out` / `security_group_in`). The router's
//! stateful stage (NAT and firewall) is in [`crate::nat`].
//!
//! Each stage works in the conntrack zone of its port: a packet of a known
//! connection passes on its state alone (replies included); the first packet
//! of a connection is checked against the port's rules and, if allowed,
//! starts tracking. After a configuration change each connection's original
//! packet is re-checked once, on the connection's next packet: if the rules
//! now deny it, the entry is marked blocked and every further packet of it
//! is dropped (OVN's `ct_mark.blocked`), so a removed rule cuts established
//! connections while connections that stay allowed are untouched.
//!
//! An ICMP connection is one query type and its answer (echo, timestamp,
//! information, address mask): another ICMP type on the same key is judged
//! on its own and starts nothing, as in Linux conntrack.
//!
//! Always allowed: IPv6 neighbor discovery / router advertisements and DHCP
//! replies to the port. Not filtered: non-IP frames (ARP is answered or switched as before) and
//! flooded frames (broadcast / unknown unicast are checked on the way out of
//! the sending port only). Non-first IPv4 fragments on a port with groups are
//! dropped and counted (`untracked_fragment`): there is no reassembly yet.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::conntrack::key::{extract, show};
use crate::conntrack::{Conntrack, CreateError, Dir, Extracted, TcpState};
use crate::counters::DropReason;
use crate::nat::RouterStateful;
use crate::packet::headers::{IPPROTO_ICMP, IPPROTO_ICMPV6};
use crate::packet::parse::L3;
use crate::packet::Parsed;
use crate::pipeline::Tracer;
use crate::security::{PortAcl, RuleCounters, RuleInput};
use crate::tables::{LportId, Tables};

/// The compiled stateful configuration, part of [`Tables`].
#[derive(Debug, Clone, Default)]
pub struct StatefulTables {
    /// Security groups per logical port (indexed like `Tables::lports`).
    pub acls: Vec<Option<PortAcl>>,
    /// NAT and firewall per router (indexed like `Tables::routers`).
    pub routers: Vec<Option<RouterStateful>>,
    pub counters: RuleCounters,
    /// Load-balancer member counters ([`crate::lb4`]).
    pub lb: crate::lb4::Lb4Tables,
}

impl StatefulTables {
    /// Counts a hit on rule counter `i`.
    // hot path (new connections): one relaxed atomic add.
    pub fn hit(&self, i: Option<usize>) {
        if let Some(c) = i.and_then(|i| self.counters.hits.get(i)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Connections tracked by a worker when none is given.
pub const DEFAULT_CONNECTIONS: usize = 256;

/// A worker's mutable state for the stateful stages.
pub struct WorkerState {
    pub ct: Conntrack,
    /// This worker's place among the workers: NAT picks only ports whose
    /// replies steer back here ([`crate::steer`]).
    pub shard: crate::steer::Shard,
    /// Load-balancer member counts of this worker ([`crate::lb4`]).
    pub lb: crate::lb4::LbCounters,
    start: Instant,
    /// A zone flush in progress: (zone, next slab slot).
    flushing: Option<(u32, usize)>,
}

/// Slab slots a zone flush visits per batch.
pub const FLUSH_PER_BATCH: usize = 4096;

impl WorkerState {
    /// State with a connection table of `connections` entries (allocated now).
    pub fn new(connections: usize) -> WorkerState {
        WorkerState {
            ct: Conntrack::with_capacity(connections),
            shard: crate::steer::Shard::SOLE,
            lb: crate::lb4::LbCounters::default(),
            start: Instant::now(),
            flushing: None,
        }
    }

    /// Advances the conntrack clock; once per batch (a vDSO clock read).
    pub fn tick(&mut self) {
        let secs = u32::try_from(self.start.elapsed().as_secs()).unwrap_or(u32::MAX);
        self.ct.tick(secs);
    }
}

/// Runs a zone flush requested through [`crate::counters::Stats::request_ct_flush`].
// hot path: one relaxed atomic load per round.
/// The flush runs incrementally, [`FLUSH_PER_BATCH`] slots per round, so one
/// zone's flush does not stall forwarding for the others.
pub fn serve_flush(stats: &crate::counters::Stats, st: &mut WorkerState) {
    let Some(request) = stats.workers.get(st.shard.index).map(|w| &w.ct_flush) else {
        return;
    };
    if st.flushing.is_none() && request.load(Ordering::Relaxed) != 0 {
        let zone = request.swap(0, Ordering::Relaxed);
        st.flushing = Some((zone, 0));
    }
    if let Some((zone, from)) = st.flushing {
        let (_, next) = st.ct.flush_zone_step(zone, from, FLUSH_PER_BATCH);
        st.flushing = next.map(|n| (zone, n));
        if next.is_none() {
            tracing::info!(zone, "conntrack zone flushed");
        }
    }
}

/// Security groups of the port a packet leaves (VM egress).
// hot path: one table lookup for ports without groups; a hash lookup otherwise.
pub fn from_lport<T: Tracer>(
    t: &Tables,
    st: &mut WorkerState,
    lport: LportId,
    p: &Parsed,
    frame: &[u8],
    tr: &mut T,
) -> Result<(), DropReason> {
    match t.stateful.acls.get(lport as usize) {
        Some(Some(acl)) => acl_stage(t, st, acl, false, p, frame, tr),
        _ => Ok(()),
    }
}

/// Security groups of the port a packet is delivered to (VM ingress).
pub fn to_lport<T: Tracer>(
    t: &Tables,
    st: &mut WorkerState,
    lport: LportId,
    p: &Parsed,
    frame: &[u8],
    tr: &mut T,
) -> Result<(), DropReason> {
    match t.stateful.acls.get(lport as usize) {
        Some(Some(acl)) => acl_stage(t, st, acl, true, p, frame, tr),
        _ => Ok(()),
    }
}

fn rule_input(x: &Extracted, ingress: bool) -> RuleInput {
    RuleInput {
        v6: x.v6,
        proto: x.key.proto,
        remote: if ingress { x.key.src } else { x.key.dst },
        dport: x.key.dport,
        icmp: x.icmp,
    }
}

/// What a port always needs, whatever its groups say (OpenStack and OVN add
/// the same implicit rules): IPv6 neighbor discovery and router
/// advertisements, and DHCP replies towards the port.
fn implicitly_allowed(x: &Extracted, ingress: bool) -> bool {
    let nd = x.v6
        && x.key.proto == crate::packet::headers::IPPROTO_ICMPV6
        && matches!(x.icmp, Some((133..=136, _)));
    let dhcp_reply = ingress
        && x.key.proto == crate::packet::headers::IPPROTO_UDP
        && matches!((x.key.sport, x.key.dport), (67, 68) | (547, 546));
    nd || dhcp_reply
}

/// The ICMP answer to a query type (RFC 792, RFC 4443): echo, timestamp,
/// information and address mask.
fn icmp_answer(v6: bool, ty: u8) -> Option<u8> {
    match (v6, ty) {
        (false, 8) => Some(0),
        (false, 13) => Some(14),
        (false, 15) => Some(16),
        (false, 17) => Some(18),
        (true, 128) => Some(129),
        _ => None,
    }
}

/// Whether ICMP message `msg` (type, code) belongs to the tracked ICMP
/// connection opened by `opened`. Connection keys carry no ICMP type (an
/// echo's identifier at most), so without this check one allowed message
/// would let every other type between the same hosts pass, whatever the
/// type/code rules say: the opener's type and code go one way, its answer
/// comes back.
fn icmp_fits(v6: bool, opened: (u8, u8), dir: Dir, msg: (u8, u8)) -> bool {
    match dir {
        Dir::Original => msg == opened,
        Dir::Reply => icmp_answer(v6, opened.0) == Some(msg.0),
    }
}

fn acl_stage<T: Tracer>(
    t: &Tables,
    st: &mut WorkerState,
    acl: &PortAcl,
    ingress: bool,
    p: &Parsed,
    frame: &[u8],
    tr: &mut T,
) -> Result<(), DropReason> {
    let stage = if ingress {
        "security_group_in"
    } else {
        "security_group_out"
    };
    let Some(x) = extract(p, frame) else {
        if matches!(p.l3, L3::Ipv4(ip) if ip.later_fragment) {
            tr.note(stage, || "drop: non-first fragment (not tracked)".into());
            return Err(DropReason::UntrackedFragment);
        }
        return Ok(());
    };
    let key = x.key.in_zone(acl.zone);
    let ct = &mut st.ct;
    // A cut connection is held (dropping its packets) this long, then freed.
    let blocked_until = ct.now().saturating_add(ct.timeouts.tcp_fin);
    let found = ct.lookup(&key);
    // An ICMP message of another type than the tracked one on its key (e.g.
    // an echo reply sent where an echo request was allowed) is no part of
    // that connection: it is judged on its own and tracks nothing.
    let misfit = match (found, x.icmp) {
        (Some(f), Some(msg)) => ct
            .get(f.id)
            .is_some_and(|c| !icmp_fits(x.v6, c.icmp, f.dir, msg)),
        _ => false,
    };
    if let Some(f) = found.filter(|_| !misfit) {
        let Some(conn) = ct.get_mut(f.id) else {
            return Err(DropReason::CtInvalid);
        };
        let reopen = x
            .tcp
            .is_some_and(|s| f.dir == Dir::Original && conn.tcp.reopens(0, &s));
        if conn.blocked && !reopen {
            tr.note(stage, || "drop: connection was cut by a rule change".into());
            return Err(DropReason::SecurityGroupDenied);
        }
        if conn.blocked {
            // A new connection on the tuple of a cut one: judge it afresh.
            ct.remove(f.id);
        } else {
            if conn.generation != t.generation {
                let orig = Extracted {
                    key: conn.orig,
                    v6: x.v6,
                    // (0, 0) is an echo reply's type and code, not "no ICMP".
                    icmp: matches!(conn.orig.proto, IPPROTO_ICMP | IPPROTO_ICMPV6)
                        .then_some(conn.icmp),
                    tcp: None,
                    related: None,
                };
                let v = acl.decide(conn.ingress, &rule_input(&orig, conn.ingress));
                t.stateful.hit(v.rule);
                if !v.allow {
                    conn.blocked = true;
                    conn.expires = blocked_until;
                    tr.note(stage, || {
                        "drop: rules changed and now deny this connection: cut".into()
                    });
                    return Err(DropReason::SecurityGroupDenied);
                }
                conn.generation = t.generation;
            }
            if ct.update(f.id, f.dir, key.proto, x.tcp.as_ref()).is_err() {
                tr.note(stage, || {
                    "drop: invalid for the connection's TCP state".into()
                });
                return Err(DropReason::CtInvalid);
            }
            tr.note(stage, || {
                format!(
                    "{:?} packet of a tracked connection in zone {:#x}: pass",
                    f.dir, acl.zone
                )
            });
            return Ok(());
        }
    }
    if let Some(rel) = x.related {
        if ct.lookup(&rel.in_zone(acl.zone)).is_some() {
            tr.note(stage, || {
                "ICMP error related to a tracked connection: pass".into()
            });
            return Ok(());
        }
    }
    if implicitly_allowed(&x, ingress) {
        tr.note(stage, || {
            "neighbor discovery / DHCP reply: allowed without rules".into()
        });
        return Ok(());
    }
    if let Some(seg) = x.tcp.filter(|s| !TcpState::may_start(s)) {
        tr.note(stage, || {
            format!(
                "drop: TCP flags {:#04x} cannot start a connection",
                seg.flags
            )
        });
        ct.counters.invalid += 1;
        return Err(DropReason::CtInvalid);
    }
    let v = acl.decide(ingress, &rule_input(&x, ingress));
    t.stateful.hit(v.rule);
    let rule = || {
        v.rule
            .and_then(|i| t.stateful.counters.names.get(i))
            .map(|n| format!("rule {} of {:?}", n.index, n.owner))
            .unwrap_or_else(|| {
                if ingress {
                    "default (deny ingress)".into()
                } else {
                    "default (allow egress)".into()
                }
            })
    };
    if !v.allow {
        tr.note(stage, || {
            format!(
                "drop: new {} → {} proto {} port {} denied by {}",
                show(key.src),
                show(key.dst),
                key.proto,
                key.dport,
                rule()
            )
        });
        return Err(DropReason::SecurityGroupDenied);
    }
    if x.related.is_some() || misfit {
        // An ICMP error (or a message on another conversation's key) the
        // rules allow on its own: it starts no connection.
        tr.note(stage, || format!("ICMP message allowed by {}", rule()));
        return Ok(());
    }
    let id = match ct.create(key, key.reversed(), t.generation) {
        Ok(id) => id,
        Err(CreateError::TableFull) => {
            tr.note(stage, || "drop: connection table full".into());
            return Err(DropReason::CtTableFull);
        }
        Err(CreateError::KeyInUse) => return Err(DropReason::CtInvalid),
    };
    if let Some(c) = ct.get_mut(id) {
        c.ingress = ingress;
        c.icmp = x.icmp.unwrap_or((0, 0));
    }
    if ct
        .update(id, Dir::Original, key.proto, x.tcp.as_ref())
        .is_err()
    {
        ct.remove(id);
        return Err(DropReason::CtInvalid);
    }
    tr.note(stage, || {
        format!(
            "new connection {} → {} proto {} port {} allowed by {}: tracked in zone {:#x}",
            show(key.src),
            show(key.dst),
            key.proto,
            key.dport,
            rule(),
            acl.zone
        )
    });
    Ok(())
}
