//! The vhost-user-net device driven by vhost-user-backend's daemon (one per
//! frontend connection). It negotiates features and publishes each
//! connection's vrings to the data-plane port; the port moves the packets.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory as vhost-user-backend hands it to us.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
/// One virtqueue's state, shared with the backend thread.
pub type Vring = VringRwLock<GuestMem>;

/// Queue 0 is the guest's receive queue (we write), 1 its transmit queue.
pub const RX_QUEUE: usize = 0;
/// See [`RX_QUEUE`].
pub const TX_QUEUE: usize = 1;
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: usize = 256;

/// Features offered to the guest.
pub fn device_features() -> u64 {
    (1u64 << VIRTIO_F_VERSION_1)
        | (1u64 << VIRTIO_NET_F_MRG_RXBUF)
        | (1u64 << VIRTIO_NET_F_CSUM)
        | (1u64 << VIRTIO_NET_F_MAC)
        | (1u64 << VIRTIO_NET_F_STATUS)
}

/// What a connection hands to the worker.
#[derive(Clone)]
pub struct Active {
    pub(crate) mem: GuestMem,
    pub(crate) rx: Vring,
    pub(crate) tx: Vring,
    /// virtio-net header length the guest expects (12 or 10).
    pub(crate) hdr_len: usize,
    /// VIRTIO_NET_F_MRG_RXBUF negotiated.
    pub(crate) mergeable: bool,
}

/// State shared by the devices of successive connections and the port.
pub struct NetShared {
    /// Bumped whenever `active` changes; the worker compares once per batch.
    pub(crate) generation: AtomicU64,
    pub(crate) active: Mutex<Option<Active>>,
    /// Set by a kick, cleared by the worker before it drains `wake`.
    pub(crate) kicked: AtomicBool,
    /// Readable after a kick: the port's `poll_fd`.
    pub(crate) wake: EventFd,
    /// MAC in the config space (frontends like QEMU bring their own).
    pub(crate) mac: [u8; 6],
}

impl NetShared {
    /// Shared state for a port whose config space shows `mac`.
    pub fn new(mac: [u8; 6]) -> io::Result<Self> {
        Ok(Self {
            generation: AtomicU64::new(0),
            active: Mutex::new(None),
            kicked: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
            mac,
        })
    }

    fn publish(&self, active: Option<Active>) {
        if let Ok(mut a) = self.active.lock() {
            *a = active;
        }
        self.generation.fetch_add(1, Ordering::Release);
        self.kick();
    }

    /// Forgets the connection (it ended); the worker drops its clone.
    pub(crate) fn deactivate(&self) {
        self.publish(None);
    }

    fn kick(&self) {
        if !self.kicked.swap(true, Ordering::AcqRel) {
            let _ = self.wake.write(1);
        }
    }
}

/// One frontend connection's device.
pub struct NetDevice {
    shared: Arc<NetShared>,
    mem: Mutex<Option<GuestMem>>,
    acked: AtomicU64,
    published: AtomicBool,
    exit: (EventConsumer, EventNotifier),
}

impl NetDevice {
    /// A device publishing to `shared`.
    pub fn new(shared: Arc<NetShared>) -> io::Result<Self> {
        Ok(Self {
            shared,
            mem: Mutex::new(None),
            acked: AtomicU64::new(0),
            published: AtomicBool::new(false),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
        })
    }

    /// Hands the vrings to the worker on the first kick of the connection
    /// (by then memory, features and queue addresses are all set).
    fn publish_once(&self, vrings: &[Vring]) {
        if self.published.load(Ordering::Acquire) {
            return;
        }
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE), vrings.get(TX_QUEUE)) else {
            return;
        };
        let Some(mem) = self.mem.lock().ok().and_then(|m| m.clone()) else {
            tracing::warn!("queue kicked before guest memory was set");
            return;
        };
        let acked = self.acked.load(Ordering::Acquire);
        let version1 = acked & (1 << VIRTIO_F_VERSION_1) != 0;
        let mergeable = acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        self.shared.publish(Some(Active {
            mem,
            rx: rx.clone(),
            tx: tx.clone(),
            hdr_len: if version1 || mergeable { 12 } else { 10 },
            mergeable,
        }));
        self.published.store(true, Ordering::Release);
        tracing::debug!(
            acked = format_args!("{acked:#x}"),
            "vrings published to the data plane"
        );
    }
}

impl VhostUserBackend for NetDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // QEMU 7.2 crashes at device start without protocol features; the
        // early SET_VRING_ENABLE they bring is absorbed by `relay`.
        device_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // VIRTIO_RING_F_EVENT_IDX is not offered.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_net_config: mac[6], status u16 (LE).
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.shared.mac);
        cfg[6..8].copy_from_slice(
            &u16::try_from(VIRTIO_NET_S_LINK_UP)
                .unwrap_or(1)
                .to_le_bytes(),
        );
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(usize::try_from(size).unwrap_or(0));
        cfg.get(start..end).map(<[u8]>::to_vec).unwrap_or_default()
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        *self
            .mem
            .lock()
            .map_err(|_| io::Error::other("memory lock poisoned"))? = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << NUM_QUEUES) - 1]
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        self.publish_once(vrings);
        tracing::trace!(
            queue = device_event,
            published = self.published.load(Ordering::Relaxed),
            "kick"
        );
        self.shared.kick();
        Ok(())
    }
}
