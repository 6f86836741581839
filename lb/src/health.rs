//! Active health monitors: one task per (pool, member) on the proxy's health
//! thread probes every `delay`, each probe bounded by `timeout`.
//!
//! Rise/fall as in HAProxy (`check inter <delay> rise <max_retries> fall
//! <max_retries_down>`): a member starts up; `max_retries_down` consecutive
//! failures take it to ERROR, `max_retries` consecutive successes bring it
//! back ONLINE. A member that has never passed a probe goes down on its first
//! failure, so a dead member added at apply time does not wait out `fall`
//! probes while taking traffic. Transitions are logged as events
//! (`keel_lb::health`) and republish the pool's selection at once.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::plan::{MonitorPlan, ProbeKind};
use crate::pool::{Health, Member, Pool};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("Cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with {addr} failed")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("Cannot build the probe request")]
    Request(#[source] hyper::http::Error),
    #[error("{addr} answered {status}, expected one of the configured codes")]
    UnexpectedStatus { addr: SocketAddr, status: u16 },
    #[error("No answer from {addr} within the monitor timeout")]
    Timeout { addr: SocketAddr },
}

/// The running probes of one pool; aborted on drop.
pub struct PoolMonitor {
    /// What the tasks were started for: restarted when this changes.
    pub key: (MonitorPlan, Vec<usize>),
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PoolMonitor {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Identity of the member set a monitor watches (the `Arc` addresses: a
/// member recreated by an apply needs a new task).
pub fn members_key(pool: &Pool) -> Vec<usize> {
    pool.members()
        .iter()
        .map(|m| Arc::as_ptr(m) as usize)
        .collect()
}

pub fn start(rt: &tokio::runtime::Handle, pool: &Arc<Pool>, plan: MonitorPlan) -> PoolMonitor {
    let tasks = pool
        .members()
        .iter()
        .map(|m| rt.spawn(watch_member(pool.clone(), m.clone(), plan.clone())))
        .collect();
    PoolMonitor {
        key: (plan, members_key(pool)),
        tasks,
    }
}

async fn watch_member(pool: Arc<Pool>, member: Arc<Member>, plan: MonitorPlan) {
    let mut ticker = tokio::time::interval(plan.delay);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    loop {
        ticker.tick().await;
        let result =
            match tokio::time::timeout(plan.timeout, probe(&plan, member.monitor_addr)).await {
                Ok(r) => r,
                Err(_) => Err(ProbeError::Timeout {
                    addr: member.monitor_addr,
                }),
            };
        match result {
            Ok(()) => {
                ok_run += 1;
                fail_run = 0;
                member.seen_up.store(true, Relaxed);
                if member.health() == Health::Down
                    && ok_run >= plan.rise
                    && pool.set_health(&member, Health::Up)
                {
                    tracing::info!(target: "keel_lb::health", pool = %pool.id, member = %member.id,
                        address = %member.addr, "member ONLINE");
                }
            }
            Err(err) => {
                fail_run += 1;
                ok_run = 0;
                let fall = if member.seen_up.load(Relaxed) {
                    plan.fall
                } else {
                    1
                };
                if member.health() != Health::Down
                    && fail_run >= fall
                    && pool.set_health(&member, Health::Down)
                {
                    tracing::warn!(target: "keel_lb::health", pool = %pool.id, member = %member.id,
                        address = %member.addr, error = %err, "member ERROR");
                }
            }
        }
    }
}

/// One probe: TCP connect, or an HTTP request whose status must be expected.
pub async fn probe(plan: &MonitorPlan, addr: SocketAddr) -> Result<(), ProbeError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ProbeError::Connect { addr, source })?;
    if plan.kind == ProbeKind::Tcp {
        return Ok(());
    }
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ProbeError::Http { addr, source })?;
    // Drives the connection; ends when the probe drops the sender.
    tokio::spawn(conn);
    let host = plan.host.clone().unwrap_or_else(|| addr.to_string());
    let request = hyper::Request::builder()
        .method(plan.method.as_str())
        .uri(plan.url_path.as_str())
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONNECTION, "close")
        .header(hyper::header::USER_AGENT, "keel-lb-health")
        .body(Empty::<Bytes>::new())
        .map_err(ProbeError::Request)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|source| ProbeError::Http { addr, source })?;
    let status = response.status().as_u16();
    if plan.accepts(status) {
        Ok(())
    } else {
        Err(ProbeError::UnexpectedStatus { addr, status })
    }
}
