//! Serving one disk on a vhost-user socket until stopped, across frontend
//! reconnects (QEMU `reconnect=` on its chardev).

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::device::{BlockDevice, DeviceError, DiskShared, Drain, QueueConfig};
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
    /// (vhost-user-backend's error is neither `Sync` nor `std::error::Error`,
    /// so its message is kept.)
    #[error("Cannot create daemon: {0}")]
    Daemon(String),
    /// Accepting / starting a connection failed.
    #[error("Cannot accept frontend: {0}")]
    Accept(String),
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
    /// The listening socket while `serve` runs (cleared, under the lock,
    /// before it is closed: a stop never touches a reused descriptor).
    listener: Mutex<Option<RawFd>>,
    device: Mutex<Option<Arc<dyn Drain>>>,
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

    /// Waits until the current frontend connection's workers have nothing
    /// in flight (returns at once without a connection).
    pub fn drain(&self) {
        let device = self.inner.device.lock().ok().and_then(|d| d.clone());
        if let Some(d) = device {
            d.drain();
        }
    }

    /// Ends the current connection and makes `serve` return.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::Release);
        if let Ok(mut c) = self.inner.connection.lock() {
            if let Some(h) = c.take() {
                h.shutdown();
            }
        }
        // Wake a serve loop blocked in accept(): shutting the listening
        // socket down makes accept() fail at once. (Connecting to its path
        // would not do when the path is gone, e.g. its directory removed
        // under a disk server: the server then never exited.)
        if let Ok(l) = self.inner.listener.lock() {
            if let Some(fd) = *l {
                // SAFETY: `fd` is the open listener of a running `serve`:
                // it is cleared under this lock before being closed.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
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
    if let Ok(mut l) = stop.inner.listener.lock() {
        *l = Some(listener.as_raw_fd());
    }
    let served = serve_connections(config, &shared, &hook, stop, &mut listener);
    if let Ok(mut l) = stop.inner.listener.lock() {
        *l = None;
    }
    drop(listener);
    served?;
    shared.disk.sync().map_err(ServeError::Flush)
}

/// The connection loop of [`serve`].
fn serve_connections<H: WriteHook + Clone>(
    config: &ServeConfig,
    shared: &Arc<DiskShared>,
    hook: &H,
    stop: &StopHandle,
    listener: &mut Listener,
) -> Result<(), ServeError> {
    while !stop.is_stopped() {
        let device = Arc::new(
            BlockDevice::new(shared.clone(), hook.clone(), config.queues)
                .map_err(ServeError::Device)?,
        );
        if let Ok(mut d) = stop.inner.device.lock() {
            *d = Some(device.clone());
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("keel-vhost-blk".into(), device, mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        if let Err(e) = daemon.start(listener) {
            // Worker threads are joined when the daemon drops: end them first.
            stop_workers(&daemon);
            if stop.is_stopped() {
                // The stop shut the listener down under accept().
                return Ok(());
            }
            return Err(ServeError::Accept(e.to_string()));
        }
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
        if let Ok(mut d) = stop.inner.device.lock() {
            *d = None;
        }
        stop_workers(&daemon);
    }
    Ok(())
}

/// Ends the worker threads of a daemon (they are joined on drop).
fn stop_workers<H: WriteHook>(daemon: &VhostUserDaemon<Arc<BlockDevice<H>>>) {
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
}

/// Everything needed to serve one raw image (what `keel vhost-blk` and the
/// control plane pass).
#[derive(Debug, Clone)]
pub struct DiskServeOptions {
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Image and open mode.
    pub disk: crate::disk::DiskOptions,
    /// Request queues.
    pub queues: u16,
    /// GET_ID answer.
    pub serial: String,
    /// Track changed blocks at this granularity, persisted in
    /// [`cbt_path`]`(image)`.
    pub cbt_granularity: Option<u64>,
    /// Serve the control channel ([`crate::control`]) on this socket.
    pub control: Option<PathBuf>,
}

/// Where the CBT bitmaps of `image` live.
pub fn cbt_path(image: &std::path::Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".cbt");
    PathBuf::from(p)
}

/// Errors of [`serve_disk`].
#[derive(Debug, thiserror::Error)]
pub enum ServeDiskError {
    /// Opening the image failed.
    #[error("Cannot open disk")]
    OpenDisk(#[source] crate::disk::DiskError),
    /// Opening the CBT file failed.
    #[error("Cannot open changed-block tracking")]
    OpenCbt(#[source] crate::cbt::CbtError),
    /// Serving failed.
    #[error("Cannot serve disk")]
    Serve(#[source] ServeError),
    /// Saving the CBT bitmaps at shutdown failed.
    #[error("Cannot save changed-block tracking")]
    PersistCbt(#[source] crate::cbt::CbtError),
    /// The control socket could not be served.
    #[error("Cannot serve the control socket")]
    Control(#[source] crate::control::ControlError),
}

/// Opens the image (and its CBT file), serves it until `stop`, then
/// flushes and saves the bitmaps as cleanly shut down.
pub fn serve_disk(opts: &DiskServeOptions, stop: &StopHandle) -> Result<(), ServeDiskError> {
    let disk = crate::disk::RawDisk::open(opts.disk.clone()).map_err(ServeDiskError::OpenDisk)?;
    let config = ServeConfig {
        socket: opts.socket.clone(),
        queues: QueueConfig::new(opts.queues),
    };
    let capacity = disk.capacity();
    let shared = Arc::new(DiskShared::new(disk, &opts.serial));
    let control = |cbt: Option<Arc<crate::cbt::Cbt>>| match &opts.control {
        None => Ok(()),
        Some(path) => crate::control::spawn(
            path,
            crate::control::ControlTarget {
                cbt,
                stop: stop.clone(),
                disk_size: capacity,
            },
        )
        .map_err(ServeDiskError::Control),
    };
    match opts.cbt_granularity {
        None => {
            control(None)?;
            serve(&config, shared, crate::hook::NoHook, stop).map_err(ServeDiskError::Serve)
        }
        Some(gran) => {
            let cbt = Arc::new(
                crate::cbt::Cbt::open(&cbt_path(&opts.disk.path), capacity, gran)
                    .map_err(ServeDiskError::OpenCbt)?,
            );
            if !cbt.opened_clean() {
                tracing::warn!("changed-block bitmaps invalid after an unclean shutdown: next backup must be full");
            }
            control(Some(cbt.clone()))?;
            let served = serve(&config, shared, cbt.clone(), stop).map_err(ServeDiskError::Serve);
            // Only a clean stop (final flush succeeded) marks the bitmaps valid.
            served?;
            cbt.persist_clean().map_err(ServeDiskError::PersistCbt)
        }
    }
}
