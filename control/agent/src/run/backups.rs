//! Volume backups with keel's backup engine: taking one (incremental from
//! the bitmap the volume's disk server kept), restoring one into a new
//! volume, deleting one. The repository is `<state dir>/backups`.

use keel_cdp::backup as engine;
use keel_control::api::backups::{self, BackupSpec};
use keel_control::api::records::{self, Record};
use keel_control::api::tasks::{self, Task};
use keel_control::api::volumes::{self, VolumeSpec};

use super::{Agent, StepError};
use crate::disk_servers::CBT_GRANULARITY;

/// The bitmap chain of API backups in each volume's CBT file.
const BITMAP: &str = "keel-backups";

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
        move |p: engine::Progress| {
            if let Some(pct) = p.done.saturating_mul(100).checked_div(p.total) {
                let pct = i64::try_from(pct).unwrap_or(100).min(99);
                let _ = self.task_state(&task.id, tasks::RUNNING, pct, note);
            }
        }
    }

    pub(super) fn volume_backup(&mut self, task: &Task, volume: &Record) -> Result<(), StepError> {
        let backup_id = task.params["backup_id"].as_str().unwrap_or("").to_owned();
        let record = self
            .get(backups::KIND, &backup_id)?
            .ok_or_else(|| StepError::Invalid(format!("backup {backup_id} is gone")))?;
        let mut spec: BackupSpec = record.spec()?;
        let result = self.take_backup(task, volume, spec.incremental);
        match result {
            Ok(report) => {
                spec.point_id = Some(report.id.clone());
                spec.kind = Some(format!("{:?}", report.kind).to_lowercase());
                spec.fallback = report.fallback.clone();
                spec.size_bytes = volume.spec::<VolumeSpec>()?.size_bytes;
                spec.chunks_total = report.chunks_total;
                spec.chunks_read = report.chunks_read;
                spec.bytes_stored = report.bytes_stored;
                spec.encryption = report.encryption.clone();
                tracing::info!(backup = %backup_id, volume = %volume.meta.id, kind = ?report.kind, read = report.chunks_read, total = report.chunks_total, "backup taken");
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

    fn take_backup(
        &self,
        task: &Task,
        volume: &Record,
        incremental: bool,
    ) -> Result<engine::BackupReport, StepError> {
        let repo = self.repository_writing(volume.meta.vdc_id.as_deref())?;
        let path = volumes::volume_path(&self.config.state_dir, &volume.meta.id);
        let spec = engine::BackupSpec::new(&volume.meta.id, &path);
        let progress = self.progress(task, "reading the volume");
        // A full backup leaves the bitmap alone: the next incremental then
        // reads what changed since the one before, a superset, still exact.
        let cbt = incremental.then_some((CBT_GRANULARITY, BITMAP));
        let report = engine::backup_stopped_disk(&repo, &spec, cbt, &progress)
            .map_err(|e| StepError::Invalid(format!("backup failed: {e}")))?;
        Ok(report)
    }

    /// Fills a new volume from a backup point (verified by re-reading).
    pub(super) fn volume_from_backup(
        &self,
        task: &Task,
        volume: &Record,
        backup_id: &str,
    ) -> Result<u64, StepError> {
        let backup = self
            .get(backups::KIND, backup_id)?
            .ok_or_else(|| StepError::Invalid(format!("backup {backup_id} was deleted")))?;
        let spec: BackupSpec = backup.spec()?;
        let point = spec
            .point_id
            .ok_or_else(|| StepError::Invalid(format!("backup {backup_id} has no point")))?;
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

// MERGE(wip-pit): placeholder until the helper's one-cut implementation lands.
pub(super) struct DiskBackup<'a> {
    pub volume: &'a Record,
    pub incremental: bool,
}

impl Agent {
    pub(super) fn take_backups(
        &mut self,
        task: &Task,
        _vm: Option<&str>,
        disks: &[DiskBackup<'_>],
    ) -> Result<Vec<engine::BackupReport>, StepError> {
        disks
            .iter()
            .map(|d| self.take_backup(task, d.volume, d.incremental))
            .collect()
    }
}
