//! A pool at run time: its members with their health and counters, and the
//! member *selection* the request path reads.
//!
//! The selection (eligible members, weighted round-robin slots, Maglev table)
//! is rebuilt whenever configuration or health changes and published through
//! an `ArcSwap`, so picking a member costs one atomic load and, for
//! round-robin, one `fetch_add` — no lock. A member that is admin down, has
//! weight 0 or whose monitor says ERROR is not in the selection, so no new
//! request or connection can go to it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::maglev::{self, Maglev};
use crate::model::LbAlgorithm;
use crate::plan::{MemberPlan, PoolPlan};
use crate::stats::{Counters, MemberStatus, OperatingStatus, PoolStatus, ProvisioningStatus};

/// Health as the monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// No monitor on the pool.
    Unmonitored = 0,
    Up = 1,
    Down = 2,
}

#[derive(Debug)]
pub struct Member {
    pub id: String,
    pub addr: SocketAddr,
    /// `addr` as a URI authority, built once instead of per request.
    pub authority: Option<hyper::http::uri::Authority>,
    pub monitor_addr: SocketAddr,
    weight: AtomicU16,
    backup: AtomicBool,
    enabled: AtomicBool,
    health: AtomicU8,
    /// Whether a probe has ever succeeded (a member that never passed one
    /// goes down on its first failure, as in HAProxy).
    pub seen_up: AtomicBool,
    pub counters: Arc<Counters>,
}

impl Member {
    fn new(plan: &MemberPlan) -> Member {
        Member {
            id: plan.id.clone(),
            addr: plan.addr,
            authority: plan.addr.to_string().parse().ok(),
            monitor_addr: plan.monitor_addr,
            weight: AtomicU16::new(plan.weight),
            backup: AtomicBool::new(plan.backup),
            enabled: AtomicBool::new(plan.enabled),
            health: AtomicU8::new(Health::Unmonitored as u8),
            seen_up: AtomicBool::new(false),
            counters: Arc::default(),
        }
    }

    fn update(&self, plan: &MemberPlan) {
        self.weight.store(plan.weight, Relaxed);
        self.backup.store(plan.backup, Relaxed);
        self.enabled.store(plan.enabled, Relaxed);
    }

    pub fn health(&self) -> Health {
        match self.health.load(Relaxed) {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unmonitored,
        }
    }

    fn eligible(&self) -> bool {
        self.enabled.load(Relaxed) && self.weight.load(Relaxed) > 0 && self.health() != Health::Down
    }

    fn operating_status(&self) -> OperatingStatus {
        if !self.enabled.load(Relaxed) {
            return OperatingStatus::Offline;
        }
        match self.health() {
            Health::Down => OperatingStatus::Error,
            _ if self.weight.load(Relaxed) == 0 => OperatingStatus::Draining,
            Health::Unmonitored => OperatingStatus::NoMonitor,
            Health::Up => OperatingStatus::Online,
        }
    }
}

/// What the request path reads: an immutable snapshot.
#[derive(Debug, Default)]
struct Selection {
    members: Vec<Arc<Member>>,
    /// Smooth weighted round-robin order, indices into `members`.
    slots: Vec<u32>,
    maglev: Option<Maglev>,
}

#[derive(Debug)]
pub struct Pool {
    pub id: String,
    plan: ArcSwap<PoolPlan>,
    members: ArcSwap<Vec<Arc<Member>>>,
    selection: ArcSwap<Selection>,
    rr: AtomicUsize,
    pub counters: Arc<Counters>,
    /// Serializes selection rebuilds (config apply vs. health changes).
    rebuild: Mutex<()>,
}

