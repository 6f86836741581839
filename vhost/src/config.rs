//! virtio-blk feature bits and config space (virtio 1.2, 5.2.4).

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Segments per request the guest may use (QEMU uses queue size - 2 too).
pub const SEG_MAX: u32 = 126;
/// Discard / write-zeroes segments per request.
pub const MAX_DISCARD_SEGS: u32 = 8;
/// Largest discard / write-zeroes range per segment, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// Length of the config space we expose (up to `write_zeroes_may_unmap` and padding).
pub const CONFIG_LEN: usize = 60;
/// Offset of the `wce` (writeback cache enable) byte, the only writable field.
pub const CONFIG_WCE_OFFSET: usize = 32;

/// Feature bits offered to the driver.
pub fn device_features(readonly: bool, num_queues: u16) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_TOPOLOGY)
        | (1 << VIRTIO_BLK_F_CONFIG_WCE);
    if num_queues > 1 {
        f |= 1 << VIRTIO_BLK_F_MQ;
    }
    if readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// Inputs of the config space.
#[derive(Debug, Clone, Copy)]
pub struct ConfigSpace {
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// Logical block size.
    pub blk_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Write-back cache on (1) or write-through (0).
    pub wce: u8,
}

impl ConfigSpace {
    /// The little-endian `struct virtio_blk_config`.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &self.sectors.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &self.blk_size.to_le_bytes());
        // topology: physical_block_exp 0, alignment 0, min_io_size 1 block,
        // opt_io_size 0 (no preference).
        put(26, &1u16.to_le_bytes());
        put(CONFIG_WCE_OFFSET, &[self.wce]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGS.to_le_bytes());
        // discard_sector_alignment: one logical block.
        put(44, &(self.blk_size / 512).to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEGS.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        b
    }

    /// `size` bytes at `offset`, or empty when out of range (a hostile
    /// frontend must not make us read past the struct).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let (Ok(off), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) else {
            return Vec::new();
        };
        match off.checked_add(size) {
            Some(end) if end <= CONFIG_LEN => bytes[off..end].to_vec(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_and_bounds() {
        let c = ConfigSpace {
            sectors: 2048,
            blk_size: 512,
            num_queues: 2,
            wce: 1,
        };
        let b = c.to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 2);
        assert_eq!(c.read(0, 8), b[0..8].to_vec());
        assert!(c.read(56, 8).is_empty());
        assert!(c.read(u32::MAX, 2).is_empty());
        assert!(c.read(4, u32::MAX).is_empty());
    }

    #[test]
    fn readonly_offers_ro_and_no_discard() {
        let ro = device_features(true, 1);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_MQ), 0);
        let rw = device_features(false, 4);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }
}
