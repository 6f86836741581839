//! Volume backups with keel's backup engine: taking one (incremental from
//! the bitmap the volume's disk server keeps), restoring one into a new
//! volume, deleting one. The repository is `<state dir>/backups`.
//!
//! A volume served by its own disk server (attached to a VM) is backed up
//! at a point in time ([`Agent::take_backups`]): with the VM paused, the
//! disk server freezes the bitmap over its control socket and the chunks
//! the backup reads are copied to `<state dir>/backups/staging/`; the VM
//! resumes before the (slow) hashing, compressing and storing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use keel_cdp::backup as engine;
use keel_control::api::backups::{self, BackupSpec};
use keel_control::api::records::{self, Record};
use keel_control::api::tasks::{self, Task};
use keel_control::api::volumes::{self, VolumeSpec};
use keel_vhost::cbt::FrozenBitmap;
use keel_vhost::control;

use super::{Agent, StepError};
use crate::disk_servers::{DiskServer, CBT_GRANULARITY};

/// The bitmap chain of API backups in each volume's CBT file (and in its
/// disk server's live tracker).
const BITMAP: &str = "keel-backups";

/// One disk of [`Agent::take_backups`].
pub(super) struct DiskBackup<'a> {
    pub volume: &'a Record,
    pub incremental: bool,
}

/// A live disk's job, planned at the cut, and its staging copy.
struct LiveJob<'r> {
    index: usize,
    job: engine::BackupJob<'r>,
    staged: Staged,
}

/// A live disk between connecting and the cut.
struct Prepared<'r> {
    index: usize,
    control: PathBuf,
    client: control::Client,
    job: engine::BackupJob<'r>,
    path: PathBuf,
    size: u64,
    /// The chain's bitmap was created now: it knows nothing of earlier
    /// writes, so it must not make an incremental from an older point.
    bitmap_new: bool,
}

