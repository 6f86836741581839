//! The vhost-user-blk device: the `VhostUserBackend` implementation that
//! vhost-user-backend's daemon drives (one instance per frontend
//! connection).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{device_features, ConfigSpace, CONFIG_WCE_OFFSET};
use crate::disk::RawDisk;
use crate::hook::WriteHook;
use crate::request::ID_LEN;
use crate::worker::{GuestMem, Worker, WorkerError};

/// State of a served disk that outlives frontend connections.
#[derive(Debug)]
pub struct DiskShared {
    /// The image.
    pub disk: RawDisk,
    /// Write-back cache enabled (virtio `wce`); off means every write is
    /// followed by an fdatasync before it completes.
    pub wce: AtomicBool,
    /// GET_ID answer (NUL padded).
    pub serial: [u8; ID_LEN],
}

impl DiskShared {
    /// Wraps an open disk; `serial` is cut to 20 bytes.
    pub fn new(disk: RawDisk, serial: &str) -> Self {
        let mut s = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        s[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Self {
            disk,
            wce: AtomicBool::new(true),
            serial: s,
        }
    }
}

/// Queue layout of a device.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Request queues (VIRTIO_BLK_F_MQ when > 1).
    pub num_queues: u16,
    /// Maximum descriptors per queue.
    pub queue_size: u16,
    /// Worker threads; queue `i` runs on thread `i % threads`.
    pub threads: usize,
}

impl QueueConfig {
    /// `num_queues` queues of 256 entries, one worker per queue up to the
    /// number of CPUs.
    pub fn new(num_queues: u16) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            num_queues: num_queues.max(1),
            queue_size: 256,
            threads: usize::from(num_queues.max(1)).min(cpus),
        }
    }
}

/// Errors creating a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A worker's io_uring could not be set up.
    #[error("Cannot create worker")]
    CreateWorker(#[source] WorkerError),
    /// A worker's exit event could not be created.
    #[error("Cannot create worker exit event")]
    CreateExitEvent(#[source] io::Error),
    /// Bad queue configuration.
    #[error("Invalid queue configuration")]
    QueueConfig,
}

/// One vhost-user-blk device instance.
pub struct BlockDevice<H: WriteHook> {
    shared: Arc<DiskShared>,
    hook: H,
    queues: QueueConfig,
    workers: Vec<Mutex<Worker>>,
    /// One per worker thread: without them the vring threads never leave
    /// their epoll loop and dropping the daemon (after a disconnect or a
    /// stop) blocks forever joining them.
    exit_events: Vec<(EventConsumer, EventNotifier)>,
    event_idx: AtomicBool,
}

impl<H: WriteHook> BlockDevice<H> {
    /// A device for `shared`, calling `hook` on the write path.
    pub fn new(shared: Arc<DiskShared>, hook: H, queues: QueueConfig) -> Result<Self, DeviceError> {
        if queues.num_queues == 0
            || queues.num_queues > 64
            || queues.threads == 0
            || queues.queue_size == 0
        {
            return Err(DeviceError::QueueConfig);
        }
        let threads = queues.threads.min(usize::from(queues.num_queues));
        let workers = (0..threads)
            .map(|_| Worker::new(queues.queue_size, shared.disk.raw_fd()).map(Mutex::new))
            .collect::<Result<_, _>>()
            .map_err(DeviceError::CreateWorker)?;
        let exit_events = (0..threads)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<Result<_, _>>()
            .map_err(DeviceError::CreateExitEvent)?;
        Ok(Self {
            shared,
            hook,
            queues: QueueConfig { threads, ..queues },
            workers,
            exit_events,
            event_idx: AtomicBool::new(false),
        })
    }

    fn config_space(&self) -> ConfigSpace {
        ConfigSpace {
            sectors: self.shared.disk.sectors(),
            blk_size: self.shared.disk.block_size(),
            num_queues: self.queues.num_queues,
            wce: u8::from(self.shared.wce.load(Ordering::Relaxed)),
        }
    }
}

/// Waiting for the requests in flight of a device (see `Request::Drain`
/// in [`crate::control`]).
pub(crate) trait Drain: Send + Sync {
    /// Returns once every worker finished the kick it was serving.
    fn drain(&self);
}

impl<H: WriteHook> Drain for BlockDevice<H> {
    fn drain(&self) {
        // A worker holds its lock for a whole kick, which it serves until
        // nothing it took is in flight.
        for w in &self.workers {
            drop(w.lock());
        }
    }
}

fn io_err(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

impl<H: WriteHook> VhostUserBackend for BlockDevice<H> {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMem>;

    fn num_queues(&self) -> usize {
        usize::from(self.queues.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queues.queue_size)
    }

    fn features(&self) -> u64 {
        device_features(self.shared.disk.readonly(), self.queues.num_queues)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config_space().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `wce` is writable (VIRTIO_BLK_F_CONFIG_WCE).
        match (usize::try_from(offset), buf) {
            (Ok(CONFIG_WCE_OFFSET), [wce]) => {
                self.shared.wce.store(*wce != 0, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(io::Error::from(io::ErrorKind::InvalidInput)),
        }
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        for w in &self.workers {
            w.lock()
                .map_err(|_| io::Error::other("worker lock poisoned"))?
                .mem = Some(mem.clone());
        }
        Ok(())
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exit_events.get(thread_index)?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let threads = self.workers.len();
        let mut masks = vec![0u64; threads];
        for q in 0..usize::from(self.queues.num_queues) {
            masks[q % threads] |= 1 << q;
        }
        masks
    }

    /// GET_VRING_BASE (the VM pauses, or the frontend stops the device):
    /// the handler already marked the ring not ready; waiting for the
    /// worker that serves it (its lock is held for a whole kick) lets the
    /// requests it took finish and complete to the used ring, so the index
    /// QEMU gets back covers no request still in flight, and every write
    /// the guest submitted before a pause has passed the write hook (its
    /// CBT bits are set) when the pause returns.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let threads = self.workers.len();
        let Some(worker) = usize::try_from(queue_index)
            .ok()
            .and_then(|q| self.workers.get(q % threads.max(1)))
        else {
            return Ok(());
        };
        drop(
            worker
                .lock()
                .map_err(|_| io::Error::other("worker lock poisoned"))?,
        );
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let worker = self
            .workers
            .get(thread_id)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut worker = worker
            .lock()
            .map_err(|_| io::Error::other("worker lock poisoned"))?;
        worker
            .process_queue(
                vring,
                &self.shared,
                &self.hook,
                self.event_idx.load(Ordering::Relaxed),
            )
            .map_err(io_err)
    }
}
