//! Backups of a disk whose backend is stopped (the CLI path): the CBT
//! bitmap is the one `keel vhost-blk --cbt-granularity` persisted beside
//! the image at clean shutdown.
//!
//! The file is opened (which marks it in use), the job freezes/resets the
//! bitmap as usual, and the file is written back as clean. Running this
//! while a backend serves the image would race with its copy of the
//! bitmap: online backups use the backend's live [`Cbt`] through
//! [`backup`] instead. Writing the image with a backend that does not
//! track (no `--cbt-granularity`) after a backup makes the next incremental
//! miss those writes: keep CBT on for disks that are backed up.

use keel_vhost::cbt::Cbt;

use crate::backup::job::{backup, source_size, BackupReport, BackupSpec, JobError, Progress};
use crate::backup::repo::Repository;
use crate::backup::Tracking;

/// Backs up `spec.source`; with `cbt = Some((granularity, bitmap))`
/// incrementally from the persisted bitmap file `<image>.cbt`.
pub fn backup_stopped_disk(
    repo: &Repository,
    spec: &BackupSpec,
    cbt: Option<(u64, &str)>,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<BackupReport, JobError> {
    let Some((granularity, bitmap)) = cbt else {
        return backup(repo, spec, Tracking::None, progress);
    };
    let open_err = |e| JobError::OpenSource(spec.source.clone(), e);
    let size =
        source_size(&std::fs::File::open(&spec.source).map_err(open_err)?).map_err(open_err)?;
    let path = keel_vhost::cbt_path(&spec.source);
    if !path.exists() {
        // No backend ever tracked this disk: nothing says what changed,
        // and creating the file here would claim "nothing did".
        let mut r = backup(repo, spec, Tracking::None, progress)?;
        r.fallback = Some(format!("no CBT file {}: full backup", path.display()));
        return Ok(r);
    }
    let tracker = Cbt::open(&path, size, granularity).map_err(JobError::Cbt)?;
    if tracker.peek(bitmap).is_err() {
        // The chain may have points taken before this file was made (its
        // bitmaps lost or dropped): nothing says what changed since them.
        tracker
            .add_untracked_bitmap(bitmap)
            .map_err(JobError::Cbt)?;
    }
    let result = backup(
        repo,
        spec,
        Tracking::Cbt {
            cbt: &tracker,
            bitmap,
        },
        progress,
    );
    // The disk is not being written: the file is consistent again.
    tracker.persist_clean().map_err(JobError::Cbt)?;
    result
}
