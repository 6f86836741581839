//! The running proxy and its one typed entry point, [`Proxy::apply`].
//!
//! `apply` reconciles the running proxy to a desired [`LoadBalancer`]:
//! 1. validate and compile it ([`crate::plan::compile`]);
//! 2. load every TLS certificate and bind every *new* listener address —
//!    any failure here returns an error and changes nothing;
//! 3. commit: reconfigure pools in place (members keep health and counters),
//!    restart monitors whose plan or member set changed, swap the route of
//!    listeners whose address is kept, start new listeners, close removed
//!    ones. Established connections are never closed by an apply; a closed
//!    listener only stops accepting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::cores::{Core, CoreError};
use crate::health::{self, PoolMonitor};
use crate::listener::{self, BindError, Route, RunningListener};
use crate::model::LoadBalancer;
use crate::plan::{self, PolicyAction, ValidationError};
use crate::pool::Pool;
use crate::stats::{LbStatus, ListenerStatus, OperatingStatus, ProvisioningStatus};
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("Cannot start the proxy's core threads")]
    Core(#[from] CoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("Invalid load balancer configuration: {0}")]
    Invalid(#[from] ValidationError),
    #[error("Listener {listener:?}: cannot load its TLS certificate")]
    Tls {
        listener: String,
        #[source]
        source: Box<TlsError>,
    },
    #[error("Listener {listener:?}: cannot open its sockets")]
    Bind {
        listener: String,
        #[source]
        source: BindError,
    },
}

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Core threads (each with its own runtime and SO_REUSEPORT sockets).
    pub cores: usize,
    /// Pin core thread i to CPU i.
    pub pin_cores: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin_cores: false,
        }
    }
}

/// What an apply changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub listeners_started: Vec<String>,
    pub listeners_updated: Vec<String>,
    pub listeners_stopped: Vec<SocketAddr>,
    pub pools_added: Vec<String>,
    pub pools_removed: Vec<String>,
}

#[derive(Default)]
struct State {
    id: String,
    listeners: HashMap<SocketAddr, (String, RunningListener)>,
    pools: HashMap<String, Arc<Pool>>,
    monitors: HashMap<String, PoolMonitor>,
}

pub struct Proxy {
    // Field order: state (listeners, monitors) drops before the threads.
    state: Mutex<State>,
    health: Core,
    cores: Vec<Core>,
}

