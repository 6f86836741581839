//! VM backups (see `keel_control::api::vm_backups`): every disk at one cut
//! plus the VM's UEFI variables, kept as a point of their own in the same
//! repository; restoring one fills a new VM's volumes and NVRAM before the
//! VM is defined. Deleting one removes its points and collects chunks.

use keel_cdp::backup as engine;
use keel_control::api::backups::{self, BackupSpec};
use keel_control::api::records::{self, Record};
use keel_control::api::tasks::Task;
use keel_control::api::vm_backups::{self, VmBackupSpec};
use keel_control::api::volumes::{self, VolumeSpec};

use super::backups::DiskBackup;
use super::{Agent, StepError};

impl Agent {
    /// The `backup` task of a VM: one cut of all its disks, then the NVRAM.
    pub(super) fn vm_backup(&mut self, task: &Task, vm: &Record) -> Result<(), StepError> {
        let id = task.params["vm_backup_id"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let record = self
            .get(vm_backups::KIND, &id)?
            .ok_or_else(|| StepError::Invalid(format!("VM backup {id} is gone")))?;
        let mut spec: VmBackupSpec = record.spec()?;
        let taken = self.take_vm_backup(task, vm, &mut spec);
        if let Err(e) = &taken {
            spec.status_reason = e.to_string();
        }
        let status = if taken.is_ok() {
            vm_backups::AVAILABLE
        } else {
            vm_backups::ERROR
        };
        self.observe(
            vm_backups::KIND,
            &id,
            status,
            Some(records::to_json(&spec)?),
        )?;
        taken
    }

    fn take_vm_backup(
        &mut self,
        task: &Task,
        vm: &Record,
        spec: &mut VmBackupSpec,
    ) -> Result<(), StepError> {
        let mut volumes = Vec::with_capacity(spec.disks.len());
        for disk in &spec.disks {
            volumes.push(
                self.get(volumes::KIND, &disk.volume_id)?.ok_or_else(|| {
                    StepError::Invalid(format!("volume {} is gone", disk.volume_id))
                })?,
            );
        }
        let disks: Vec<DiskBackup<'_>> = volumes
            .iter()
            .map(|volume| DiskBackup {
                volume,
                incremental: spec.incremental,
            })
            .collect();
        let taken = self.take_backups(task, Some(&vm.meta.id), &disks);
        let reports = match taken {
            Ok(reports) => reports,
            Err(e) => {
                for disk in &spec.disks {
                    self.record_disk_backup(&disk.backup_id, Err(&e))?;
                }
                return Err(e);
            }
        };
        for (disk, report) in spec.disks.iter().zip(&reports) {
            self.record_disk_backup(&disk.backup_id, Ok(report))?;
            spec.bytes_stored += report.bytes_stored;
        }
        spec.paused_ms = reports.iter().filter_map(|r| r.paused_ms).max();
        spec.nvram_point = self.backup_nvram(vm)?;
        Ok(())
    }

    /// Stores the outcome of one disk's backup on its `/backups` record.
    fn record_disk_backup(
        &self,
        backup_id: &str,
        outcome: Result<&engine::BackupReport, &StepError>,
    ) -> Result<(), StepError> {
        let Some(record) = self.get(backups::KIND, backup_id)? else {
            return Ok(());
        };
        let mut spec: BackupSpec = record.spec()?;
        let status = match outcome {
            Ok(report) => {
                super::backups::record_report(&mut spec, report);
                backups::AVAILABLE
            }
            Err(e) => {
                spec.status_reason = e.to_string();
                backups::ERROR
            }
        };
        self.observe(
            backups::KIND,
            backup_id,
            status,
            Some(records::to_json(&spec)?),
        )
    }

    /// Backs the VM's UEFI variables up as a small point of their own (no
    /// chain: always whole); `None` for a BIOS VM, which has none.
    fn backup_nvram(&self, vm: &Record) -> Result<Option<String>, StepError> {
        let nvram = self.nvram(&vm.meta.id);
        if !nvram.exists() {
            return Ok(None);
        }
        let repo = self.repository_writing(vm.meta.vdc_id.as_deref())?;
        let spec = engine::BackupSpec::new(&format!("nvram-{}", vm.meta.id), &nvram);
        let report = engine::backup(&repo, &spec, engine::Tracking::None, &|_| {})
            .map_err(|e| StepError::Invalid(format!("backup of the UEFI variables failed: {e}")))?;
        Ok(Some(report.id))
    }

    /// Before a VM made by `POST /vm-backups/{id}/actions/restore` is
    /// defined: fills its volumes from the disks' points and its NVRAM
    /// from the backed-up variables. Nothing to do for other creates.
    pub(super) fn restore_vm_disks(&mut self, task: &Task) -> Result<(), StepError> {
        let restore = &task.params["restore"];
        let Some(disks) = restore["disks"].as_array() else {
            return Ok(());
        };
        for disk in disks {
            let (Some(volume_id), Some(backup_id)) =
                (disk["volume_id"].as_str(), disk["backup_id"].as_str())
            else {
                return Err(StepError::Invalid(format!("bad restore entry {disk}")));
            };
            let volume = self
                .get(volumes::KIND, volume_id)?
                .ok_or_else(|| StepError::Invalid(format!("volume {volume_id} is gone")))?;
            let mut spec: VolumeSpec = volume.spec()?;
            match self.volume_from_backup(task, &volume, backup_id) {
                Ok(size) => {
                    spec.size_bytes = size;
                    self.observe(
                        volumes::KIND,
                        volume_id,
                        volumes::IN_USE,
                        Some(records::to_json(&spec)?),
                    )?;
                }
                Err(e) => {
                    spec.status_reason = e.to_string();
                    self.observe(
                        volumes::KIND,
                        volume_id,
                        volumes::ERROR,
                        Some(records::to_json(&spec)?),
                    )?;
                    return Err(e);
                }
            }
        }
        if let Some(point) = restore["nvram_point"].as_str() {
            let target = self.nvram(&task.resource_id);
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StepError::Invalid(format!("create {}: {e}", dir.display())))?;
            }
            // A failed earlier attempt may have left one.
            let _ = std::fs::remove_file(&target);
            let repo = self.repository_reading(point, task.vdc_id.as_deref())?;
            engine::restore(
                &repo,
                point,
                &target,
                engine::RestoreMode::NewFile,
                1,
                &|_| {},
            )
            .map_err(|e| {
                StepError::Invalid(format!("restore of the UEFI variables failed: {e}"))
            })?;
        }
        Ok(())
    }

    /// The `delete` task of a VM backup: its disks' points, its NVRAM
    /// point, then the chunks no point uses any more.
    pub(super) fn vm_backup_task(&mut self, task: &Task) -> Result<(), StepError> {
        let Some(record) = self.get(vm_backups::KIND, &task.resource_id)? else {
            return Err(StepError::Invalid("the VM backup is gone".into()));
        };
        if task.action != "delete" {
            return Err(StepError::Invalid(format!(
                "unknown VM backup action {}",
                task.action
            )));
        }
        let spec: VmBackupSpec = record.spec()?;
        let repo = self.repository()?;
        let mut disk_records = Vec::new();
        let mut points: Vec<String> = spec.nvram_point.iter().cloned().collect();
        for disk in &spec.disks {
            if let Some(b) = self.get(backups::KIND, &disk.backup_id)? {
                let bspec: BackupSpec = b.spec()?;
                points.extend(bspec.point_id);
                disk_records.push(b);
            }
        }
        let present = repo
            .point_ids()
            .map_err(|e| StepError::Invalid(format!("list points: {e}")))?;
        // A point already gone (an earlier attempt removed it) is skipped.
        for point in points.iter().filter(|p| present.contains(p)) {
            repo.remove_point(point)
                .map_err(|e| StepError::Invalid(format!("remove point {point}: {e}")))?;
        }
        let gc = repo
            .gc()
            .map_err(|e| StepError::Invalid(format!("collect chunks: {e}")))?;
        tracing::info!(vm_backup = %record.meta.id, points = points.len(), ?gc, "VM backup deleted");
        self.block_on(async {
            let mut tx = self.store.begin_write().await?;
            for b in &disk_records {
                records::delete(&mut tx, b, backups::KIND).await?;
            }
            records::delete(&mut tx, &record, vm_backups::KIND).await?;
            tx.commit().await?;
            Ok::<_, StepError>(())
        })
    }
}