/// A staging file, removed when dropped (also when a backup fails).
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Agent {
    pub(super) fn repository(&self) -> Result<engine::Repository, StepError> {
        let root = self.config.state_dir.join("backups");
        engine::Repository::create(&root).map_err(|e| {
            StepError::Invalid(format!("backup repository {}: {e}", root.display()))
        })?;
        engine::Repository::open(&root)
            .map_err(|e| StepError::Invalid(format!("backup repository {}: {e}", root.display())))
    }

    /// The VDC's backup key (hex) and whether it encrypts new backups.
    fn vdc_backup_key(&self, vdc: Option<&str>) -> Result<(bool, Option<String>), StepError> {
        let Some(vdc) = vdc else {
            return Ok((false, None));
        };
        match self.get("vdc", vdc)? {
            Some(record) => Ok(keel_control::api::vdcs::backup_key_of(&record)?),
            None => Ok((false, None)),
        }
    }

    /// The repository for new backups of a resource of `vdc`: encrypting
    /// with the VDC's key when the VDC asks for it.
    pub(super) fn repository_writing(
        &self,
        vdc: Option<&str>,
    ) -> Result<engine::Repository, StepError> {
        let repo = self.repository()?;
        match self.vdc_backup_key(vdc)? {
            (true, Some(hex)) => Ok(repo.with_key(
                engine::ChunkKey::from_hex(&hex)
                    .map_err(|e| StepError::Invalid(format!("backup key of VDC: {e}")))?,
            )),
            _ => Ok(repo),
        }
    }

    /// The repository that reads `point`: with the key of `vdc` when the
    /// point is encrypted (refused, naming both, if the VDC's key is not
    /// the point's).
    pub(super) fn repository_reading(
        &self,
        point: &str,
        vdc: Option<&str>,
    ) -> Result<engine::Repository, StepError> {
        let repo = self.repository()?;
        let index = repo
            .load(point)
            .map_err(|e| StepError::Invalid(format!("backup point {point}: {e}")))?;
        let Some(needs) = index.encryption else {
            return Ok(repo);
        };
        let (_, hex) = self.vdc_backup_key(vdc)?;
        let key = hex
            .map(|h| engine::ChunkKey::from_hex(&h))
            .transpose()
            .map_err(|e| StepError::Invalid(format!("backup key of VDC: {e}")))?
            .filter(|k| k.fingerprint() == needs)
            .ok_or_else(|| {
                StepError::Invalid(format!(
                    "point {point} is encrypted with key {needs}, which its VDC does not hold"
                ))
            })?;
        Ok(repo.with_key(key))
    }

    /// Reports percent done on the task.
    pub(super) fn progress<'a>(
        &'a self,
        task: &'a Task,
        note: &'a str,
    ) -> impl Fn(engine::Progress) + Sync + 'a {
        self.progress_part(task, note, (0, 1))
    }

    /// Reports percent done on the task for part `k` of `n` equal parts.
    fn progress_part<'a>(
        &'a self,
        task: &'a Task,
        note: &'a str,
        (k, n): (u64, u64),
    ) -> impl Fn(engine::Progress) + Sync + 'a {
        move |p: engine::Progress| {
            if let Some(pct) = p.done.saturating_mul(100).checked_div(p.total) {
                let overall = (k.saturating_mul(100) + pct) / n.max(1);
                let pct = i64::try_from(overall).unwrap_or(100).min(99);
                let note = format!("{note}: {} of {} MiB", p.done >> 20, p.total >> 20);
                let _ = self.task_state(&task.id, tasks::RUNNING, pct, &note);
            }
        }
    }

    pub(super) fn volume_backup(&mut self, task: &Task, volume: &Record) -> Result<(), StepError> {
        let backup_id = task.params["backup_id"].as_str().unwrap_or("").to_owned();
        let record = self
            .get(backups::KIND, &backup_id)?
            .ok_or_else(|| StepError::Invalid(format!("backup {backup_id} is gone")))?;
        let mut spec: BackupSpec = record.spec()?;
        let vspec: VolumeSpec = volume.spec()?;
        let result = self
            .take_backups(
                task,
                vspec.attached_to.as_deref(),
                &[DiskBackup {
                    volume,
                    incremental: spec.incremental,
                }],
            )
            .and_then(|mut r| {
                r.pop()
                    .ok_or_else(|| StepError::Invalid("no backup report".into()))
            });
        match result {
            Ok(report) => {
                record_report(&mut spec, &report);
                spec.size_bytes = vspec.size_bytes;
                tracing::info!(backup = %backup_id, volume = %volume.meta.id, kind = ?report.kind, read = report.chunks_read, total = report.chunks_total, paused_ms = ?report.paused_ms, seconds = report.seconds, "backup taken");
                self.observe(
                    backups::KIND,
                    &backup_id,
                    backups::AVAILABLE,
                    Some(records::to_json(&spec)?),
                )
            }
            Err(e) => {
                spec.status_reason = e.to_string();
                self.observe(
                    backups::KIND,
                    &backup_id,
                    backups::ERROR,
                    Some(records::to_json(&spec)?),
                )?;
                Err(e)
            }
        }
    }

    /// Backs up the given volumes at one point in time: pauses `vm` (when running) once for the cut of all of them.
    ///
    /// Volumes served by their own disk server (attached) are cut live:
    /// with the VM paused (QEMU stops the rings, and the disk server's
    /// ring stop waits for the requests in flight, so every write the guest
    /// submitted has completed and set its changed-block bits), each disk
    /// server drains and freezes the chain's bitmap, the chunks the backup
    /// will read are copied into a sparse staging file, and the VM resumes;
    /// the backups then read the staging files. Idle volumes (no disk
    /// server) are read in place with their persisted bitmap. A full
    /// backup leaves the bitmap alone: the next incremental then reads what
    /// changed since the one before, a superset, still exact. Reports come
    /// back in the order of `disks`; `paused_ms` is set on the live ones.
    pub(super) fn take_backups(
        &mut self,
        task: &Task,
        vm: Option<&str>,
        disks: &[DiskBackup<'_>],
    ) -> Result<Vec<engine::BackupReport>, StepError> {
        // A VM's disks are all in its VDC.
        let repo =
            self.repository_writing(disks.first().and_then(|d| d.volume.meta.vdc_id.as_deref()))?;
        let staging = self.config.state_dir.join("backups").join("staging");
        let n = disks.len() as u64;
        let mut reports: Vec<Option<engine::BackupReport>> = vec![None; disks.len()];
        let mut live = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            let id = &d.volume.meta.id;
            match self.disks.server_of(id) {
                DiskServer::Group => {
                    return Err(StepError::Invalid(format!(
                        "volume {id} is served by its protection group's CDP source, which \
                         cannot cut a backup; stop protection first"
                    )))
                }
                DiskServer::Own(control) => live.push((i, control)),
                DiskServer::None => {}
            }
        }
        if !live.is_empty() {
            std::fs::create_dir_all(&staging)
                .map_err(|e| StepError::Invalid(format!("create {}: {e}", staging.display())))?;
            let (jobs, paused_ms) = self.cut(vm, disks, &live, &repo, &staging)?;
            let this: &Self = self;
            for LiveJob { index, job, staged } in jobs {
                let progress = this.progress_part(task, "reading the volume", (index as u64, n));
                // On an error the jobs not run yet drop here: their frozen
                // bitmaps merge back and their staging files go.
                let mut r = job
                    .run(&staged.0, &progress)
                    .map_err(|e| StepError::Invalid(format!("backup failed: {e}")))?;
                r.paused_ms = paused_ms;
                reports[index] = Some(r);
            }
        }
        for (i, d) in disks.iter().enumerate() {
            if reports[i].is_some() {
                continue;
            }
            let progress = self.progress_part(task, "reading the volume", (i as u64, n));
            let path = volumes::volume_path(&self.config.state_dir, &d.volume.meta.id);
            let spec = engine::BackupSpec::new(&d.volume.meta.id, &path);
            let cbt = d.incremental.then_some((CBT_GRANULARITY, BITMAP));
            let report = engine::backup_stopped_disk(&repo, &spec, cbt, &progress)
                .map_err(|e| StepError::Invalid(format!("backup failed: {e}")))?;
            reports[i] = Some(report);
        }
        Ok(reports.into_iter().flatten().collect())
    }

    /// The point-in-time cut of the live disks `live` (index into `disks`,
    /// control socket): every job locked and connected before the pause,
    /// then, with the VM paused, each disk drained, its bitmap frozen, its
    /// job planned and the planned chunks copied to staging. Returns the
    /// planned jobs and how long the VM was paused (None when it was not
    /// running).
    fn cut<'r>(
        &mut self,
        vm: Option<&str>,
        disks: &[DiskBackup<'_>],
        live: &[(usize, PathBuf)],
        repo: &'r engine::Repository,
        staging: &Path,
    ) -> Result<(Vec<LiveJob<'r>>, Option<u64>), StepError> {
        let mut prepared = Vec::with_capacity(live.len());
        for (index, control) in live {
            let d = &disks[*index];
            let id = &d.volume.meta.id;
            let err = |e: &dyn std::fmt::Display| {
                StepError::Invalid(format!("backup of volume {id}: {e}"))
            };
            let path = volumes::volume_path(&self.config.state_dir, id);
            let mut spec = engine::BackupSpec::new(id, &path);
            // The job reads the staging copy, which need never reach the disk.
            spec.scratch_source = true;
            let job = engine::BackupJob::lock(repo, &spec).map_err(|e| err(&e))?;
            let mut client = control::Client::connect(control).map_err(|e| err(&e))?;
            let bitmap_new = d.incremental && client.add_bitmap(BITMAP).map_err(|e| err(&e))?;
            let size = std::fs::metadata(&path).map_err(|e| err(&e))?.len();
            prepared.push(Prepared {
                index: *index,
                control: control.clone(),
                client,
                job,
                path,
                size,
                bitmap_new,
            });
        }
        let copy = |prepared: Vec<Prepared<'r>>| -> Result<Vec<LiveJob<'r>>, StepError> {
            let mut jobs = Vec::with_capacity(prepared.len());
            for p in prepared {
                let d = &disks[p.index];
                let id = &d.volume.meta.id;
                let err = |e: &dyn std::fmt::Display| {
                    StepError::Invalid(format!("backup cut of volume {id}: {e}"))
                };
                let (mut client, mut job) = (p.client, p.job);
                client.drain().map_err(|e| err(&e))?;
                let frozen = if d.incremental {
                    let file = staging.join(format!("{id}.frozen"));
                    let bitmap = client.freeze(BITMAP, &file).map_err(|e| err(&e));
                    let _ = std::fs::remove_file(&file);
                    let mut bitmap = bitmap?;
                    if p.bitmap_new {
                        bitmap.valid = false;
                    }
                    let control = p.control;
                    Some(engine::FrozenCbt {
                        bitmap,
                        merge_back: Box::new(move |f: &FrozenBitmap| {
                            let merged = control::Client::connect(&control)
                                .and_then(|mut c| c.merge_back(f, &file))
                                .map_err(|e| e.to_string());
                            let _ = std::fs::remove_file(&file);
                            merged
                        }),
                    })
                } else {
                    None
                };
                let chunks = job.plan(p.size, frozen).map_err(|e| err(&e))?.to_vec();
                let staged = staging.join(format!("{id}.raw"));
                // Owned from here: removed on every error path.
                let staged = Staged(staged);
                let copied = engine::staging::copy_chunks_sparse(
                    &p.path,
                    &staged.0,
                    job.chunk_size(),
                    &chunks,
                )
                .map_err(|e| err(&e))?;
                tracing::debug!(volume = %id, chunks = chunks.len(), bytes = copied.bytes_copied, "staged");
                jobs.push(LiveJob {
                    index: p.index,
                    job,
                    staged,
                });
            }
            Ok(jobs)
        };
        // `with_vm_paused` pauses only a RUNNING VM; a PAUSED or STOPPED
        // one writes nothing during the cut anyway.
        let running = match vm {
            Some(id) => match self.lookup(id)? {
                Some(d) => d.get_state()?.0 == virt::sys::VIR_DOMAIN_RUNNING,
                None => false,
            },
            None => false,
        };
        let start = Instant::now();
        let jobs = match vm {
            Some(vm) => self.with_vm_paused(vm, |_| copy(prepared)),
            None => copy(prepared),
        };
        let cut_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let jobs = jobs?;
        tracing::info!(vm = ?vm, disks = jobs.len(), cut_ms, paused = running, "backup cut taken");
        Ok((jobs, running.then_some(cut_ms)))
    }

    /// A taken backup: its record, spec and repository point.
    pub(super) fn backup_point(
        &self,
        backup_id: &str,
    ) -> Result<(Record, BackupSpec, String), StepError> {
        let backup = self
            .get(backups::KIND, backup_id)?
            .ok_or_else(|| StepError::Invalid(format!("backup {backup_id} was deleted")))?;
        let spec: BackupSpec = backup.spec()?;
        let point = spec
            .point_id
            .clone()
            .ok_or_else(|| StepError::Invalid(format!("backup {backup_id} has no point")))?;
        Ok((backup, spec, point))
    }

    /// Fills a new volume from a backup point (verified by re-reading).
    pub(super) fn volume_from_backup(
        &self,
        task: &Task,
        volume: &Record,
        backup_id: &str,
    ) -> Result<u64, StepError> {
        let (backup, spec, point) = self.backup_point(backup_id)?;
        let repo = self.repository_reading(&point, backup.meta.vdc_id.as_deref())?;
        let dest = volumes::volume_path(&self.config.state_dir, &volume.meta.id);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StepError::Invalid(format!("create {}: {e}", dir.display())))?;
        }
        let progress = self.progress(task, "restoring the backup");
        let report = engine::restore(
            &repo,
            &point,
            &dest,
            engine::RestoreMode::NewFile,
            8,
            &progress,
        )
        .map_err(|e| StepError::Invalid(format!("restore failed: {e}")))?;
        if !report.verified {
            return Err(StepError::Invalid(
                "the restored volume did not verify".into(),
            ));
        }
        Ok(spec.size_bytes)
    }

    pub(super) fn backup_task(&mut self, task: &Task) -> Result<(), StepError> {
        let Some(record) = self.get(backups::KIND, &task.resource_id)? else {
            return Err(StepError::Invalid("the backup is gone".into()));
        };
        match task.action.as_str() {
            "delete" => {
                let spec: BackupSpec = record.spec()?;
                if let Some(point) = &spec.point_id {
                    let repo = self.repository()?;
                    repo.remove_point(point)
                        .map_err(|e| StepError::Invalid(format!("remove point {point}: {e}")))?;
                    let gc = repo
                        .gc()
                        .map_err(|e| StepError::Invalid(format!("collect chunks: {e}")))?;
                    tracing::info!(backup = %record.meta.id, ?gc, "backup deleted");
                }
                self.block_on(async {
                    let mut tx = self.store.begin_write().await?;
                    records::delete(&mut tx, &record, backups::KIND).await?;
                    tx.commit().await?;
                    Ok::<_, StepError>(())
                })
            }
            other => Err(StepError::Invalid(format!("unknown backup action {other}"))),
        }
    }

    /// Runs the backup policies that are due (see
    /// `keel_control::api::backup_policies`).
    pub(super) fn run_backup_policies(&mut self) -> Result<(), StepError> {
        use keel_control::api::backup_policies;
        self.block_on(async {
            let now = keel_control::api::records::now_ms();
            let mut conn = self.store.pool().acquire().await?;
            if !backup_policies::any_due(&mut conn, now).await? {
                return Ok(());
            }
            drop(conn);
            let mut tx = self.store.begin_write().await?;
            let rounds = backup_policies::run_due(&mut tx, now).await?;
            tx.commit().await?;
            if rounds > 0 {
                tracing::info!(rounds, "backup policy rounds queued");
            }
            Ok::<_, StepError>(())
        })
    }
}

/// What a taken backup reports on its `/backups` record.
pub(super) fn record_report(spec: &mut BackupSpec, report: &engine::BackupReport) {
    spec.point_id = Some(report.id.clone());
    spec.kind = Some(format!("{:?}", report.kind).to_lowercase());
    spec.fallback = report.fallback.clone();
    spec.chunks_total = report.chunks_total;
    spec.chunks_read = report.chunks_read;
    spec.chunks_dedup = report.chunks_dedup;
    spec.bytes_read = report.bytes_read;
    spec.bytes_stored = report.bytes_stored;
    spec.seconds = report.seconds;
    spec.throughput_mb_s = if report.seconds > 0.0 {
        report.bytes_read as f64 / 1e6 / report.seconds
    } else {
        0.0
    };
    let data = report.chunks_read.saturating_sub(report.chunks_zero);
    spec.dedup_ratio = data as f64 / report.chunks_stored.max(1) as f64;
    spec.encryption = report.encryption.clone();
    spec.paused_ms = report.paused_ms;
}