impl Pool {
    pub fn new(plan: &PoolPlan) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            id: plan.id.clone(),
            plan: ArcSwap::from_pointee(plan.clone()),
            members: ArcSwap::from_pointee(Vec::new()),
            selection: ArcSwap::from_pointee(Selection::default()),
            rr: AtomicUsize::new(0),
            counters: Arc::default(),
            rebuild: Mutex::new(()),
        });
        pool.reconfigure(plan);
        pool
    }

    pub fn plan(&self) -> Arc<PoolPlan> {
        self.plan.load_full()
    }

    pub fn members(&self) -> Arc<Vec<Arc<Member>>> {
        self.members.load_full()
    }

    /// Applies a new plan: members keep their health and counters when their
    /// id and address are unchanged.
    pub fn reconfigure(&self, plan: &PoolPlan) {
        let old = self.members.load_full();
        let monitored = plan.monitor.is_some();
        let members = plan
            .members
            .iter()
            .map(|mp| {
                let m = match old.iter().find(|m| {
                    m.id == mp.id && m.addr == mp.addr && m.monitor_addr == mp.monitor_addr
                }) {
                    Some(m) => {
                        m.update(mp);
                        m.clone()
                    }
                    None => Arc::new(Member::new(mp)),
                };
                let h = m.health();
                if !monitored {
                    m.health.store(Health::Unmonitored as u8, Relaxed);
                } else if h == Health::Unmonitored {
                    // Optimistic start, as HAProxy: up until a probe fails.
                    m.health.store(Health::Up as u8, Relaxed);
                }
                m
            })
            .collect();
        self.plan.store(Arc::new(plan.clone()));
        self.members.store(Arc::new(members));
        self.rebuild_selection();
    }

    /// Records a health transition; returns whether it changed.
    pub fn set_health(&self, member: &Member, health: Health) -> bool {
        let prev = member.health.swap(health as u8, Relaxed);
        if prev == health as u8 {
            return false;
        }
        self.rebuild_selection();
        true
    }

    fn rebuild_selection(&self) {
        let _serial = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let plan = self.plan.load();
        let members = self.members.load();
        let mut eligible: Vec<Arc<Member>> = Vec::new();
        if plan.enabled {
            eligible = members
                .iter()
                .filter(|m| m.eligible() && !m.backup.load(Relaxed))
                .cloned()
                .collect();
            if eligible.is_empty() {
                eligible = members
                    .iter()
                    .filter(|m| m.eligible() && m.backup.load(Relaxed))
                    .cloned()
                    .collect();
            }
        }
        let weights: Vec<u16> = eligible.iter().map(|m| m.weight.load(Relaxed)).collect();
        let slots = smooth_weighted_order(&weights);
        let maglev = (matches!(
            plan.algorithm,
            LbAlgorithm::SourceIp | LbAlgorithm::SourceIpPort
        ) || plan.sticky_source_ip)
            .then(|| {
                let named: Vec<(&str, u16)> = eligible
                    .iter()
                    .zip(&weights)
                    .map(|(m, w)| (m.id.as_str(), *w))
                    .collect();
                Maglev::new(&named, maglev::DEFAULT_TABLE_SIZE)
            });
        self.selection.store(Arc::new(Selection {
            members: eligible,
            slots,
            maglev,
        }));
    }

    /// Picks the member for a new request or connection from `client`.
    pub fn pick(&self, client: SocketAddr) -> Option<Arc<Member>> {
        let sel = self.selection.load();
        if sel.members.is_empty() {
            return None;
        }
        let plan = self.plan.load();
        let algorithm = plan.algorithm;
        if let Some(table) = &sel.maglev {
            // Persistence by source address overrides the per-connection hash.
            let hash = if algorithm == LbAlgorithm::SourceIpPort && !plan.sticky_source_ip {
                maglev::hash_socket(client)
            } else {
                maglev::hash_ip(client.ip())
            };
            return table.lookup(hash).and_then(|i| sel.members.get(i).cloned());
        }
        let turn = self.rr.fetch_add(1, Relaxed);
        match algorithm {
            LbAlgorithm::LeastConnections => {
                // Fewest active per unit of weight; scanning from a rotating
                // start spreads ties.
                let n = sel.members.len();
                let mut best: Option<&Arc<Member>> = None;
                for k in 0..n {
                    let m = &sel.members[(turn + k) % n];
                    let better = match best {
                        None => true,
                        Some(b) => {
                            let (am, ab) = (
                                m.counters.active_connections.load(Relaxed),
                                b.counters.active_connections.load(Relaxed),
                            );
                            let (wm, wb) = (
                                u64::from(m.weight.load(Relaxed)),
                                u64::from(b.weight.load(Relaxed)),
                            );
                            am * wb < ab * wm
                        }
                    };
                    if better {
                        best = Some(m);
                    }
                }
                best.cloned()
            }
            _ => {
                let slot = sel.slots[turn % sel.slots.len()];
                sel.members.get(slot as usize).cloned()
            }
        }
    }

    pub fn status(&self) -> PoolStatus {
        let plan = self.plan.load();
        let members: Vec<MemberStatus> = self
            .members
            .load()
            .iter()
            .map(|m| MemberStatus {
                id: m.id.clone(),
                address: m.addr,
                provisioning_status: ProvisioningStatus::Active,
                operating_status: m.operating_status(),
                stats: m.counters.snapshot(),
            })
            .collect();
        let errors = members
            .iter()
            .filter(|m| m.operating_status == OperatingStatus::Error)
            .count();
        let operating_status = if !plan.enabled {
            OperatingStatus::Offline
        } else if self.selection.load().members.is_empty() && !members.is_empty() {
            OperatingStatus::Error
        } else if errors > 0 {
            OperatingStatus::Degraded
        } else if plan.monitor.is_none() {
            OperatingStatus::NoMonitor
        } else {
            OperatingStatus::Online
        };
        PoolStatus {
            id: self.id.clone(),
            provisioning_status: ProvisioningStatus::Active,
            operating_status,
            stats: self.counters.snapshot(),
            members,
        }
    }
}

