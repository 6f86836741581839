//! `keel dataplane`: the data plane as a process. Opens AF_PACKET ports on
//! the named interfaces, applies an optional JSON desired state, runs `--workers`
//! worker threads and serves the control socket.
//!
//! Ports this crate cannot open itself (vhost-user-net NICs live in
//! keel-vhost, which depends on this crate) are passed to
//! [`run_with_ports`] by whoever sees both crates (`keel dataplane`).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::afpacket::AfPacketPort;
use crate::config::{ConfigError, ConfigHandle};
use crate::control::Controller;
use crate::counters::Stats;
use crate::engine::Worker;
use crate::handoff::Fabric;
use crate::model::DesiredState;
use crate::port::{Port, PortError};

/// Command-line options of `keel dataplane`.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// Interface to forward on (repeat the option); must exist in this namespace.
    #[arg(long = "interface")]
    pub interfaces: Vec<String>,
    /// vhost-user-net NIC as `NAME=SOCKET` (repeat the option): serves the
    /// socket and forwards the VM's frames as port NAME. Only `keel
    /// dataplane` opens these (see [`run_with_ports`]).
    #[arg(long = "vhost-user-net", value_name = "NAME=SOCKET")]
    pub vhost_user_net: Vec<String>,
    /// Desired state (JSON) to apply at start.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Unix socket serving apply / get / stats / trace requests.
    #[arg(long)]
    pub socket: PathBuf,
    /// Flow-cache entries per worker; 0 switches the cache off (A/B runs).
    #[arg(long, default_value_t = crate::flowcache::DEFAULT_ENTRIES)]
    pub flow_cache_entries: usize,
    /// Worker threads, each pinned to one of the allowed CPUs (round robin)
    /// and reading every interface through its own socket of a
    /// `PACKET_FANOUT` group; frames are steered between workers by a
    /// symmetric flow hash (module `steer`). AF_PACKET ports only when > 1.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
}

/// Why the data plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("Open port")]
    OpenPort(#[source] PortError),
    #[error("Read config {path}")]
    ReadConfig {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Parse config {path}")]
    ParseConfig {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Apply config")]
    ApplyConfig(#[source] ConfigError),
    #[error("Bind control socket {path}")]
    BindSocket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("No ports: give --interface (or --vhost-user-net to keel dataplane)")]
    NoPorts,
    #[error("--vhost-user-net needs keel-vhost: run `keel dataplane`")]
    VhostUnsupported,
    #[error("--workers must be 1..=64, and 1 with --vhost-user-net ports (got {0})")]
    BadWorkers(usize),
    #[error("Spawn worker")]
    SpawnWorker(#[source] std::io::Error),
}

/// Runs until killed, on AF_PACKET ports only.
pub fn run(args: DaemonArgs) -> Result<(), DaemonError> {
    if !args.vhost_user_net.is_empty() {
        return Err(DaemonError::VhostUnsupported);
    }
    run_with_ports(args, Vec::new())
}

/// Runs until killed on the AF_PACKET interfaces of `args` followed by
/// `extra` ports (interface indexes in that order; each port's `name()` is
/// what the desired state's `interface` refers to).
pub fn run_with_ports(args: DaemonArgs, extra: Vec<Box<dyn Port>>) -> Result<(), DaemonError> {
    let workers = args.workers;
    if workers == 0 || workers > 64 || (workers > 1 && !extra.is_empty()) {
        return Err(DaemonError::BadWorkers(workers));
    }
    let mut ports: Vec<Box<dyn Port>> = Vec::with_capacity(args.interfaces.len() + extra.len());
    // Worker w's sockets; worker 0's create the fanout groups.
    let mut groups = Vec::with_capacity(args.interfaces.len());
    for name in &args.interfaces {
        if workers == 1 {
            ports.push(Box::new(
                AfPacketPort::open(name).map_err(DaemonError::OpenPort)?,
            ));
        } else {
            let (p, g) = AfPacketPort::open_fanout(name, None).map_err(DaemonError::OpenPort)?;
            groups.push(g);
            ports.push(Box::new(p));
        }
    }
    ports.extend(extra);
    if ports.is_empty() {
        return Err(DaemonError::NoPorts);
    }
    let mut more: Vec<Vec<Box<dyn Port>>> = Vec::with_capacity(workers.saturating_sub(1));
    for _ in 1..workers {
        let mut mine: Vec<Box<dyn Port>> = Vec::with_capacity(args.interfaces.len());
        for (name, g) in args.interfaces.iter().zip(&groups) {
            let (p, _) =
                AfPacketPort::open_fanout(name, Some(*g)).map_err(DaemonError::OpenPort)?;
            mine.push(Box::new(p));
        }
        more.push(mine);
    }
    let names: Vec<String> = ports.iter().map(|p| p.name().to_string()).collect();
    let config = ConfigHandle::new(names.clone());
    if let Some(path) = &args.config {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| DaemonError::ReadConfig {
            path: shown.clone(),
            source,
        })?;
        let state: DesiredState =
            serde_json::from_str(&text).map_err(|source| DaemonError::ParseConfig {
                path: shown,
                source,
            })?;
        config.apply(state).map_err(DaemonError::ApplyConfig)?;
    }
    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket).map_err(|source| DaemonError::BindSocket {
        path: args.socket.display().to_string(),
        source,
    })?;
    let stats = Arc::new(Stats::with_workers(&names, workers));
    let stop = Arc::new(AtomicBool::new(false));
    let fabric = Fabric::new(workers);
    let cpus = crate::engine::allowed_cpus();
    let mut handles = Vec::with_capacity(workers);
    for (index, ports) in std::iter::once(ports).chain(more).enumerate() {
        let worker = Worker::new(ports, config.tables(), Arc::clone(&stats))
            .with_flow_cache(args.flow_cache_entries)
            .with_shard(index, Arc::clone(&fabric));
        // Pin only when there are several workers (one worker keeps the
        // scheduler's choice, as before).
        let cpu = (workers > 1 && !cpus.is_empty())
            .then(|| cpus.get(index % cpus.len()).copied())
            .flatten();
        handles.push(
            worker
                .spawn_on(Arc::clone(&stop), cpu)
                .map_err(DaemonError::SpawnWorker)?,
        );
    }
    {
        let (tables, stop) = (config.tables(), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("lb-monitor".into())
            .spawn(move || crate::lb4_health::run(tables, stop))
            .map_err(DaemonError::SpawnWorker)?;
    }
    tracing::info!(interfaces = ?names, workers, socket = %args.socket.display(), "data plane running");
    let controller = Controller { config, stats };
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let c = controller.clone();
                std::thread::spawn(move || {
                    if let Err(e) = c.serve(stream) {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "control accept failed"),
        }
    }
    Ok(())
}
