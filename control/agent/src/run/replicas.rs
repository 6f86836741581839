//! Replica groups on the DR host: the replica process of each (through
//! [`ReplicaServers`](crate::replica_servers)), its status reported back,
//! and failover: promote at a recovery point, the disks become volumes of
//! this site, the protected VMs are made and booted here by priority.
//!
//! An adopting group (reprotect) receives into existing volumes: each is
//! hard-linked into the replica's directory as its disk file before the
//! replica starts (same file, so applied segments land in the volume; the
//! link goes with the group's directory), and failover (failback) starts
//! the original VMs on them.

use keel_control::api::records::{self, PENDING};
use keel_control::api::replica_groups::{
    self as groups, ReplicaGroupSpec, ERROR, FAILED_OVER, FAILING_OVER, KIND, RECEIVING,
};
use keel_control::api::tasks::Task;
use keel_control::api::vms;
use keel_control::api::volumes;

use super::{Agent, StepError};
use crate::replica_servers::ReplicaRun;

impl Agent {
    /// Keeps a replica running for every receiving group and its status
    /// current; stops those of deleted or failed-over groups and removes
    /// what deleted groups left.
    pub(super) fn reconcile_replicas(&mut self) -> Result<(), StepError> {
        let all = self.block_on(async {
            let mut conn = self.store.pool().acquire().await?;
            Ok::<_, StepError>(records::all(&mut conn, KIND).await?)
        })?;
        let mut wanted = Vec::new();
        for record in &all {
            let id = &record.meta.id;
            let status = record.meta.status.as_str();
            if status == FAILING_OVER {
                // The failover task owns the replica now.
                wanted.push(id.clone());
                continue;
            }
            if status != PENDING && status != RECEIVING && status != ERROR {
                continue;
            }
            wanted.push(id.clone());
            let spec: ReplicaGroupSpec = record.spec()?;
            if let Some(adopted) = &spec.adopted {
                if let Err(reason) = self.link_adopted(id, &adopted.volume_ids) {
                    tracing::warn!(group = %id, error = %reason, "cannot adopt volumes");
                    self.observe_spec(
                        KIND,
                        id,
                        Some((&[PENDING, RECEIVING, ERROR], ERROR)),
                        |s: &mut ReplicaGroupSpec| {
                            s.status_reason = reason;
                        },
                    )?;
                    continue;
                }
            }
            let run = ReplicaRun {
                listen: spec.listen_address.clone(),
                keep: spec.keep,
                credentials: spec.pairing.credentials.clone(),
            };
            let from: &[&str] = &[PENDING, RECEIVING, ERROR];
            match self.replicas.ensure(id, &run) {
                Ok(()) => {
                    let observed = self.replicas.status(id);
                    if observed.is_some() && observed != spec.observed
                        || status != RECEIVING
                        || !spec.status_reason.is_empty()
                    {
                        self.observe_spec(
                            KIND,
                            id,
                            Some((from, RECEIVING)),
                            |s: &mut ReplicaGroupSpec| {
                                if observed.is_some() {
                                    s.observed = observed;
                                }
                                s.status_reason = String::new();
                            },
                        )?;
                    }
                }
                Err(e) => {
                    let reason = e.to_string();
                    tracing::warn!(group = %id, error = %reason, "replica not running");
                    self.observe_spec(
                        KIND,
                        id,
                        Some((from, ERROR)),
                        |s: &mut ReplicaGroupSpec| {
                            s.status_reason = reason;
                        },
                    )?;
                }
            }
        }
        self.replicas.retain(&wanted);
        let root = self.config.state_dir.join("cdp-replicas");
        if let Ok(dir) = std::fs::read_dir(&root) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !all.iter().any(|r| r.meta.id == name) {
                    tracing::info!(group = %name, "removing a deleted replica group's data");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }

    /// Hard-links each adopted volume into the replica's directory as
    /// disk `index` (once; a link already there is the same file). The
    /// volume's changed-block bitmap goes: the replica writes it without
    /// CBT, so its next backup must be full.
    fn link_adopted(&self, id: &str, volume_ids: &[String]) -> Result<(), String> {
        let data = self.replicas.data_dir(id);
        std::fs::create_dir_all(&data).map_err(|e| format!("create {}: {e}", data.display()))?;
        for (index, volume) in volume_ids.iter().enumerate() {
            let link = data.join(format!("disk-{index}.raw"));
            if link.exists() {
                continue;
            }
            let image = volumes::volume_path(&self.config.state_dir, volume);
            match std::fs::remove_file(keel_vhost::cbt_path(&image)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("remove the CBT bitmap of volume {volume}: {e}"))
                }
                _ => {}
            }
            std::fs::hard_link(&image, &link).map_err(|e| {
                format!(
                    "link volume {volume} ({}) into {}: {e}",
                    image.display(),
                    data.display()
                )
            })?;
        }
        Ok(())
    }

    pub(super) fn replica_task(&mut self, task: &Task) -> Result<(), StepError> {
        if task.action != "failover" {
            return Err(StepError::Invalid(format!(
                "replica groups have no {} task",
                task.action
            )));
        }
        let id = task.resource_id.clone();
        match self.failover(&id, task.params["recovery_point"].as_u64()) {
            Ok(()) => Ok(()),
            Err(e) => {
                let reason = e.to_string();
                self.observe_spec(
                    KIND,
                    &id,
                    Some((&[FAILING_OVER], ERROR)),
                    |s: &mut ReplicaGroupSpec| {
                        s.status_reason = reason;
                    },
                )?;
                Err(e)
            }
        }
    }

    /// Promote, adopt the disks as volumes, make and boot the VMs.
    fn failover(&mut self, id: &str, point: Option<u64>) -> Result<(), StepError> {
        let record = self
            .get(KIND, id)?
            .ok_or_else(|| StepError::Invalid("the replica group is gone".into()))?;
        self.replicas.stop(id);
        let data = self.replicas.data_dir(id);
        let mut replica = keel_cdp::replica::Replica::open_existing(&data)
            .map_err(|e| StepError::Invalid(format!("replica {}: {e}", data.display())))?;
        let promoted = match (replica.state().promoted, point) {
            // A re-run after a crash: promoted already, at its last point.
            (true, _) => replica.state().last_seq,
            (false, to) => replica
                .promote(to)
                .map_err(|e| StepError::Invalid(format!("promote: {e}")))?,
        };
        let disks = replica.state().disks.clone();
        let spec: ReplicaGroupSpec = record.spec()?;
        let expected: usize = spec.pairing.vms.iter().map(|vm| vm.disks.len()).sum();
        if disks.len() != expected {
            return Err(StepError::Invalid(format!(
                "the replica holds {} disks, the pairing names {expected}: nothing was received yet?",
                disks.len()
            )));
        }
        tracing::info!(group = %id, point = promoted, "replica promoted; failing over");
        let done = self.block_on(async {
            let mut tx = self.store.begin_write().await?;
            let done = groups::failover_records(&mut tx, &record, promoted).await?;
            tx.commit().await?;
            Ok::<_, StepError>(done)
        })?;
        for (index, volume) in done.volume_ids.iter().enumerate() {
            let to = volumes::volume_path(&self.config.state_dir, volume);
            let from = replica.disk_path(u16::try_from(index).unwrap_or(u16::MAX));
            if !to.exists() {
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        StepError::Invalid(format!("create {}: {e}", parent.display()))
                    })?;
                }
                std::fs::rename(&from, &to).map_err(|e| {
                    StepError::Invalid(format!("move {} to {}: {e}", from.display(), to.display()))
                })?;
            }
        }
        for vm in &done.vm_ids {
            let Some(vm_record) = self.get(vms::KIND, vm)? else {
                continue;
            };
            if spec.adopted.is_some() {
                // Failback: the original VM, on its own volumes.
                self.vm_start(&vm_record)?;
            } else {
                self.vm_create(&vm_record, true)?;
            }
            let current = self.get(vms::KIND, vm)?.unwrap_or(vm_record);
            self.observe_vm(&current, true)?;
        }
        self.observe_spec(
            KIND,
            id,
            Some((&[FAILING_OVER], FAILED_OVER)),
            |s: &mut ReplicaGroupSpec| {
                s.status_reason = String::new();
            },
        )
    }
}
