//! Serving one vhost-user-net socket across frontend reconnects: the socket
//! is bound before [`listen`] returns (a frontend may connect right away),
//! then a thread accepts one frontend at a time, each with a fresh
//! [`NetDevice`] publishing to the same port.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::net::device::{NetDevice, NetShared};
use crate::net::port::VhostNetPort;

/// Errors setting up a vhost-user-net socket.
#[derive(Debug, thiserror::Error)]
pub enum NetServeError {
    /// Binding the socket failed.
    #[error("Cannot listen on {0}")]
    Listen(PathBuf, #[source] std::io::Error),
    /// The wake-up eventfd could not be created.
    #[error("Cannot create port state")]
    Shared(#[source] std::io::Error),
    /// The serving thread could not be started.
    #[error("Cannot spawn server thread")]
    Spawn(#[source] std::io::Error),
}

#[derive(Default)]
struct StopState {
    stopped: AtomicBool,
    connection: Mutex<Option<ShutdownHandle>>,
}

/// The thread serving a socket; stopped and joined on drop.
pub struct NetServer {
    socket: PathBuf,
    stop: Arc<StopState>,
    thread: Option<JoinHandle<()>>,
}

impl NetServer {
    /// Ends the current connection and the accept loop.
    pub fn stop(&mut self) {
        self.stop.stopped.store(true, Ordering::Release);
        if let Ok(mut c) = self.stop.connection.lock() {
            if let Some(h) = c.take() {
                h.shutdown();
            }
        }
        // Wake an accept() in progress.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for NetServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds `socket` and serves it on a new thread; returns the data-plane
/// port `name` fed by it. `mac` is shown in the config space.
pub fn listen(
    name: &str,
    socket: &Path,
    mac: [u8; 6],
) -> Result<(VhostNetPort, NetServer), NetServeError> {
    let _ = std::fs::remove_file(socket);
    let listen_err = |e| NetServeError::Listen(socket.to_path_buf(), e);
    let public = UnixListener::bind(socket).map_err(listen_err)?;
    // The device's own socket, reached only through the relay.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let internal_name = format!(
        "keel-vnet-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let internal_addr =
        SocketAddr::from_abstract_name(internal_name.as_bytes()).map_err(listen_err)?;
    let internal = UnixListener::bind_addr(&internal_addr).map_err(listen_err)?;
    let listener = Sockets {
        public,
        internal: Listener::from(internal),
        internal_addr,
    };
    let shared = Arc::new(NetShared::new(mac).map_err(NetServeError::Shared)?);
    let stop = Arc::new(StopState::default());
    let thread = {
        let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
        let name = name.to_string();
        std::thread::Builder::new()
            .name(format!("keel-vnet-{name}"))
            .spawn(move || serve(&name, listener, &shared, &stop))
            .map_err(NetServeError::Spawn)?
    };
    let server = NetServer {
        socket: socket.to_path_buf(),
        stop,
        thread: Some(thread),
    };
    Ok((VhostNetPort::new(name, shared), server))
}

/// The socket QEMU connects to and the device's private one.
struct Sockets {
    public: UnixListener,
    internal: Listener,
    internal_addr: SocketAddr,
}

fn serve(name: &str, mut sockets: Sockets, shared: &Arc<NetShared>, stop: &StopState) {
    while !stop.stopped.load(Ordering::Acquire) {
        let front = match sockets.public.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(port = name, error = %e, "vhost-user-net accept failed");
                continue;
            }
        };
        if stop.stopped.load(Ordering::Acquire) {
            break;
        }
        let back = match UnixStream::connect_addr(&sockets.internal_addr) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(port = name, error = %e, "cannot reach the device socket");
                return;
            }
        };
        if let Err(e) = crate::net::relay::spawn(front, back) {
            tracing::warn!(port = name, error = %e, "cannot start vhost-user relay");
            continue;
        }
        let device = match NetDevice::new(Arc::clone(shared)) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                tracing::error!(port = name, error = %e, "cannot create vhost-user-net device");
                return;
            }
        };
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(format!("keel-vnet-{name}"), device, mem) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(port = name, error = %e, "cannot create vhost-user daemon");
                return;
            }
        };
        if let Err(e) = daemon.start(&mut sockets.internal) {
            stop_workers(&daemon);
            if !stop.stopped.load(Ordering::Acquire) {
                tracing::warn!(port = name, error = %e, "vhost-user-net accept failed");
            }
            continue;
        }
        if let Ok(mut c) = stop.connection.lock() {
            *c = daemon.shutdown_handle();
        }
        if stop.stopped.load(Ordering::Acquire) {
            daemon.request_shutdown();
        }
        tracing::info!(port = name, "vhost-user-net frontend connected");
        match daemon.wait() {
            Ok(()) => tracing::info!(port = name, "vhost-user-net frontend disconnected"),
            Err(e) => tracing::warn!(port = name, error = %e, "vhost-user-net connection ended"),
        }
        if let Ok(mut c) = stop.connection.lock() {
            *c = None;
        }
        shared.deactivate();
        stop_workers(&daemon);
    }
}

fn stop_workers(daemon: &VhostUserDaemon<Arc<NetDevice>>) {
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
}

/// A port as the data plane's worker owns it.
pub type BoxedPort = Box<dyn keel_dataplane::port::Port>;

/// Errors of [`open_ports`].
#[derive(Debug, thiserror::Error)]
pub enum OpenPortsError {
    /// A spec was not `NAME=SOCKET`.
    #[error("Invalid --vhost-user-net {0:?}: expected NAME=SOCKET")]
    Spec(String),
    /// Serving a socket failed.
    #[error("Cannot serve vhost-user-net port {0:?}")]
    Serve(String, #[source] NetServeError),
}

/// Serves every `NAME=SOCKET` spec (what `keel dataplane --vhost-user-net`
/// takes); the servers must be kept alive as long as the ports are used.
pub fn open_ports(specs: &[String]) -> Result<(Vec<BoxedPort>, Vec<NetServer>), OpenPortsError> {
    let mut ports: Vec<BoxedPort> = Vec::with_capacity(specs.len());
    let mut servers = Vec::with_capacity(specs.len());
    for spec in specs {
        let Some((name, socket)) = spec
            .split_once('=')
            .filter(|(n, s)| !n.is_empty() && !s.is_empty())
        else {
            return Err(OpenPortsError::Spec(spec.clone()));
        };
        let (port, server) = listen(name, Path::new(socket), [0; 6])
            .map_err(|e| OpenPortsError::Serve(name.to_string(), e))?;
        ports.push(Box::new(port));
        servers.push(server);
    }
    Ok((ports, servers))
}
