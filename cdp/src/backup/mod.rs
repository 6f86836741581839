//! Changed-block-tracking backups of vhost-blk disks.
//!
//! # Design
//! - [`repo`]: a local directory of content-addressed chunks (SHA-256 of the
//!   plaintext, zstd-compressed, all-zero chunks not stored) and one
//!   [`index`] per backup point listing every chunk of the disk, so every
//!   point restores on its own and deleting one never breaks another.
//! - [`job`]: full and incremental backups; an incremental freezes the
//!   disk's CBT bitmap (`keel_vhost::Cbt`) and reads only the chunks it
//!   marks, inheriting the rest from the newest point of the chain.
//!   [`BackupJob`] splits a job into lock, plan and run, so a disk in use
//!   can be cut at a point in time: with its VM paused, the bitmap is
//!   frozen by the disk server ([`FrozenCbt`]), the planned chunks are
//!   copied into a sparse [`staging`] file, the VM resumes, and the job
//!   runs on the copy.
//! - [`restore`]: to a new sparse file or in place, verified by re-reading.
//! - [`retention`]: max-count / max-age pruning; GC is mark-and-sweep.
//! - [`key`]: optional encryption of a repository's points (AES-256-GCM,
//!   keyed chunk names); a [`Repository`] opened with a key writes and
//!   reads encrypted points, and its points name the key they need.
//!
//! # Threading model
//! Jobs run on the caller's thread plus `threads` scoped workers that each
//! own one chunk buffer and one zstd context; they share only an atomic
//! chunk counter and atomic statistics. Nothing runs on the vhost I/O
//! threads: the only contact with the backend is `Cbt::freeze_and_reset` /
//! `merge_back` (a mutex among control operations, never on the write path).
//!
//! # Assumptions
//! - The source image does not change while it is read: a disk in use is
//!   read from a staging copy taken with its VM paused (crash-consistent at
//!   that instant); the bare [`backup`] of a disk being written is not
//!   point-in-time (it is still never missing a write: writes after the
//!   freeze stay dirty for the next incremental).
//! - One repository per local file system (rename/link atomicity, `flock`).

pub mod chunk;
pub mod index;
pub mod job;
pub mod key;
pub mod offline;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod staging;

pub use chunk::Digest;
pub use index::{BackupIndex, Kind};
pub use job::{
    backup, BackupJob, BackupReport, BackupSpec, FrozenCbt, JobError, Progress, Tracking,
};
pub use key::{ChunkKey, KeyError};
pub use offline::backup_stopped_disk;
pub use repo::{GcReport, RepoError, Repository, VerifyReport};
pub use restore::{restore, RestoreError, RestoreMode, RestoreReport};
pub use retention::{prune, Policy, PrunePlan};
