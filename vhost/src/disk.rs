//! Disk images: raw creation (thin or thick), and the open image the I/O
//! engine works on (raw, or qcow2 through its cluster map).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes per virtio-blk sector (fixed by the spec, independent of `blk_size`).
pub const SECTOR_SIZE: u64 = 512;

/// Errors of disk creation and opening.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The size is zero or not a multiple of 512 bytes.
    #[error("Disk size {0} is not a positive multiple of 512 bytes")]
    InvalidSize(u64),
    /// Creating the image file failed.
    #[error("Cannot create image {path}")]
    CreateImage {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reserving space for a thick image failed.
    #[error("Cannot preallocate image {path}")]
    Preallocate {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Opening the image failed.
    #[error("Cannot open image {path}")]
    OpenImage {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The qcow2 metadata could not be used.
    #[error("Cannot open qcow2 image {path}")]
    Qcow2 {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::qcow2::Qcow2Error,
    },
}

/// How an image file stores the disk. Never guessed from the content: a
/// guest could write a qcow2 header into a raw disk and name a host file
/// as its backing file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ImageFormat {
    /// The file is the disk, byte for byte.
    #[default]
    Raw,
    /// QEMU's qcow2 (v2 or v3).
    Qcow2,
}

impl std::str::FromStr for ImageFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Self::Raw),
            "qcow2" => Ok(Self::Qcow2),
            other => Err(format!("unknown image format {other:?} (raw or qcow2)")),
        }
    }
}

/// How a new raw volume reserves space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    /// Sparse file: space is allocated on first write.
    Thin,
    /// All blocks reserved at creation (`fallocate`), reading as zeros.
    Thick,
}

