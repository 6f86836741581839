//! Counters per listener, pool and member, and the status report.
//!
//! Counters are relaxed atomics shared by all cores: one `fetch_add` per
//! connection or request, never per byte copied (body frames are counted in
//! whole frames). Octavia's stats names are kept (`bytes_in`, `bytes_out`,
//! `active_connections`, `total_connections`, `request_errors`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

#[derive(Debug, Default)]
pub struct Counters {
    pub active_connections: AtomicU64,
    pub total_connections: AtomicU64,
    pub requests: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Requests or connections that failed (no member, member error, timeout).
    pub request_errors: AtomicU64,
    /// Client connections closed at accept because `connection_limit` was reached.
    pub rejected_connections: AtomicU64,
    pub responses_2xx: AtomicU64,
    pub responses_3xx: AtomicU64,
    pub responses_4xx: AtomicU64,
    pub responses_5xx: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn response(&self, status: u16) {
        let c = match status {
            200..=299 => &self.responses_2xx,
            300..=399 => &self.responses_3xx,
            400..=499 => &self.responses_4xx,
            _ => &self.responses_5xx,
        };
        c.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            active_connections: self.active_connections.load(Relaxed),
            total_connections: self.total_connections.load(Relaxed),
            requests: self.requests.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            request_errors: self.request_errors.load(Relaxed),
            rejected_connections: self.rejected_connections.load(Relaxed),
            responses_2xx: self.responses_2xx.load(Relaxed),
            responses_3xx: self.responses_3xx.load(Relaxed),
            responses_4xx: self.responses_4xx.load(Relaxed),
            responses_5xx: self.responses_5xx.load(Relaxed),
        }
    }
}

/// Decrements `active_connections` of every counter set it holds on drop.
pub struct ActiveGuard<const N: usize>(pub [std::sync::Arc<Counters>; N]);

impl<const N: usize> ActiveGuard<N> {
    pub fn enter(counters: [std::sync::Arc<Counters>; N]) -> Self {
        for c in &counters {
            c.active_connections.fetch_add(1, Relaxed);
            c.total_connections.fetch_add(1, Relaxed);
        }
        ActiveGuard(counters)
    }

    /// Takes over connections already counted as active by the caller.
    pub fn adopt(counters: [std::sync::Arc<Counters>; N]) -> Self {
        ActiveGuard(counters)
    }
}

impl<const N: usize> Drop for ActiveGuard<N> {
    fn drop(&mut self) {
        for c in &self.0 {
            c.active_connections.fetch_sub(1, Relaxed);
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CountersSnapshot {
    pub active_connections: u64,
    pub total_connections: u64,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub request_errors: u64,
    pub rejected_connections: u64,
    pub responses_2xx: u64,
    pub responses_3xx: u64,
    pub responses_4xx: u64,
    pub responses_5xx: u64,
}

/// Octavia `operating_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OperatingStatus {
    Online,
    Offline,
    Degraded,
    Error,
    NoMonitor,
    Draining,
}

/// Octavia `provisioning_status`: ACTIVE once the proxy runs the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProvisioningStatus {
    Active,
}

#[derive(Debug, Clone, Serialize)]
pub struct LbStatus {
    pub id: String,
    pub provisioning_status: ProvisioningStatus,
    pub operating_status: OperatingStatus,
    pub listeners: Vec<ListenerStatus>,
    pub pools: Vec<PoolStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerStatus {
    pub id: String,
    pub address: std::net::SocketAddr,
    pub provisioning_status: ProvisioningStatus,
    pub operating_status: OperatingStatus,
    pub stats: CountersSnapshot,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    pub id: String,
    pub provisioning_status: ProvisioningStatus,
    pub operating_status: OperatingStatus,
    pub stats: CountersSnapshot,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub id: String,
    pub address: std::net::SocketAddr,
    pub provisioning_status: ProvisioningStatus,
    pub operating_status: OperatingStatus,
    pub stats: CountersSnapshot,
}

impl LbStatus {
    pub fn pool(&self, id: &str) -> Option<&PoolStatus> {
        self.pools.iter().find(|p| p.id == id)
    }
    pub fn listener(&self, id: &str) -> Option<&ListenerStatus> {
        self.listeners.iter().find(|l| l.id == id)
    }
}

impl PoolStatus {
    pub fn member(&self, id: &str) -> Option<&MemberStatus> {
        self.members.iter().find(|m| m.id == id)
    }
}
