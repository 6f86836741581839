//! The agent loop: run queued tasks, watch domains, record what is true.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keel_control::api::hosts;
use keel_control::api::images::{self, ImageSpec};
use keel_control::api::loadbalancers::{self, LoadBalancerSpec};
use keel_control::api::problem::ApiError;
use keel_control::api::records::{self, Record};
use keel_control::api::tasks::{self, Task, FAILED, SUCCEEDED};
use keel_control::api::vm_snapshots;
use keel_control::api::vms::{self, VmSpec};
use keel_control::api::volumes::{self, VolumeSpec};
use keel_control::store::Store;
use keel_firmware::guest_firmware::{BootFirmware, FirmwareFiles, NVRAM_FILE};
use virt::connect::Connect;
use virt::domain::Domain;

use crate::disk_servers::DiskServers;
use crate::domain_xml::{self, Accel, DomainSpec};
use crate::load_balancers::LbServers;
use crate::provision;

mod backups;
mod disk_attach;
mod in_place;
mod protection;
mod replicas;
mod vm_backups;
mod volume_gc;

/// How the agent reaches the host.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    /// The `keel` binary (run as `keel vhost-blk` per volume).
    pub keel_bin: PathBuf,
    pub libvirt_uri: String,
    /// `None`: probe on first use ([`crate::accel::detect`]).
    pub accel: Option<Accel>,
    /// A graceful `stop` forces the VM off after this long.
    pub shutdown_timeout: Duration,
    /// This host's id; `None`: the machine id (or one kept in the state
    /// directory). Set to run several agents on one machine (tests).
    pub host_id: Option<String>,
    /// This host's uplink interface per physical network (`--uplink`).
    pub uplinks: std::collections::BTreeMap<String, String>,
}