/// Creates a raw volume of `size` bytes at `path` (fails if it exists).
pub fn create_raw_volume(path: &Path, size: u64, prov: Provisioning) -> Result<(), DiskError> {
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
        return Err(DiskError::InvalidSize(size));
    }
    let create_err = |source| DiskError::CreateImage {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(create_err)?;
    file.set_len(size).map_err(create_err)?;
    if prov == Provisioning::Thick {
        let len = libc::off_t::try_from(size).map_err(|_| DiskError::InvalidSize(size))?;
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
        if rc != 0 {
            return Err(DiskError::Preallocate {
                path: path.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    file.sync_all().map_err(create_err)?;
    Ok(())
}

/// Writes back and drops the image's page cache (once, at open).
///
/// Why: io_uring first tries an O_DIRECT write without blocking, and the
/// kernel refuses that while any page of the written range is still in
/// the page cache (it would have to invalidate it). Such writes are
/// handed to io_uring's worker threads, which run the writes of one file
/// one at a time: a cached image (just created, copied or read buffered)
/// makes every write slow until each block was overwritten once.
fn drop_page_cache(file: &File) -> std::io::Result<()> {
    // Dirty pages must be written before they can be dropped.
    file.sync_data()?;
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Options for opening a disk image.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// Image file.
    pub path: PathBuf,
    /// Expose the disk read-only (VIRTIO_BLK_F_RO; writes fail).
    pub readonly: bool,
    /// Bypass the host page cache (O_DIRECT). The device then advertises a
    /// 4 KiB logical block size so guest I/O stays aligned.
    pub direct: bool,
    /// Image format.
    pub format: ImageFormat,
}

impl DiskOptions {
    /// Read-write, buffered.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            readonly: false,
            direct: false,
            format: ImageFormat::Raw,
        }
    }
}

/// An open disk image shared by all queues of a device.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    /// The cluster map of a qcow2 image (requests are translated through
    /// it; `file` then holds clusters, not the disk).
    qcow2: Option<crate::qcow2::Qcow2>,
    capacity: u64,
    options: DiskOptions,
    /// Set after a failed fdatasync: from then on every request fails, so a
    /// lost write-back is never hidden by a later successful flush.
    failed: AtomicBool,
}

impl RawDisk {
    /// Opens an existing image; the capacity is a raw image's size or a
    /// qcow2 image's virtual size (rounded down to 512 bytes).
    pub fn open(options: DiskOptions) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::OpenImage {
            path: options.path.clone(),
            source,
        };
        let mut oo = OpenOptions::new();
        oo.read(true).write(!options.readonly);
        if options.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(&options.path).map_err(open_err)?;
        let qcow2 = match options.format {
            ImageFormat::Raw => None,
            ImageFormat::Qcow2 => Some(
                crate::qcow2::Qcow2::open(&options.path, options.readonly).map_err(|source| {
                    DiskError::Qcow2 {
                        path: options.path.clone(),
                        source,
                    }
                })?,
            ),
        };
        let len = match &qcow2 {
            Some(q) => q.size(),
            None => file.metadata().map_err(open_err)?.len(),
        };
        let capacity = len - len % SECTOR_SIZE;
        if capacity == 0 {
            return Err(DiskError::InvalidSize(len));
        }
        if options.direct {
            drop_page_cache(&file).map_err(open_err)?;
        }
        Ok(Self {
            file,
            qcow2,
            capacity,
            options,
            failed: AtomicBool::new(false),
        })
    }

    /// Size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.capacity / SECTOR_SIZE
    }

    /// True when opened read-only.
    pub fn readonly(&self) -> bool {
        self.options.readonly
    }

    /// Logical block size advertised to the guest.
    pub fn block_size(&self) -> u32 {
        if self.options.direct {
            4096
        } else {
            512
        }
    }

    /// The options it was opened with.
    pub fn options(&self) -> &DiskOptions {
        &self.options
    }

    /// True once a flush failed; the disk then refuses all I/O.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_failed(&self) {
        if !self.failed.swap(true, Ordering::Relaxed) {
            tracing::error!(path = %self.options.path.display(), "flush failed: disk marked failed");
        }
    }

    /// Synchronous fdatasync, for shutdown paths (not the data path).
    pub fn sync(&self) -> std::io::Result<()> {
        if self.options.readonly {
            return Ok(());
        }
        if let Some(q) = &self.qcow2 {
            q.close()
                .map_err(|e| std::io::Error::other(e.to_string()))
                .inspect_err(|_| self.mark_failed())?;
        }
        self.file.sync_data().inspect_err(|_| self.mark_failed())
    }

    /// The qcow2 cluster map, for a qcow2 image.
    pub(crate) fn qcow2(&self) -> Option<&crate::qcow2::Qcow2> {
        self.qcow2.as_ref()
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn thin_volume_is_sparse_and_thick_is_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let thin = dir.path().join("thin.raw");
        let thick = dir.path().join("thick.raw");
        create_raw_volume(&thin, 64 << 20, Provisioning::Thin).unwrap();
        create_raw_volume(&thick, 64 << 20, Provisioning::Thick).unwrap();
        let (mt, mk) = (thin.metadata().unwrap(), thick.metadata().unwrap());
        assert_eq!(mt.len(), 64 << 20);
        assert_eq!(mk.len(), 64 << 20);
        assert_eq!(mt.blocks(), 0, "thin volume has no blocks allocated");
        assert!(
            mk.blocks() * 512 >= 64 << 20,
            "thick volume is fully allocated"
        );
        let disk = RawDisk::open(DiskOptions::new(&thick)).unwrap();
        assert_eq!(disk.sectors(), (64 << 20) / 512);
    }

    #[test]
    fn bad_sizes_and_existing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.raw");
        assert!(matches!(
            create_raw_volume(&p, 1000, Provisioning::Thin),
            Err(DiskError::InvalidSize(1000))
        ));
        assert!(create_raw_volume(&p, 0, Provisioning::Thin).is_err());
        create_raw_volume(&p, 4096, Provisioning::Thin).unwrap();
        assert!(matches!(
            create_raw_volume(&p, 4096, Provisioning::Thin),
            Err(DiskError::CreateImage { .. })
        ));
    }
}
