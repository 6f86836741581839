//! Protection groups on the source host: the group's certificates, its
//! `keel cdp source` (through [`DiskServers`](crate::disk_servers)), and
//! the shipping status reported back. The start and stop tasks switch the
//! members' disks between per-volume backends and the group's CDP source;
//! every observe pass keeps a protecting group's source running and its
//! status current.

use std::path::PathBuf;

use keel_control::api::protection_groups::{
    self as groups, ProtectionGroupSpec, ReplicaCredentials, ERROR, KIND, PROTECTING, STARTING,
    STOPPING, UNPROTECTED,
};
use keel_control::api::records::{self, Record};
use keel_control::api::tasks::Task;
use keel_control::api::vms::{self, VmSpec};
use keel_control::api::volumes;

use super::{Agent, StepError};
use crate::disk_servers::CdpGroup;

impl Agent {
    fn group_dir(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("cdp").join(id)
    }

    /// Makes the group's site CA and certificates (once) and publishes the
    /// replica's side; the source's key stays on this host.
    fn ensure_credentials(&self, record: &Record) -> Result<(), StepError> {
        let spec: ProtectionGroupSpec = record.spec()?;
        if spec.credentials.is_some() {
            return Ok(());
        }
        let pki = self.group_dir(&record.meta.id).join("pki");
        let (_, replica) = keel_cdp::transport::tls::generate_pki(&pki, &spec.replica_server_name)
            .map_err(|e| StepError::Invalid(format!("certificates: {e}")))?;
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map_err(|e| StepError::Invalid(format!("read {}: {e}", p.display())))
        };
        let credentials = ReplicaCredentials {
            group_number: groups::group_number(&record.meta.id),
            source_site: self.site,
            server_name: spec.replica_server_name.clone(),
            ca_pem: read(&replica.ca)?,
            cert_pem: read(&replica.cert)?,
            key_pem: read(&replica.key)?,
        };
        // The replica's key lives in the store now (handed out by the API).
        let _ = std::fs::remove_file(&replica.key);
        tracing::info!(group = %record.meta.id, "protection group certificates made");
        self.observe_spec(
            KIND,
            &record.meta.id,
            None,
            |s: &mut ProtectionGroupSpec| {
                s.credentials = Some(credentials);
            },
        )
    }

    /// What the group's CDP source serves: every disk of every member, in
    /// member order.
    fn cdp_group(&self, record: &Record) -> Result<CdpGroup, StepError> {
        let spec: ProtectionGroupSpec = record.spec()?;
        let paired = self.block_on(async {
            let mut conn = self.store.pool().acquire().await?;
            Ok::<_, StepError>(groups::protected_vms(&mut conn, &spec).await?)
        })?;
        let volumes = paired
            .iter()
            .flat_map(|vm| &vm.disks)
            .map(|d| {
                let path = volumes::volume_path(&self.config.state_dir, &d.volume_id);
                (d.volume_id.clone(), path)
            })
            .collect();
        let dir = self.group_dir(&record.meta.id);
        Ok(CdpGroup {
            id: record.meta.id.clone(),
            number: groups::group_number(&record.meta.id),
            site: self.site,
            volumes,
            journal: dir.join("journal"),
            pki: dir.join("pki"),
            rpo_seconds: spec.rpo_seconds,
            sync_timeout_seconds: (spec.mode == "sync").then_some(spec.sync_timeout_seconds),
            max_mbit: spec.max_mbit,
            replica: spec.replica_address,
            server_name: spec.replica_server_name,
        })
    }

    /// The shipper's status as the source last wrote it, and a reason to
    /// show while the DR site has nothing yet.
    fn shipping_status(group: &CdpGroup) -> (Option<serde_json::Value>, String) {
        let status: Option<serde_json::Value> = std::fs::read(group.status_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let reason = match &status {
            None => "the CDP source has not reported yet".to_owned(),
            Some(s) if s["last_acked_seq"].as_u64().unwrap_or(0) == 0 => format!(
                "no segment acknowledged by the replica at {} yet",
                group.replica
            ),
            Some(s) if s["digest_pending"].as_bool() == Some(true) => {
                "comparing the disks with the replica's (only differing chunks will be copied)"
                    .to_owned()
            }
            Some(s) if s["resyncing"].as_bool() == Some(true) => {
                "copying the chunks that differ to the replica (resync)".to_owned()
            }
            Some(s) if s["replication"] == "sync-fallback" => {
                "synchronous mode is waiting for the replica to catch up: writes complete without it meanwhile".to_owned()
            }
            Some(_) => String::new(),
        };
        (status, reason)
    }

    pub(super) fn protection_task(&mut self, task: &Task) -> Result<(), StepError> {
        let record = self
            .get(KIND, &task.resource_id)?
            .ok_or_else(|| StepError::Invalid("the protection group is gone".into()))?;
        let id = record.meta.id.clone();
        match task.action.as_str() {
            "start" => {
                // Checked once here: a group that starts keeps protecting
                // (journaling) through later outages of the DR site.
                if let Err(e) = self.cdp_group(&record).and_then(|g| reachable(&g.replica)) {
                    let reason = e.to_string();
                    self.observe_spec(
                        KIND,
                        &id,
                        Some((&[STARTING], UNPROTECTED)),
                        |s: &mut ProtectionGroupSpec| {
                            s.protecting = false;
                            s.status_reason = reason;
                        },
                    )?;
                    return Err(e);
                }
                let started = self.ensure_credentials(&record).and_then(|()| {
                    let group = self.cdp_group(&record)?;
                    self.disks.serve_group(&group)?;
                    Ok(group)
                });
                match started {
                    Ok(group) => {
                        let (observed, reason) = Self::shipping_status(&group);
                        self.observe_spec(
                            KIND,
                            &id,
                            Some((&[STARTING], PROTECTING)),
                            |s: &mut ProtectionGroupSpec| {
                                s.observed = observed;
                                s.status_reason = reason;
                            },
                        )
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        self.observe_spec(
                            KIND,
                            &id,
                            Some((&[STARTING], ERROR)),
                            |s: &mut ProtectionGroupSpec| {
                                s.status_reason = reason;
                            },
                        )?;
                        Err(e)
                    }
                }
            }
            "stop" => {
                // The source drains before it exits: the final status says
                // whether the replica has every sealed segment.
                let last = self.stop_protection(&id)?;
                let observed = last.and_then(|g| Self::shipping_status(&g).0);
                let reason = match &observed {
                    Some(o) if o["last_acked_seq"].as_u64() < o["last_sealed_seq"].as_u64() => {
                        format!(
                            "stopped before the replica acknowledged segment {} (it has {}): a failover now loses the writes after it",
                            o["last_sealed_seq"], o["last_acked_seq"]
                        )
                    }
                    _ => String::new(),
                };
                self.observe_spec(
                    KIND,
                    &id,
                    Some((&[STOPPING], UNPROTECTED)),
                    |s: &mut ProtectionGroupSpec| {
                        if observed.is_some() {
                            s.observed = observed;
                        }
                        s.status_reason = reason;
                    },
                )
            }
            other => Err(StepError::Invalid(format!(
                "protection groups have no {other} task"
            ))),
        }
    }

    /// Stops the group's source and gives its disks back to per-volume
    /// backends where a VM uses them. The journal must copy everything in
    /// full when protection starts again: the disks are written meanwhile
    /// without it.
    fn stop_protection(&mut self, id: &str) -> Result<Option<CdpGroup>, StepError> {
        let Some(group) = self.disks.stop_group(id) else {
            return Ok(None);
        };
        keel_cdp::journal::require_full_resync(&group.journal)
            .map_err(|e| StepError::Invalid(format!("journal {}: {e}", group.journal.display())))?;
        let all = self.block_on(async {
            let mut conn = self.store.pool().acquire().await?;
            Ok::<_, StepError>(records::all(&mut conn, vms::KIND).await?)
        })?;
        for vm in all {
            if vm.meta.status != vms::RUNNING && vm.meta.status != vms::PAUSED {
                continue;
            }
            let spec: VmSpec = vm.spec()?;
            for v in spec.volume_ids {
                if group.volumes.iter().any(|(g, _)| *g == v) {
                    let path = volumes::volume_path(&self.config.state_dir, &v);
                    self.disks.ensure(&v, &path)?;
                }
            }
        }
        tracing::info!(group = %id, "protection stopped; disks back on their own backends");
        Ok(Some(group))
    }

    /// Keeps every protecting group's source running and its status
    /// current; stops sources of groups that no longer protect and removes
    /// what deleted groups left.
    pub(super) fn reconcile_protection(&mut self) -> Result<(), StepError> {
        let all = self.block_on(async {
            let mut conn = self.store.pool().acquire().await?;
            Ok::<_, StepError>(records::all(&mut conn, KIND).await?)
        })?;
        for record in &all {
            if let Err(e) = self.ensure_credentials(record) {
                tracing::warn!(group = %record.meta.id, error = %e, "protection group certificates not made");
            }
        }
        let mut wanted = Vec::new();
        for record in &all {
            let spec: ProtectionGroupSpec = record.spec()?;
            // Start and stop tasks own the transitions while they run.
            if spec.protecting && (record.meta.status == PROTECTING || record.meta.status == ERROR)
            {
                wanted.push(record.meta.id.clone());
                let served = self.cdp_group(record).and_then(|g| {
                    self.disks.serve_group(&g)?;
                    Ok(g)
                });
                let id = &record.meta.id;
                let from: &[&str] = &[PROTECTING, ERROR];
                match served {
                    Ok(group) => {
                        let (observed, reason) = Self::shipping_status(&group);
                        if observed != spec.observed
                            || reason != spec.status_reason
                            || record.meta.status != PROTECTING
                        {
                            self.observe_spec(
                                KIND,
                                id,
                                Some((from, PROTECTING)),
                                |s: &mut ProtectionGroupSpec| {
                                    s.observed = observed;
                                    s.status_reason = reason;
                                },
                            )?;
                        }
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        if reason != spec.status_reason || record.meta.status != ERROR {
                            tracing::warn!(group = %id, error = %reason, "protection group not served");
                            self.observe_spec(
                                KIND,
                                id,
                                Some((from, ERROR)),
                                |s: &mut ProtectionGroupSpec| {
                                    s.status_reason = reason;
                                },
                            )?;
                        }
                    }
                }
            } else if spec.protecting || record.meta.status == STOPPING {
                wanted.push(record.meta.id.clone());
            }
        }
        for group in self.disks.groups() {
            if !wanted.contains(&group.id) {
                self.stop_protection(&group.id)?;
            }
        }
        // What deleted groups left: journal and the source's key.
        if let Ok(dir) = std::fs::read_dir(self.config.state_dir.join("cdp")) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !all.iter().any(|r| r.meta.id == name) {
                    tracing::info!(group = %name, "removing a deleted protection group's journal");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }
}

/// The connectivity check before protection starts: the DR site's replica
/// accepts a TCP connection (the shipper's own TLS greeting comes later).
fn reachable(address: &str) -> Result<(), StepError> {
    let unreachable = |why: String| {
        StepError::Invalid(format!(
            "the DR site's replica at {address} is unreachable ({why}): create the replica group there (and let it listen) first"
        ))
    };
    let addr: std::net::SocketAddr = address
        .parse()
        .map_err(|e: std::net::AddrParseError| unreachable(e.to_string()))?;
    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .map(drop)
        .map_err(|e| unreachable(e.to_string()))
}