/// Why one task step failed; its message becomes the task's.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("store: {0}")]
    Store(String),
    #[error("libvirt: {0}")]
    Libvirt(String),
    #[error(transparent)]
    Provision(#[from] provision::ProvisionError),
    #[error(transparent)]
    Disk(#[from] crate::disk_servers::DiskServerError),
    #[error(transparent)]
    Firmware(#[from] keel_firmware::guest_firmware::FirmwareError),
    #[error(transparent)]
    Connect(#[from] crate::libvirtd::LibvirtError),
    #[error("{0}")]
    Invalid(String),
}

impl From<ApiError> for StepError {
    fn from(e: ApiError) -> Self {
        StepError::Store(format!("{e:?}"))
    }
}

impl From<sqlx::Error> for StepError {
    fn from(e: sqlx::Error) -> Self {
        StepError::Store(e.to_string())
    }
}

impl From<virt::error::Error> for StepError {
    fn from(e: virt::error::Error) -> Self {
        StepError::Libvirt(e.message().to_owned())
    }
}

/// Status of a port a data plane serves.
const ACTIVE: &str = "ACTIVE";
const IDLE: Duration = Duration::from_millis(200);
const OBSERVE_EVERY: Duration = Duration::from_secs(1);

/// Starts the agent thread; it stops (leaving VMs running, disk backends
/// flushed and stopped) once `stop` is set.
pub fn spawn(
    store: Store,
    config: AgentConfig,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    let rt = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("keel-agent".into())
        .spawn(move || {
            let mut agent = Agent {
                disks: DiskServers::new(config.keel_bin.clone(), config.state_dir.join("run")),
                lbs: LbServers::new(config.keel_bin.clone(), config.state_dir.join("lb")),
                replicas: crate::replica_servers::ReplicaServers::new(
                    config.keel_bin.clone(),
                    config.state_dir.join("cdp-replicas"),
                ),
                net: crate::network::Dataplane::new(
                    config.keel_bin.clone(),
                    config.state_dir.join("run"),
                ),
                store,
                rt,
                config,
                conn: None,
                started: crate::libvirtd::Started::default(),
                files: FirmwareFiles::default(),
                site: 1,
                host_id: String::new(),
            };
            agent.run(&stop);
        })
}

struct Agent {
    store: Store,
    rt: tokio::runtime::Handle,
    config: AgentConfig,
    conn: Option<Connect>,
    started: crate::libvirtd::Started,
    disks: DiskServers,
    lbs: LbServers,
    replicas: crate::replica_servers::ReplicaServers,
    net: crate::network::Dataplane,
    files: FirmwareFiles,
    /// This host's number as a CDP source site (from its host id).
    site: u64,
    /// This host's id: the tasks it claims and the VMs it observes.
    host_id: String,
}

/// Libvirt's domain states, as keel reports them.
fn status_of(state: u32) -> &'static str {
    match state {
        virt::sys::VIR_DOMAIN_RUNNING
        | virt::sys::VIR_DOMAIN_BLOCKED
        | virt::sys::VIR_DOMAIN_SHUTDOWN => vms::RUNNING,
        virt::sys::VIR_DOMAIN_PAUSED | virt::sys::VIR_DOMAIN_PMSUSPENDED => vms::PAUSED,
        _ => vms::STOPPED,
    }
}

impl Agent {
    fn run(&mut self, stop: &AtomicBool) {
        match self.host_id() {
            Ok(id) => self.host_id = id,
            Err(e) => {
                tracing::error!(error = %e, "no host id; the host agent does not run");
                return;
            }
        }
        self.site = keel_control::api::protection_groups::group_number(&self.host_id);
        match self.register() {
            Ok(()) => tracing::info!(host = %self.host_id, "host registered"),
            Err(e) => {
                tracing::error!(error = %e, "host registration failed; VMs cannot be placed here")
            }
        }
        // Beats from the runtime, not this thread: a long task must not make
        // the host look dead and its running task be taken over.
        let beat = self
            .rt
            .spawn(beat(self.store.clone(), self.host_id.clone()));
        tracing::info!(uri = %self.config.libvirt_uri, accel = ?self.config.accel, "host agent running");
        let mut last_observe = Instant::now() - OBSERVE_EVERY;
        let mut last_gc = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let worked = match self.next_task() {
                Ok(worked) => worked,
                Err(e) => {
                    tracing::warn!(error = %e, "agent step failed");
                    false
                }
            };
            if last_observe.elapsed() >= OBSERVE_EVERY {
                last_observe = Instant::now();
                if let Err(e) = self.observe_all() {
                    tracing::debug!(error = %e, "observing VMs failed");
                }
                if let Err(e) = self.reconcile_lbs() {
                    tracing::warn!(error = %e, "reconciling load balancers failed");
                }
                if let Err(e) = self.reconcile_protection() {
                    tracing::warn!(error = %e, "reconciling protection groups failed");
                }
                if let Err(e) = self.reconcile_replicas() {
                    tracing::warn!(error = %e, "reconciling replica groups failed");
                }
                if let Err(e) = self.run_backup_policies() {
                    tracing::warn!(error = %e, "running backup policies failed");
                }
                if let Err(e) = self.gc_volume_files(&mut last_gc) {
                    tracing::warn!(error = %e, "collecting deleted volumes' files failed");
                }
            }
            if !worked {
                std::thread::sleep(IDLE);
            }
        }
        beat.abort();
        self.disks.stop_all();
        self.lbs.stop_all();
        self.replicas.stop_all();
        self.net.stop();
        if let Some(mut conn) = self.conn.take() {
            let _ = conn.close();
        }
        self.started.stop();
        tracing::info!("host agent stopped");
    }

    /// This host's id: the configured one, else the machine id, else one
    /// kept in the state dir.
    fn host_id(&self) -> Result<String, StepError> {
        if let Some(id) = &self.config.host_id {
            return Ok(id.clone());
        }
        if let Some(id) = crate::inventory::machine_id() {
            return Ok(id);
        }
        let path = self.config.state_dir.join("host-id");
        match std::fs::read_to_string(&path) {
            Ok(id) => Ok(id.trim().to_owned()),
            Err(_) => {
                let id = uuid::Uuid::new_v4().to_string();
                std::fs::write(&path, &id)
                    .map_err(|e| StepError::Invalid(format!("write {}: {e}", path.display())))?;
                Ok(id)
            }
        }
    }

    /// Reports this host and its inventory.
    fn register(&self) -> Result<(), StepError> {
        let inventory = hosts::HostInventory {
            uplinks: self.config.uplinks.clone(),
            ..crate::inventory::collect()
        };
        self.block_on(async {
            let mut tx = self.store.begin_write().await?;
            hosts::register(&mut tx, &self.host_id, inventory).await?;
            tx.commit().await?;
            Ok::<_, StepError>(())
        })
    }

    fn conn(&mut self) -> Result<&Connect, StepError> {
        if self.conn.is_none() {
            self.conn = Some(crate::libvirtd::connect(
                &self.config.libvirt_uri,
                &mut self.started,
            )?);
        }
        self.conn
            .as_ref()
            .ok_or_else(|| StepError::Libvirt("no connection".into()))
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn get(&self, kind: &str, id: &str) -> Result<Option<Record>, StepError> {
        self.block_on(async {
            let mut conn = self.store.pool().acquire().await?;
            Ok(records::get(&mut conn, kind, id).await?)
        })
    }

    fn observe(
        &self,
        kind: &str,
        id: &str,
        status: &str,
        spec: Option<serde_json::Value>,
    ) -> Result<(), StepError> {
        self.block_on(async {
            let mut tx = self.store.begin_write().await?;
            records::observe(&mut tx, kind, id, status, spec).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Writes the agent's fields of a resource (see [`records::observe_spec`]).
    fn observe_spec<S: serde::de::DeserializeOwned + serde::Serialize>(
        &self,
        kind: &str,
        id: &str,
        status: Option<(&[&str], &str)>,
        update: impl FnOnce(&mut S),
    ) -> Result<(), StepError> {
        self.block_on(async {
            let mut tx = self.store.begin_write().await?;
            records::observe_spec(&mut tx, kind, id, status, update).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn task_state(
        &self,
        id: &str,
        state: &str,
        progress: i64,
        message: &str,
    ) -> Result<(), StepError> {
        self.block_on(async {
            let mut tx = self.store.begin_write().await?;
            tasks::set_state(&mut tx, id, state, progress, message).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Runs the next queued task, if any.
    fn next_task(&mut self) -> Result<bool, StepError> {
        let task = self.block_on(async {
            let mut tx = self.store.begin_write().await?;
            let task = tasks::claim_next(&mut tx, &self.host_id).await?;
            tx.commit().await?;
            Ok::<_, StepError>(task)
        })?;
        let Some(task) = task else { return Ok(false) };
        tracing::info!(task = %task.id, kind = %task.resource_type, id = %task.resource_id, action = %task.action, "running task");
        let outcome = match task.resource_type.as_str() {
            volumes::KIND => self.volume_task(&task),
            vms::KIND => self.vm_task(&task),
            keel_control::api::backups::KIND => self.backup_task(&task),
            keel_control::api::vm_backups::KIND => self.vm_backup_task(&task),
            keel_control::api::protection_groups::KIND => self.protection_task(&task),
            keel_control::api::replica_groups::KIND => self.replica_task(&task),
            other => Err(StepError::Invalid(format!(
                "no agent handles {other} tasks"
            ))),
        };
        match outcome {
            Ok(()) => self.task_state(&task.id, SUCCEEDED, 100, "")?,
            Err(e) => {
                tracing::warn!(task = %task.id, error = %e, "task failed");
                self.task_state(&task.id, FAILED, 100, &e.to_string())?;
            }
        }
        Ok(true)
    }

    fn volume_task(&mut self, task: &Task) -> Result<(), StepError> {
        let Some(record) = self.get(volumes::KIND, &task.resource_id)? else {
            return Err(StepError::Invalid("the volume is gone".into()));
        };
        match task.action.as_str() {
            "create" => {
                let mut spec: VolumeSpec = record.spec()?;
                let made = match (
                    task.params["from_backup"].as_str(),
                    task.params["copy_of"].as_str(),
                ) {
                    (Some(backup), _) => self
                        .volume_from_backup(task, &record, backup)
                        .map(|size| spec.size_bytes = size),
                    (None, Some(source)) => {
                        if spec.format == volumes::QCOW2 {
                            // Its server (a STOPPED VM's) writes the cluster
                            // map back as it ends: the copy is then complete.
                            self.disks.stop(source);
                        }
                        provision::copy_file(
                            &volumes::volume_path(&self.config.state_dir, source),
                            &volumes::volume_file(
                                &self.config.state_dir,
                                &record.meta.id,
                                &spec.format,
                            ),
                        )
                        .map_err(StepError::from)
                    }
                    (None, None) => self.provision(task, &record.meta.id, &mut spec),
                };
                match made {
                    Ok(()) => {
                        spec.host_id = Some(self.host_id.clone());
                        let status = if spec.attached_to.is_some() {
                            volumes::IN_USE
                        } else {
                            volumes::AVAILABLE
                        };
                        self.observe(
                            volumes::KIND,
                            &record.meta.id,
                            status,
                            Some(records::to_json(&spec)?),
                        )
                    }
                    Err(e) => {
                        spec.status_reason = e.to_string();
                        self.observe(
                            volumes::KIND,
                            &record.meta.id,
                            volumes::ERROR,
                            Some(records::to_json(&spec)?),
                        )?;
                        Err(e)
                    }
                }
            }
            "backup" => self.volume_backup(task, &record),
            "restore" => self.restore_volume_in_place(
                task,
                &record,
                task.params["backup_id"].as_str().unwrap_or(""),
            ),
            "resize" => {
                let size = task.params["size_bytes"].as_u64().unwrap_or(0);
                self.volume_resize(&record, size)
            }
            other => Err(StepError::Invalid(format!("unknown volume action {other}"))),
        }
    }

    fn provision(&self, task: &Task, id: &str, spec: &mut VolumeSpec) -> Result<(), StepError> {
        let dest = volumes::volume_file(&self.config.state_dir, id, &spec.format);
        let target = provision::Target {
            format: &spec.format,
            cluster_size: spec.cluster_size,
            thick: spec.provisioning == "thick",
        };
        match &spec.image_id {
            None => provision::create_blank(&dest, spec.size_bytes, target)?,
            Some(image_id) => {
                let image = self
                    .get("image", image_id)?
                    .ok_or_else(|| StepError::Invalid(format!("image {image_id} was deleted")))?;
                let ispec: ImageSpec = image.spec()?;
                let format = serde_json::to_value(ispec.format)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let path = images::image_path(&self.config.state_dir.join("images"), image_id);
                let size = provision::virtual_size(&path, &format)?.max(spec.size_bytes);
                provision::copy_image(&path, &format, &dest, size, target, |pct| {
                    let _ = self.task_state(
                        &task.id,
                        tasks::RUNNING,
                        i64::from(pct),
                        "copying the image",
                    );
                })?;
                spec.size_bytes = size;
            }
        }
        Ok(())
    }

    /// The VM's UEFI NVRAM (absent for BIOS VMs).
    fn nvram(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join(NVRAM_FILE)
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("vms").join(id)
    }

    fn vm_task(&mut self, task: &Task) -> Result<(), StepError> {
        let Some(record) = self.get(vms::KIND, &task.resource_id)? else {
            return Err(StepError::Invalid("the VM is gone".into()));
        };
        let id = record.meta.id.clone();
        let result = match task.action.as_str() {
            "create" => self.restore_vm_disks(task).and_then(|()| {
                self.vm_create(&record, task.params["start"].as_bool().unwrap_or(true))
            }),
            "backup" => self.vm_backup(task, &record),
            "restore-backup" => self.restore_vm_in_place(
                task,
                &record,
                task.params["vm_backup_id"].as_str().unwrap_or(""),
            ),
            "start" => self.vm_start(&record),
            "stop" => self.vm_stop(&id, false),
            "force-stop" => self.vm_stop(&id, true),
            "reboot" => self.domain(&id).and_then(|d| {
                d.reboot(virt::sys::VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
                    .map_err(StepError::from)
            }),
            "force-reboot" => self
                .domain(&id)
                .and_then(|d| d.reset().map(drop).map_err(StepError::from)),
            "pause" => self
                .domain(&id)
                .and_then(|d| d.suspend().map(drop).map_err(StepError::from)),
            "resume" => self
                .domain(&id)
                .and_then(|d| d.resume().map(drop).map_err(StepError::from)),
            "snapshot" => {
                self.vm_snapshot(&record, task.params["snapshot_id"].as_str().unwrap_or(""))
            }
            "revert" => self.vm_revert(&record, task.params["snapshot_id"].as_str().unwrap_or("")),
            "clone" => self.vm_clone(&record, &task.params),
            "attach-volume" => {
                self.vm_attach_volume(&record, task.params["volume_id"].as_str().unwrap_or(""))
            }
            "detach-volume" => {
                self.vm_detach_volume(&record, task.params["volume_id"].as_str().unwrap_or(""))
            }
            "delete" => {
                return self.vm_delete(
                    &record,
                    task.params["delete_volumes"].as_bool().unwrap_or(false),
                )
            }
            other => Err(StepError::Invalid(format!("unknown VM action {other}"))),
        };
        match &result {
            Ok(()) => {
                // The action may have changed the spec (attached disks).
                let current = self.get(vms::KIND, &id)?.unwrap_or(record);
                self.observe_vm(&current, true)?
            }
            Err(e) => {
                let mut spec: VmSpec = record.spec()?;
                spec.status_reason = e.to_string();
                let status = if record.meta.status == vms::CREATING {
                    vms::ERROR
                } else {
                    record.meta.status.as_str()
                };
                self.observe(vms::KIND, &id, status, Some(records::to_json(&spec)?))?;
            }
        }
        result
    }

    fn domain(&mut self, id: &str) -> Result<Domain, StepError> {
        let name = domain_xml::domain_name(id);
        Ok(Domain::lookup_by_name(self.conn()?, &name)?)
    }

    fn lookup(&mut self, id: &str) -> Result<Option<Domain>, StepError> {
        let name = domain_xml::domain_name(id);
        match Domain::lookup_by_name(self.conn()?, &name) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.code() == virt::error::ErrorNumber::NoDomain => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts the disk backends of the VM and (re)defines its domain.
    fn define(&mut self, record: &Record) -> Result<Domain, StepError> {
        let spec: VmSpec = record.spec()?;
        let mut sockets = Vec::with_capacity(spec.volume_ids.len());
        for vol in &spec.volume_ids {
            let status = self.get(volumes::KIND, vol)?.map(|r| r.meta.status);
            if status.as_deref() != Some(volumes::IN_USE)
                && status.as_deref() != Some(volumes::AVAILABLE)
            {
                return Err(StepError::Invalid(format!(
                    "volume {vol} is {}, not ready",
                    status.unwrap_or_else(|| "deleted".into())
                )));
            }
            let path = volumes::volume_path(&self.config.state_dir, vol);
            sockets.push(self.disks.ensure(vol, &path)?);
        }
        let mut nics = Vec::with_capacity(spec.port_ids.len());
        if !spec.port_ids.is_empty() {
            self.reconcile_network()?;
            for pid in &spec.port_ids {
                let port = self
                    .get("port", pid)?
                    .ok_or_else(|| StepError::Invalid(format!("port {pid} is gone")))?;
                let pspec: keel_control::api::ports::PortSpec = port.spec()?;
                nics.push((
                    pspec.mac_address,
                    crate::network::nic_socket(&self.config.state_dir.join("run"), pid),
                ));
            }
        }
        let dir = self.vm_dir(&record.meta.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| StepError::Invalid(format!("create {}: {e}", dir.display())))?;
        let firmware: BootFirmware = spec.firmware.as_str().parse().map_err(
            |e: keel_firmware::guest_firmware::FirmwareError| StepError::Invalid(e.to_string()),
        )?;
        let nvram = firmware.ensure_nvram(&self.files, &dir)?;
        let xml = domain_xml::render(
            &DomainSpec {
                id: record.meta.id.clone(),
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                firmware,
                nvram,
                disk_sockets: sockets,
                nics,
                console_socket: dir.join("console.sock"),
                console_log: dir.join("console.log"),
                accel: self.accel(),
            },
            &self.files,
        );
        Ok(Domain::define_xml(self.conn()?, &xml)?)
    }

    fn accel(&mut self) -> Accel {
        if let Some(a) = self.config.accel {
            return a;
        }
        let a = crate::accel::detect(&self.config.state_dir.join("run"));
        self.config.accel = Some(a);
        a
    }

    fn vm_create(&mut self, record: &Record, start: bool) -> Result<(), StepError> {
        let domain = self.define(record)?;
        if start {
            domain.create()?;
        }
        Ok(())
    }

    fn vm_start(&mut self, record: &Record) -> Result<(), StepError> {
        let domain = self.define(record)?;
        if !domain.is_active()? {
            domain.create()?;
        }
        Ok(())
    }

    fn vm_stop(&mut self, id: &str, force: bool) -> Result<(), StepError> {
        let Some(domain) = self.lookup(id)? else {
            return Ok(());
        };
        if !domain.is_active()? {
            return Ok(());
        }
        if !force {
            domain.shutdown()?;
            let start = Instant::now();
            while start.elapsed() < self.config.shutdown_timeout {
                if !domain.is_active()? {
                    return Ok(());
                }
                std::thread::sleep(IDLE);
            }
            tracing::info!(vm = id, timeout = ?self.config.shutdown_timeout, "guest ignored ACPI shutdown; forcing it off");
        }
        domain.destroy()?;
        Ok(())
    }

    /// Runs `copy` with the VM paused if it is running, so all its disks
    /// are cut at one instant; the VM resumes whatever `copy` returns.
    fn with_vm_paused<T>(
        &mut self,
        id: &str,
        copy: impl FnOnce(&mut Self) -> Result<T, StepError>,
    ) -> Result<T, StepError> {
        let paused = match self.lookup(id)? {
            Some(d) if d.get_state()?.0 == virt::sys::VIR_DOMAIN_RUNNING => {
                d.suspend()?;
                Some(d)
            }
            _ => None,
        };
        let result = copy(self);
        if let Some(d) = paused {
            d.resume()?;
        }
        result
    }

    fn vm_snapshot(&mut self, record: &Record, snapshot_id: &str) -> Result<(), StepError> {
        let snap = self
            .get(vm_snapshots::KIND, snapshot_id)?
            .ok_or_else(|| StepError::Invalid(format!("snapshot {snapshot_id} is gone")))?;
        let sspec: vm_snapshots::SnapshotSpec = snap.spec()?;
        let dir = self.config.state_dir.clone();
        let nvram = self.nvram(&record.meta.id);
        let copied = self.with_vm_paused(&record.meta.id, |_| {
            for vol in &sspec.volume_ids {
                provision::copy_file(
                    &volumes::volume_path(&dir, vol),
                    &vm_snapshots::snapshot_file(&dir, snapshot_id, vol),
                )?;
            }
            copy_nvram(
                &nvram,
                &vm_snapshots::snapshot_dir(&dir, snapshot_id).join(NVRAM_FILE),
            )
        });
        let status = if copied.is_ok() {
            vm_snapshots::AVAILABLE
        } else {
            vms::ERROR
        };
        self.observe(vm_snapshots::KIND, snapshot_id, status, None)?;
        copied
    }

    fn vm_revert(&mut self, record: &Record, snapshot_id: &str) -> Result<(), StepError> {
        let snap = self
            .get(vm_snapshots::KIND, snapshot_id)?
            .ok_or_else(|| StepError::Invalid(format!("snapshot {snapshot_id} is gone")))?;
        let sspec: vm_snapshots::SnapshotSpec = snap.spec()?;
        if let Some(d) = self.lookup(&record.meta.id)? {
            if d.is_active()? {
                return Err(StepError::Invalid(
                    "the VM is running; stop it first".into(),
                ));
            }
        }
        let dir = self.config.state_dir.clone();
        for vol in &sspec.volume_ids {
            // The backend is idle while the VM is off; restart it on the new file.
            self.disks.stop(vol);
            provision::copy_file(
                &vm_snapshots::snapshot_file(&dir, snapshot_id, vol),
                &volumes::volume_path(&dir, vol),
            )?;
        }
        copy_nvram(
            &vm_snapshots::snapshot_dir(&dir, snapshot_id).join(NVRAM_FILE),
            &self.nvram(&record.meta.id),
        )
    }

    fn vm_clone(&mut self, record: &Record, params: &serde_json::Value) -> Result<(), StepError> {
        let dir = self.config.state_dir.clone();
        let copies: Vec<(String, String)> = params["copies"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| {
                        Some((c["from"].as_str()?.to_owned(), c["to"].as_str()?.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let clones: Vec<String> = params["vm_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        let nvram = self.nvram(&record.meta.id);
        let clone_nvram: Vec<PathBuf> = clones.iter().map(|vm| self.nvram(vm)).collect();
        let copied = self.with_vm_paused(&record.meta.id, |_| {
            for (from, to) in &copies {
                provision::copy_file(
                    &volumes::volume_path(&dir, from),
                    &volumes::volume_path(&dir, to),
                )?;
            }
            // A clone starts with the source's boot entries and keys.
            for to in &clone_nvram {
                copy_nvram(&nvram, to)?;
            }
            Ok(())
        });
        for (_, to) in &copies {
            let status = if copied.is_ok() {
                volumes::IN_USE
            } else {
                volumes::ERROR
            };
            self.observe(volumes::KIND, to, status, None)?;
        }
        copied?;
        let start = params["start"].as_bool().unwrap_or(true);
        for vm in &clones {
            let Some(clone) = self.get(vms::KIND, vm)? else {
                continue;
            };
            match self.vm_create(&clone, start) {
                Ok(()) => self.observe_vm(&clone, true)?,
                Err(e) => {
                    let mut spec: VmSpec = clone.spec()?;
                    spec.status_reason = e.to_string();
                    self.observe(vms::KIND, vm, vms::ERROR, Some(records::to_json(&spec)?))?;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn vm_delete(&mut self, record: &Record, delete_volumes: bool) -> Result<(), StepError> {
        let id = record.meta.id.clone();
        let spec: VmSpec = record.spec()?;
        let snapshots = self.block_on(async {
            let mut conn = self.store.pool().acquire().await?;
            Ok::<_, StepError>(records::children(&mut conn, vm_snapshots::KIND, &id).await?)
        })?;
        if let Some(domain) = self.lookup(&id)? {
            if domain.is_active()? {
                domain.destroy()?;
            }
            domain.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM)?;
        }
        for vol in &spec.volume_ids {
            self.disks.stop(vol);
        }
        let state_dir = self.config.state_dir.clone();
        let mut deleted = Vec::new();
        self.block_on(async {
            let mut tx = self.store.begin_write().await?;
            for vol in &spec.volume_ids {
                let Some(v) = records::get(&mut tx, volumes::KIND, vol).await? else {
                    continue;
                };
                if delete_volumes {
                    // Through the VDC's recycle bin, like a volume's delete.
                    if let volumes::Discarded::Deleted =
                        volumes::discard(&mut tx, &v, false).await?
                    {
                        deleted.push(vol.clone());
                    }
                } else {
                    let mut vspec: VolumeSpec = v.spec()?;
                    vspec.attached_to = None;
                    let status = if v.meta.status == volumes::IN_USE {
                        volumes::AVAILABLE
                    } else {
                        v.meta.status.as_str()
                    };
                    records::observe(
                        &mut tx,
                        volumes::KIND,
                        vol,
                        status,
                        Some(records::to_json(&vspec)?),
                    )
                    .await?;
                }
            }
            for snap in &snapshots {
                records::delete(&mut tx, snap, vm_snapshots::KIND).await?;
            }
            for pid in &spec.port_ids {
                if let Some(port) = records::get(&mut tx, "port", pid).await? {
                    let mut pspec: keel_control::api::ports::PortSpec = port.spec()?;
                    if pspec.delete_with_device {
                        keel_control::api::floating_ips::release_port(&mut tx, pid).await?;
                        records::delete(&mut tx, &port, "port").await?;
                        continue;
                    }
                    pspec.device_id = None;
                    records::observe(
                        &mut tx,
                        "port",
                        pid,
                        records::PENDING,
                        Some(records::to_json(&pspec)?),
                    )
                    .await?;
                }
            }
            if let Some(current) = records::get(&mut tx, vms::KIND, &id).await? {
                records::delete(&mut tx, &current, vms::KIND).await?;
            }
            tx.commit().await?;
            Ok::<_, StepError>(())
        })?;
        for vol in &deleted {
            volumes::remove_volume_files(&state_dir, vol);
        }
        for snap in &snapshots {
            remove_dir(&state_dir.join("snapshots").join(&snap.meta.id));
        }
        remove_dir(&self.vm_dir(&id));
        Ok(())
    }

    /// Records the domain's state on the VM. `acted`: keel just changed it,
    /// so a stop is expected and clears the reason.
    fn observe_vm(&mut self, record: &Record, acted: bool) -> Result<(), StepError> {
        let id = record.meta.id.clone();
        let mut spec: VmSpec = record.spec()?;
        let (status, reason) = match self.lookup(&id)? {
            None if record.meta.status == vms::CREATING => return Ok(()),
            None => (
                vms::LOST,
                "the hypervisor has no domain for this VM".to_owned(),
            ),
            Some(domain) => {
                let (state, why) = domain.get_state()?;
                let status = status_of(state);
                if status == vms::STOPPED && record.meta.status == vms::RUNNING && !acted {
                    (status, format!("QEMU stopped without keel stopping it (libvirt state {state}, reason {why})"))
                } else if acted {
                    (status, String::new())
                } else {
                    (status, spec.status_reason.clone())
                }
            }
        };
        if status == vms::RUNNING || status == vms::PAUSED {
            // A disk backend that died is restarted; QEMU reconnects to it.
            for vol in &spec.volume_ids {
                let path = volumes::volume_path(&self.config.state_dir, vol);
                if let Err(e) = self.disks.ensure(vol, &path) {
                    tracing::warn!(vm = %id, volume = %vol, error = %e, "disk backend not running");
                }
            }
        }
        let vnc_port = if status == vms::RUNNING || status == vms::PAUSED {
            self.lookup(&id)?
                .and_then(|d| d.get_xml_desc(0).ok())
                .and_then(|xml| domain_xml::LiveDomain::parse(&xml).vnc_port)
        } else {
            None
        };
        if status != record.meta.status || reason != spec.status_reason || vnc_port != spec.vnc_port
        {
            spec.vnc_port = vnc_port;
            if status != record.meta.status {
                tracing::info!(vm = %id, from = %record.meta.status, to = status, reason = %reason, "VM state changed");
            }
            spec.status_reason = reason;
            self.observe(vms::KIND, &id, status, Some(records::to_json(&spec)?))?;
        }
        Ok(())
    }

    /// Runs a proxy for every load balancer with a host VIP in the store
    /// and reports what each one serves (VPC VIPs are the data plane's:
    /// [`Self::reconcile_network`]).
    fn reconcile_lbs(&mut self) -> Result<(), StepError> {
        let mut records = self.block_on(async {
            let mut conn = self.store.pool().acquire().await?;
            Ok::<_, StepError>(records::all(&mut conn, loadbalancers::KIND).await?)
        })?;
        records.retain(|r| !loadbalancers::on_vpc(r));
        let ids: Vec<String> = records.iter().map(|r| r.meta.id.clone()).collect();
        self.lbs.retain(&ids);
        for record in records {
            let spec: LoadBalancerSpec = record.spec()?;
            let doc = records::to_json(&spec.config)?;
            let (status, reason, observed) = match self.lbs.ensure(&record.meta.id, &doc) {
                Err(e) => (loadbalancers::ERROR, e.to_string(), spec.observed.clone()),
                Ok(()) => match self.lbs.status(&record.meta.id) {
                    None => (
                        loadbalancers::ERROR,
                        "the proxy does not answer on its status endpoint".to_owned(),
                        None,
                    ),
                    Some(tree) => {
                        let served = |id: &str| {
                            tree["listeners"]
                                .as_array()
                                .is_some_and(|ls| ls.iter().any(|l| l["id"] == id))
                        };
                        match spec.config.listeners.iter().find(|l| !served(&l.id)) {
                            Some(l) => (
                                loadbalancers::ERROR,
                                format!("the proxy does not serve listener {} (port {}); it kept its previous configuration: see its log", l.id, l.protocol_port),
                                Some(tree),
                            ),
                            None => (loadbalancers::ACTIVE, String::new(), Some(tree)),
                        }
                    }
                },
            };
            self.report_lb(&record, spec, status, reason, observed)?;
        }
        Ok(())
    }

    /// Records what a load balancer's server (proxy or data plane) shows,
    /// when it changed.
    fn report_lb(
        &self,
        record: &Record,
        mut spec: LoadBalancerSpec,
        status: &str,
        reason: String,
        observed: Option<serde_json::Value>,
    ) -> Result<(), StepError> {
        if status == record.meta.status && reason == spec.status_reason && observed == spec.observed
        {
            return Ok(());
        }
        if status != record.meta.status {
            tracing::info!(lb = %record.meta.id, from = %record.meta.status, to = status, reason = %reason, "load balancer state changed");
        }
        spec.status_reason = reason;
        spec.observed = observed;
        self.observe(
            loadbalancers::KIND,
            &record.meta.id,
            status,
            Some(records::to_json(&spec)?),
        )
    }

    /// Brings the data plane to the NICs of every VM in the store.
    fn reconcile_network(&mut self) -> Result<(), StepError> {
        use keel_control::api::{
            address_groups, external_networks, floating_ips, mirror_sessions, port_sets,
            qos_policies,
        };
        let (
            (vm_records, ports, subnets, routers, groups, vpcs, externals, fips, qos, mirrors, lbs),
            (address_groups, port_sets),
        ) = self.block_on(async {
            let mut conn = self.store.pool().acquire().await?;
            let vms = records::all(&mut conn, vms::KIND).await?;
            let ports = records::all(&mut conn, "port").await?;
            let subnets = records::all(&mut conn, "subnet").await?;
            let routers = records::all(&mut conn, "router").await?;
            let groups = records::all(&mut conn, "security_group").await?;
            let vpcs = records::all(&mut conn, "vpc").await?;
            let externals = records::all(&mut conn, external_networks::KIND).await?;
            let fips = records::all(&mut conn, floating_ips::KIND).await?;
            let qos = records::all(&mut conn, qos_policies::KIND).await?;
            let mirrors = records::all(&mut conn, mirror_sessions::KIND).await?;
            let mut lbs = records::all(&mut conn, loadbalancers::KIND).await?;
            lbs.retain(loadbalancers::on_vpc);
            // Read with the groups, so a rule never names a newer one.
            let address_groups = records::all(&mut conn, address_groups::KIND).await?;
            let port_sets = records::all(&mut conn, port_sets::KIND).await?;
            Ok::<_, StepError>((
                (
                    vms, ports, subnets, routers, groups, vpcs, externals, fips, qos, mirrors, lbs,
                ),
                (address_groups, port_sets),
            ))
        })?;
        let mut with_nics = Vec::new();
        for vm in vm_records {
            let spec: VmSpec = vm.spec()?;
            // Another host's VM: its agent's data plane serves its NICs.
            let elsewhere = !spec.host_id.is_empty() && spec.host_id != self.host_id;
            if !spec.port_ids.is_empty() && vm.meta.status != vms::DELETING && !elsewhere {
                with_nics.push((vm, spec.port_ids));
            }
        }
        // Every network resource's status as it stands, to report changes.
        let mut reported: Vec<(&'static str, String, String)> = Vec::new();
        for (kind, list) in [
            ("port", &ports),
            ("subnet", &subnets),
            ("router", &routers),
            ("security_group", &groups),
            ("vpc", &vpcs),
            (external_networks::KIND, &externals),
            (mirror_sessions::KIND, &mirrors),
        ] {
            for r in list {
                reported.push((kind, r.meta.id.clone(), r.meta.status.clone()));
            }
        }
        let vpc_of: std::collections::BTreeMap<String, Option<String>> = subnets
            .iter()
            .map(|s| (s.meta.id.clone(), s.parent_id.clone()))
            .collect();
        let by_id = |v: Vec<Record>| -> std::collections::BTreeMap<String, Record> {
            v.into_iter().map(|r| (r.meta.id.clone(), r)).collect()
        };
        // Floating IPs: DOWN (not associated) is the API's to set.
        for f in &fips {
            if f.meta.status != floating_ips::DOWN {
                reported.push((floating_ips::KIND, f.meta.id.clone(), f.meta.status.clone()));
            }
        }
        let state = crate::network::desired_state(&crate::network::NetworkView {
            vms: &with_nics,
            ports: &by_id(ports),
            subnets: &by_id(subnets),
            routers: &routers,
            groups: &by_id(groups),
            address_groups: &by_id(address_groups),
            port_sets: &by_id(port_sets),
            external_networks: &by_id(externals),
            floating_ips: &fips,
            qos_policies: &by_id(qos),
            mirror_sessions: &mirrors,
            load_balancers: &lbs,
            uplinks: &self.config.uplinks,
        });
        self.net
            .ensure(&state)
            .map_err(|e| StepError::Invalid(format!("data plane: {e}")))?;
        // What the data plane now serves is ACTIVE; everything else waits
        // (PENDING) until a VM's NIC brings it onto a host.
        let mut realized: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        realized.extend(state.ports.iter().map(|p| p.name.clone()));
        realized.extend(state.routers.iter().map(|r| r.name.clone()));
        realized.extend(state.security_groups.iter().map(|g| g.name.clone()));
        realized.extend(state.mirrors.iter().map(|m| m.name.clone()));
        for f in &fips {
            if let Ok(spec) = f.spec::<floating_ips::FloatingIpSpec>() {
                let address = spec.floating_ip_address.to_string();
                if state.nat.iter().any(|n| n.external_ip == address) {
                    realized.insert(f.meta.id.clone());
                }
            }
        }
        // A VPC VIP's port is plugged where its router's data plane runs.
        for lb in &lbs {
            if let Ok(spec) = lb.spec::<LoadBalancerSpec>() {
                let here = |r: &keel_dataplane::model::RouterSpec| {
                    spec.router_id.as_ref() == Some(&r.name)
                };
                if let (true, Some(port)) = (state.routers.iter().any(here), spec.vip_port_id) {
                    realized.insert(port);
                }
            }
        }
        for switch in &state.switches {
            realized.insert(switch.name.clone());
            if let Some(Some(vpc)) = vpc_of.get(&switch.name) {
                realized.insert(vpc.clone());
            }
        }
        let changes: Vec<(&'static str, String, &'static str)> = reported
            .into_iter()
            .filter_map(|(kind, id, status)| {
                let want = if realized.contains(&id) {
                    ACTIVE
                } else {
                    records::PENDING
                };
                (status != want).then_some((kind, id, want))
            })
            .collect();
        if !changes.is_empty() {
            self.block_on(async {
                let mut tx = self.store.begin_write().await?;
                for (kind, id, status) in &changes {
                    records::observe(&mut tx, kind, id, status, None).await?;
                }
                tx.commit().await?;
                Ok::<_, StepError>(())
            })?;
        }
        self.report_vpc_lbs(&lbs, &state)
    }

    /// A VPC load balancer is ACTIVE once its router is in the data plane
    /// (each enabled listener with a member to send to is then forwarded);
    /// PENDING until a VM NIC of the router's subnets brings it to a host.
    fn report_vpc_lbs(
        &self,
        lbs: &[Record],
        state: &keel_dataplane::model::DesiredState,
    ) -> Result<(), StepError> {
        let stats = if state.load_balancers.is_empty() {
            Vec::new()
        } else {
            self.net.lb_stats()
        };
        for record in lbs {
            let spec: LoadBalancerSpec = record.spec()?;
            let router = spec.router_id.clone().unwrap_or_default();
            let here = state.routers.iter().any(|r| r.name == router);
            let (status, reason, observed) = if here {
                let forwarded = |id: &str| state.load_balancers.iter().any(|l| l.name == id);
                // Data-plane load balancers are named by listener id.
                let listeners: Vec<&str> = spec
                    .config
                    .listeners
                    .iter()
                    .map(|l| l.id.as_str())
                    .collect();
                let health = |ip: std::net::IpAddr, port: u16| {
                    stats
                        .iter()
                        .find(|s| {
                            listeners.contains(&s.load_balancer.as_str())
                                && std::net::IpAddr::V4(s.ip) == ip
                                && s.port == port
                        })
                        .map(|s| s.health)
                };
                (
                    loadbalancers::ACTIVE,
                    String::new(),
                    Some(crate::network::vpc_lb_status(
                        &spec.config,
                        forwarded,
                        health,
                    )),
                )
            } else {
                (
                    records::PENDING,
                    format!("waits for a VM NIC on a subnet of router {router} (its data plane balances the VIP)"),
                    None,
                )
            };
            self.report_lb(record, spec, status, reason, observed)?;
        }
        Ok(())
    }

    fn observe_all(&mut self) -> Result<(), StepError> {
        if let Err(e) = self.reconcile_network() {
            tracing::warn!(error = %e, "network not reconciled");
        }
        let all = self.block_on(async {
            let mut conn = self.store.pool().acquire().await?;
            Ok::<_, StepError>(records::all(&mut conn, vms::KIND).await?)
        })?;
        for record in all {
            if record.meta.status == vms::CREATING || record.meta.status == vms::DELETING {
                continue;
            }
            // Another host's VM: its agent observes it.
            let placed = record.spec.get("host_id").and_then(|h| h.as_str());
            if placed.is_some_and(|h| h != self.host_id) {
                continue;
            }
            self.observe_vm(&record, false)?;
        }
        Ok(())
    }
}

/// Refreshes the host's heartbeat until aborted.
async fn beat(store: Store, host_id: String) {
    let every = Duration::from_millis(hosts::HEARTBEAT_EVERY_MS.unsigned_abs());
    loop {
        let beaten = async {
            let mut conn = store.pool().acquire().await?;
            hosts::heartbeat(&mut conn, &host_id).await?;
            Ok::<_, StepError>(())
        };
        if let Err(e) = beaten.await {
            tracing::warn!(error = %e, "heartbeat not recorded");
        }
        tokio::time::sleep(every).await;
    }
}

/// Copies a UEFI NVRAM file with the VM it belongs to (snapshot, revert,
/// clone); nothing to do for a BIOS VM, which has none.
fn copy_nvram(from: &Path, to: &Path) -> Result<(), StepError> {
    if !from.exists() {
        return Ok(());
    }
    Ok(provision::copy_file(from, to)?)
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "VM directory not removed");
        }
    }
}
