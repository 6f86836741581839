//! Listeners: one SO_REUSEPORT socket per core, an accept loop per socket,
//! the connection limit, and dispatch to the HTTP or TCP proxy.
//!
//! A running listener is keyed by its bind address. Its *route* (plan plus
//! resolved pools and TLS acceptor) sits behind an `ArcSwap`: an apply that
//! keeps the address swaps the route and leaves the sockets and every
//! established connection alone. HTTP connections re-read the route on each
//! request, so keep-alive clients see the new configuration immediately.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::model::ListenerProtocol;
use crate::plan::ListenerPlan;
use crate::pool::Pool;
use crate::stats::{ActiveGuard, Counters};

/// The listener's configuration as connections see it.
pub struct Route {
    pub plan: ListenerPlan,
    pub default_pool: Option<Arc<Pool>>,
    /// Parallel to `plan.policies`: the pool of each REDIRECT_TO_POOL policy.
    pub policy_pools: Vec<Option<Arc<Pool>>>,
    pub tls: Option<TlsAcceptor>,
    pub access_log: bool,
}

/// What every connection task of a listener shares.
pub struct Shared {
    pub route: ArcSwap<Route>,
    pub counters: Arc<Counters>,
}

pub struct RunningListener {
    pub bind: SocketAddr,
    pub shared: Arc<Shared>,
    /// Dropping the sender ends every accept loop of the listener.
    stop: watch::Sender<()>,
    /// Disconnects once every accept loop has closed its socket.
    closed: std::sync::mpsc::Receiver<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("Cannot create a socket for {addr}")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot bind {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Opens `n` SO_REUSEPORT sockets on `addr` (one per core).
pub fn bind(addr: SocketAddr, n: usize) -> Result<Vec<std::net::TcpListener>, BindError> {
    (0..n)
        .map(|_| {
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
                .map_err(|source| BindError::Socket { addr, source })?;
            let setup = || -> std::io::Result<()> {
                sock.set_reuse_address(true)?;
                sock.set_reuse_port(true)?;
                if addr.is_ipv6() {
                    sock.set_only_v6(true)?;
                }
                sock.set_nonblocking(true)
            };
            setup().map_err(|source| BindError::Socket { addr, source })?;
            sock.bind(&addr.into())
                .map_err(|source| BindError::Bind { addr, source })?;
            sock.listen(1024)
                .map_err(|source| BindError::Listen { addr, source })?;
            Ok(sock.into())
        })
        .collect()
}

impl RunningListener {
    /// Starts one accept loop per core on the sockets from [`bind`].
    pub fn start(
        bind: SocketAddr,
        sockets: Vec<std::net::TcpListener>,
        cores: &[tokio::runtime::Handle],
        route: Route,
    ) -> RunningListener {
        let shared = Arc::new(Shared {
            route: ArcSwap::from_pointee(route),
            counters: Arc::default(),
        });
        let (stop, _) = watch::channel(());
        let (closed_tx, closed) = std::sync::mpsc::channel();
        for (socket, core) in sockets.into_iter().zip(cores) {
            core.spawn(accept_loop(
                socket,
                shared.clone(),
                stop.subscribe(),
                closed_tx.clone(),
            ));
        }
        RunningListener {
            bind,
            shared,
            stop,
            closed,
        }
    }

    /// Stops accepting and waits (bounded) until every socket is closed, so
    /// the address refuses connections when this returns. Established
    /// connections are left alone.
    pub fn close(self) {
        drop(self.stop);
        let _ = self.closed.recv_timeout(Duration::from_secs(5));
    }
}

async fn accept_loop(
    socket: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<()>,
    closed: std::sync::mpsc::Sender<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register a listening socket");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.changed() => {
                drop(listener);
                drop(closed);
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => admit(stream, peer, &shared),
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
}

/// Applies the connection limit, then hands the connection to its proxy.
fn admit(stream: tokio::net::TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    let route = shared.route.load_full();
    let counters = &shared.counters;
    // Reserve the slot first so concurrent accepts on other cores cannot
    // both take the last one.
    let before = counters.active_connections.fetch_add(1, Relaxed);
    if let Some(limit) = route.plan.connection_limit {
        if usize::try_from(before).unwrap_or(usize::MAX) >= limit {
            counters.active_connections.fetch_sub(1, Relaxed);
            Counters::add(&counters.rejected_connections, 1);
            // Dropping the stream closes it: HAProxy's maxconn would leave it
            // in the backlog instead; an immediate close tells the client.
            return;
        }
    }
    Counters::add(&counters.total_connections, 1);
    let guard = ActiveGuard::adopt([counters.clone()]);
    let _ = stream.set_nodelay(true);
    let shared = shared.clone();
    tokio::spawn(async move {
        let _guard = guard;
        match route.plan.protocol {
            ListenerProtocol::Http => {
                crate::http::serve(stream, peer, false, shared).await;
            }
            ListenerProtocol::TerminatedHttps => {
                let Some(acceptor) = route.tls.clone() else {
                    return;
                };
                let handshake = acceptor.accept(stream);
                let tls = match route.plan.client_data_timeout {
                    Some(t) => tokio::time::timeout(t, handshake)
                        .await
                        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
                    None => handshake.await,
                };
                match tls {
                    Ok(tls) => crate::http::serve(tls, peer, true, shared).await,
                    Err(e) => {
                        Counters::add(&shared.counters.request_errors, 1);
                        tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
                    }
                }
            }
            ListenerProtocol::Tcp | ListenerProtocol::Https | ListenerProtocol::Udp => {
                crate::tcp::serve(stream, peer, &route, &shared.counters).await;
            }
        }
    });
}