/// nginx's smooth weighted round-robin: weights {5,1,1} give a,a,b,a,c,a,a
/// rather than a,a,a,a,a,b,c. One full cycle (Σweights slots) is stored.
fn smooth_weighted_order(weights: &[u16]) -> Vec<u32> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i64::from(w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(u32::try_from(best).unwrap_or(0));
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PoolProtocol;
    use std::net::IpAddr;

    fn plan(algorithm: LbAlgorithm, weights: &[u16]) -> PoolPlan {
        PoolPlan {
            id: "p".into(),
            enabled: true,
            protocol: PoolProtocol::Http,
            algorithm,
            sticky_source_ip: false,
            monitor: None,
            members: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| MemberPlan {
                    id: format!("m{i}"),
                    enabled: true,
                    addr: SocketAddr::from(([127, 0, 0, 1], 9000 + u16::try_from(i).unwrap())),
                    monitor_addr: SocketAddr::from(([127, 0, 0, 1], 9000)),
                    weight: w,
                    backup: false,
                })
                .collect(),
        }
    }

    fn tally(pool: &Pool, n: usize, client: impl Fn(usize) -> IpAddr) -> Vec<usize> {
        let mut c = vec![0; pool.members().len()];
        for i in 0..n {
            let m = pool.pick(SocketAddr::new(client(i), 40000)).unwrap();
            let idx: usize = m.id[1..].parse().unwrap();
            c[idx] += 1;
        }
        c
    }

    #[test]
    fn smooth_order_interleaves() {
        assert_eq!(smooth_weighted_order(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert!(smooth_weighted_order(&[0, 0]).is_empty());
    }

    #[test]
    fn round_robin_follows_weights_and_skips_down_members() {
        let pool = Pool::new(&plan(LbAlgorithm::RoundRobin, &[1, 2, 1]));
        let ip = |_| IpAddr::from([10, 0, 0, 1]);
        assert_eq!(tally(&pool, 400, ip), vec![100, 200, 100]);
        let m1 = pool.members()[1].clone();
        assert!(pool.set_health(&m1, Health::Down));
        assert_eq!(tally(&pool, 400, ip), vec![200, 0, 200]);
        assert!(pool.set_health(&m1, Health::Up));
        assert_eq!(tally(&pool, 400, ip), vec![100, 200, 100]);
    }

    #[test]
    fn backups_serve_only_when_all_primaries_are_down() {
        let mut p = plan(LbAlgorithm::RoundRobin, &[1, 1]);
        p.members[1].backup = true;
        let pool = Pool::new(&p);
        let ip = |_| IpAddr::from([10, 0, 0, 1]);
        assert_eq!(tally(&pool, 10, ip), vec![10, 0]);
        let m0 = pool.members()[0].clone();
        pool.set_health(&m0, Health::Down);
        assert_eq!(tally(&pool, 10, ip), vec![0, 10]);
        assert_eq!(pool.status().operating_status, OperatingStatus::Degraded);
    }

    #[test]
    fn source_ip_port_keeps_a_connection_and_spreads_one_clients_ports() {
        let pool = Pool::new(&plan(LbAlgorithm::SourceIpPort, &[1, 1]));
        let client = |port: u16| SocketAddr::from(([10, 0, 0, 1], port));
        let pick = |port| pool.pick(client(port)).unwrap().id.clone();
        let first: Vec<String> = (1000..3000).map(pick).collect();
        let again: Vec<String> = (1000..3000).map(pick).collect();
        assert_eq!(first, again);
        let on_m0 = first.iter().filter(|m| *m == "m0").count();
        assert!((800..1200).contains(&on_m0), "{on_m0} of 2000 ports on m0");
        // Persistence by source address wins over the per-port hash.
        let mut sticky = plan(LbAlgorithm::SourceIpPort, &[1, 1]);
        sticky.sticky_source_ip = true;
        let pool = Pool::new(&sticky);
        let one = pool.pick(client(1000)).unwrap().id.clone();
        assert!((1000..1200).all(|p| pool.pick(client(p)).unwrap().id == one));
    }

    #[test]
    fn source_ip_is_sticky_and_spreads_clients() {
        let pool = Pool::new(&plan(LbAlgorithm::SourceIp, &[1, 1, 1]));
        let client = |i: usize| IpAddr::from(u32::try_from(0x0a00_0000 + i).unwrap().to_be_bytes());
        let first: Vec<String> = (0..3000)
            .map(|i| {
                pool.pick(SocketAddr::new(client(i), 40000))
                    .unwrap()
                    .id
                    .clone()
            })
            .collect();
        let again: Vec<String> = (0..3000)
            .map(|i| {
                pool.pick(SocketAddr::new(client(i), 40000))
                    .unwrap()
                    .id
                    .clone()
            })
            .collect();
        assert_eq!(first, again);
        for c in tally(&pool, 3000, client) {
            assert!((800..1200).contains(&c), "{c}");
        }
        // Taking m2 down moves only m2's clients.
        let m2 = pool.members()[2].clone();
        pool.set_health(&m2, Health::Down);
        for (i, before) in first.iter().enumerate() {
            let now = pool
                .pick(SocketAddr::new(client(i), 40000))
                .unwrap()
                .id
                .clone();
            if before != "m2" {
                assert_eq!(&now, before);
            } else {
                assert_ne!(now, "m2");
            }
        }
    }

    #[test]
    fn least_connections_prefers_the_idle_member() {
        let pool = Pool::new(&plan(LbAlgorithm::LeastConnections, &[1, 1]));
        pool.members()[0]
            .counters
            .active_connections
            .store(5, Relaxed);
        let ip = |_| IpAddr::from([10, 0, 0, 1]);
        assert_eq!(tally(&pool, 10, ip), vec![0, 10]);
    }

    #[test]
    fn reconfigure_keeps_member_state_and_admin_down_removes() {
        let pool = Pool::new(&plan(LbAlgorithm::RoundRobin, &[1, 1]));
        let before = pool.members()[0].clone();
        Counters::add(&before.counters.requests, 7);
        let mut p = plan(LbAlgorithm::RoundRobin, &[1, 1]);
        p.members[1].enabled = false;
        pool.reconfigure(&p);
        assert!(Arc::ptr_eq(&before, &pool.members()[0]));
        let ip = |_| IpAddr::from([10, 0, 0, 1]);
        assert_eq!(tally(&pool, 4, ip), vec![4, 0]);
        assert_eq!(
            pool.status().members[1].operating_status,
            OperatingStatus::Offline
        );
    }
}
