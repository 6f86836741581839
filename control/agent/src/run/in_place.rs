//! Restores over existing disks (`in_place`): a volume from one of its
//! backups, a VM's disks and UEFI variables from one of its VM backups.
//! The VM is off, so the disk server is stopped first (it restarts with
//! the VM). The disk then holds the point, not what its changed-block
//! bitmaps tracked since the chain's newest point, so the bitmaps go and
//! the next backup reads everything.

use keel_cdp::backup as engine;
use keel_control::api::records::Record;
use keel_control::api::tasks::Task;
use keel_control::api::vm_backups::{self, VmBackupSpec};
use keel_control::api::volumes;

use super::{Agent, StepError};

impl Agent {
    /// Overwrites `volume` with backup `backup_id` (verified by re-reading).
    pub(super) fn restore_volume_in_place(
        &mut self,
        task: &Task,
        volume: &Record,
        backup_id: &str,
    ) -> Result<(), StepError> {
        let (backup, _, point) = self.backup_point(backup_id)?;
        let repo = self.repository_reading(&point, backup.meta.vdc_id.as_deref())?;
        self.disks.stop(&volume.meta.id);
        let path = volumes::volume_path(&self.config.state_dir, &volume.meta.id);
        let progress = self.progress(task, "restoring the backup in place");
        let restored = engine::restore(
            &repo,
            &point,
            &path,
            engine::RestoreMode::InPlace,
            8,
            &progress,
        );
        // Even a failed restore changed the disk: the bitmaps no longer
        // describe it either way.
        let cbt = keel_vhost::cbt_path(&path);
        if let Err(e) = std::fs::remove_file(&cbt) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(StepError::Invalid(format!(
                    "remove changed-block bitmaps {}: {e}",
                    cbt.display()
                )));
            }
        }
        let report = restored.map_err(|e| StepError::Invalid(format!("restore failed: {e}")))?;
        tracing::info!(volume = %volume.meta.id, backup = backup_id, written = report.chunks_written, "restored in place");
        Ok(())
    }

    /// Overwrites the disks and UEFI variables of `vm` with VM backup
    /// `vm_backup_id`.
    pub(super) fn restore_vm_in_place(
        &mut self,
        task: &Task,
        vm: &Record,
        vm_backup_id: &str,
    ) -> Result<(), StepError> {
        let record = self
            .get(vm_backups::KIND, vm_backup_id)?
            .ok_or_else(|| StepError::Invalid(format!("VM backup {vm_backup_id} is gone")))?;
        let spec: VmBackupSpec = record.spec()?;
        if let Some(d) = self.lookup(&vm.meta.id)? {
            if d.is_active()? {
                return Err(StepError::Invalid(
                    "the VM is running; stop it first".into(),
                ));
            }
        }
        for disk in &spec.disks {
            let volume = self
                .get(volumes::KIND, &disk.volume_id)?
                .ok_or_else(|| StepError::Invalid(format!("volume {} is gone", disk.volume_id)))?;
            self.restore_volume_in_place(task, &volume, &disk.backup_id)?;
        }
        if let Some(point) = &spec.nvram_point {
            let target = self.nvram(&vm.meta.id);
            let repo = self.repository_reading(point, record.meta.vdc_id.as_deref())?;
            let mode = if target.exists() {
                engine::RestoreMode::InPlace
            } else {
                engine::RestoreMode::NewFile
            };
            engine::restore(&repo, point, &target, mode, 1, &|_| {}).map_err(|e| {
                StepError::Invalid(format!("restore of the UEFI variables failed: {e}"))
            })?;
        }
        Ok(())
    }
}