impl Proxy {
    /// Starts the core threads and the health thread; serves nothing until
    /// the first [`Proxy::apply`].
    pub fn start(options: ProxyOptions) -> Result<Proxy, StartError> {
        let n = options.cores.max(1);
        let cores = (0..n)
            .map(|i| Core::start(format!("keel-lb-{i}"), options.pin_cores.then_some(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let health = Core::start("keel-lb-health".into(), None)?;
        Ok(Proxy {
            state: Mutex::new(State::default()),
            health,
            cores,
        })
    }

    /// Reconciles the running proxy to `desired` (see the module doc).
    pub fn apply(&self, desired: &LoadBalancer) -> Result<ApplyReport, ApplyError> {
        let plan = plan::compile(desired)?;
        let listeners = if plan.enabled {
            plan.listeners.as_slice()
        } else {
            &[]
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());

        // Everything that can fail, before anything changes.
        let mut acceptors = HashMap::new();
        for l in listeners {
            if let Some(files) = &l.tls {
                let acceptor = tls::acceptor(files).map_err(|source| ApplyError::Tls {
                    listener: l.id.clone(),
                    source: Box::new(source),
                })?;
                acceptors.insert(l.id.clone(), acceptor);
            }
        }
        let mut sockets = HashMap::new();
        for l in listeners {
            if !state.listeners.contains_key(&l.bind) {
                let s = listener::bind(l.bind, self.cores.len()).map_err(|source| {
                    ApplyError::Bind {
                        listener: l.id.clone(),
                        source,
                    }
                })?;
                sockets.insert(l.bind, s);
            }
        }

        let mut report = ApplyReport::default();
        let mut pools = HashMap::new();
        for p in &plan.pools {
            let pool = match state.pools.get(&p.id) {
                Some(pool) => {
                    pool.reconfigure(p);
                    pool.clone()
                }
                None => {
                    report.pools_added.push(p.id.clone());
                    Pool::new(p)
                }
            };
            pools.insert(p.id.clone(), pool);
        }
        report.pools_removed = state
            .pools
            .keys()
            .filter(|id| !pools.contains_key(*id))
            .cloned()
            .collect();
        let mut monitors = HashMap::new();
        for p in &plan.pools {
            let (Some(monitor), Some(pool)) = (&p.monitor, pools.get(&p.id)) else {
                continue;
            };
            let key = (monitor.clone(), health::members_key(pool));
            let running = state.monitors.remove(&p.id).filter(|m| m.key == key);
            let m = running
                .unwrap_or_else(|| health::start(&self.health.handle, pool, monitor.clone()));
            monitors.insert(p.id.clone(), m);
        }
        // Monitors of removed pools, or pools that lost theirs, stop here.
        state.monitors = monitors;

        let handles: Vec<_> = self.cores.iter().map(|c| c.handle.clone()).collect();
        let mut running = HashMap::new();
        for l in listeners {
            let route = Route {
                plan: l.clone(),
                default_pool: l
                    .default_pool
                    .as_ref()
                    .and_then(|id| pools.get(id).cloned()),
                policy_pools: l
                    .policies
                    .iter()
                    .map(|p| match &p.action {
                        PolicyAction::ToPool(id) => pools.get(id).cloned(),
                        _ => None,
                    })
                    .collect(),
                tls: acceptors.remove(&l.id),
                access_log: plan.access_log,
            };
            let entry = match (state.listeners.remove(&l.bind), sockets.remove(&l.bind)) {
                (Some((_, existing)), _) => {
                    existing.shared.route.store(Arc::new(route));
                    report.listeners_updated.push(l.id.clone());
                    existing
                }
                (None, Some(socks)) => {
                    report.listeners_started.push(l.id.clone());
                    RunningListener::start(l.bind, socks, &handles, route)
                }
                // Bound above for every address not already running.
                (None, None) => continue,
            };
            running.insert(l.bind, (l.id.clone(), entry));
        }
        report.listeners_stopped = state.listeners.keys().copied().collect();
        for (_, (_, stopped)) in std::mem::replace(&mut state.listeners, running) {
            stopped.close();
        }
        state.pools = pools;
        state.id = plan.id.clone();
        tracing::info!(lb = %plan.id, started = ?report.listeners_started,
            updated = ?report.listeners_updated, stopped = ?report.listeners_stopped,
            "configuration applied");
        Ok(report)
    }

    /// Octavia-style status tree with counters.
    pub fn status(&self) -> LbStatus {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut pools: Vec<_> = state.pools.values().map(|p| p.status()).collect();
        pools.sort_by(|a, b| a.id.cmp(&b.id));
        let mut listeners: Vec<_> = state
            .listeners
            .values()
            .map(|(id, l)| ListenerStatus {
                id: id.clone(),
                address: l.bind,
                provisioning_status: ProvisioningStatus::Active,
                operating_status: OperatingStatus::Online,
                stats: l.shared.counters.snapshot(),
            })
            .collect();
        listeners.sort_by(|a, b| a.id.cmp(&b.id));
        let degraded = pools.iter().any(|p| {
            matches!(
                p.operating_status,
                OperatingStatus::Degraded | OperatingStatus::Error
            )
        });
        LbStatus {
            id: state.id.clone(),
            provisioning_status: ProvisioningStatus::Active,
            operating_status: if listeners.is_empty() {
                OperatingStatus::Offline
            } else if degraded {
                OperatingStatus::Degraded
            } else {
                OperatingStatus::Online
            },
            listeners,
            pools,
        }
    }

    /// Number of core threads serving connections.
    pub fn cores(&self) -> usize {
        self.cores.len()
    }
}
