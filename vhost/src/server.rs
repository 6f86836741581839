//! Serving one disk on a vhost-user socket until stopped, across frontend
//! reconnects (QEMU `reconnect=` on its chardev).

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::device::{BlockDevice, DeviceError, DiskShared, QueueConfig};
use crate::hook::WriteHook;

/// Errors of the serve loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the socket failed.
    #[error("Cannot listen on {0}")]
    Listen(PathBuf, #[source] vhost::vhost_user::Error),
    /// The device could not be created.
    #[error("Cannot create device")]
    Device(#[source] DeviceError),
    /// The daemon could not be created.
    #[error("Cannot create daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    /// Accepting / starting a connection failed.
    #[error("Cannot accept frontend: {0}")]
    Accept(vhost_user_backend::Error),
    /// The final fdatasync failed.
    #[error("Final flush failed")]
    Flush(#[source] std::io::Error),
}

/// Stops a running [`serve`] from another thread (e.g. a SIGTERM handler).
#[derive(Clone, Default)]
pub struct StopHandle {
    inner: Arc<StopInner>,
}

#[derive(Default)]
struct StopInner {
    stopped: AtomicBool,
    connection: Mutex<Option<ShutdownHandle>>,
    socket: Mutex<Option<PathBuf>>,
}

impl StopHandle {
    /// A handle not yet stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// True once [`StopHandle::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire)
    }

    /// Ends the current connection and makes `serve` return.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::Release);
        if let Ok(mut c) = self.inner.connection.lock() {
            if let Some(h) = c.take() {
                h.shutdown();
            }
        }
        // Wake a serve loop blocked in accept().
        if let Ok(s) = self.inner.socket.lock() {
            if let Some(path) = s.as_ref() {
                let _ = UnixStream::connect(path);
            }
        }
    }
}

/// What to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// vhost-user socket path (created; an old file is replaced).
    pub socket: PathBuf,
    /// Queue layout.
    pub queues: QueueConfig,
}

/// Serves `shared` on `config.socket` until `stop` is triggered: each
/// frontend connection gets a fresh device (rings and workers), the disk
/// and hook stay. Returns after a final fdatasync.
pub fn serve<H: WriteHook + Clone>(
    config: &ServeConfig,
    shared: Arc<DiskShared>,
    hook: H,
    stop: &StopHandle,
) -> Result<(), ServeError> {
    let mut listener = Listener::new(&config.socket, true)
        .map_err(|e| ServeError::Listen(config.socket.clone(), e))?;
    if let Ok(mut s) = stop.inner.socket.lock() {
        *s = Some(config.socket.clone());
    }
    while !stop.is_stopped() {
        let device = Arc::new(
            BlockDevice::new(shared.clone(), hook.clone(), config.queues)
                .map_err(ServeError::Device)?,
        );
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("keel-vhost-blk".into(), device, mem)
            .map_err(ServeError::Daemon)?;
        daemon.start(&mut listener).map_err(ServeError::Accept)?;
        if let Ok(mut c) = stop.inner.connection.lock() {
            *c = daemon.shutdown_handle();
        }
        if stop.is_stopped() {
            daemon.request_shutdown();
        }
        match daemon.wait() {
            Ok(()) => tracing::info!("frontend disconnected"),
            Err(e) => tracing::warn!(error = %e, "frontend connection ended with error"),
        }
        if let Ok(mut c) = stop.inner.connection.lock() {
            *c = None;
        }
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
    }
    shared.disk.sync().map_err(ServeError::Flush)
}
