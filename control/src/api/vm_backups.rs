//! VM backups: `POST /vms/{id}/backups` backs up every disk of a VM at one
//! cut (each disk's point is a `/backups` resource, incremental from the
//! disk's changed-block bitmap) together with what it takes to make the VM
//! again: its CPU, memory, firmware, NICs and UEFI variables. A VM backup
//! outlives its VM, and `POST /vm-backups/{id}/actions/restore` makes a new
//! VM from it (new ID and name, same configuration; each NIC may move to
//! another subnet or address, but NICs are neither added nor removed).

use std::net::IpAddr;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::backups::{self, BackupCreate, BackupSpec, NewBackup};
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::hosts;
use super::images::Firmware;
use super::listing::{ListQuery, Page};
use super::ports::{self, PortSpec};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record};
use super::respond::{begin_change, get_one, list_page, Resource};
use super::tasks::{self, Task};
use super::vms::{self, vm_for, VmSpec};
use super::volumes::{self, VolumeSpec};
use super::AppState;
use crate::store::DbConnection;

pub const KIND: &str = "vm_backup";
pub const CREATING: &str = "CREATING";
pub const AVAILABLE: &str = "AVAILABLE";
pub const ERROR: &str = "ERROR";
pub const DELETING: &str = "DELETING";

/// One disk of the VM at the backup, in the VM's disk order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmBackupDisk {
    pub volume_id: String,
    pub size_bytes: u64,
    /// The disk's point (`/backups/{id}`), taken at the VM's cut.
    pub backup_id: String,
}

/// One NIC of the VM at the backup, in order (eth0 first).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmBackupNic {
    pub subnet_id: String,
    #[schema(value_type = String)]
    pub fixed_ip: IpAddr,
    pub security_group_ids: Vec<String>,
    #[serde(default)]
    pub qos_policy_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmBackupSpec {
    /// The VM backed up (it may since have been deleted).
    pub vm_id: String,
    pub vm_name: String,
    /// Incremental was asked for (a disk's first backup is full).
    pub incremental: bool,
    pub description: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub firmware: Firmware,
    pub cpu_arch: String,
    pub disks: Vec<VmBackupDisk>,
    pub nics: Vec<VmBackupNic>,
    /// The host whose repository holds the points (restores run there).
    pub host_id: String,
    /// The repository point holding the VM's UEFI variables (boot entries,
    /// secure-boot keys); none for BIOS VMs.
    #[serde(default)]
    pub nvram_point: Option<String>,
    /// Bytes added to the repository by all disks (compressed, deduplicated).
    #[serde(default)]
    pub bytes_stored: u64,
    /// How long the running VM was paused for the cut, in milliseconds.
    #[serde(default)]
    pub paused_ms: Option<u64>,
    /// The backup policy that took it (its retention applies), if any.
    #[serde(default)]
    pub policy_id: Option<String>,
    #[serde(default)]
    pub status_reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmBackup {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: VmBackupSpec,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmBackupPage {
    pub items: Vec<VmBackup>,
    pub next_cursor: Option<String>,
}

impl Resource for VmBackup {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Compute;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        Ok(VmBackup {
            spec: record.spec()?,
            meta: record.meta,
        })
    }
}

/// What may change about a NIC in the restored VM.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicEdit {
    /// Another subnet of the VDC (default: the NIC's subnet at the backup).
    pub subnet_id: Option<String>,
    /// An address on the subnet (default: a free one from its pools; the
    /// backed-up VM may still hold its old address).
    #[schema(value_type = Option<String>)]
    pub fixed_ip: Option<IpAddr>,
    /// Default: the NIC's groups at the backup.
    pub security_group_ids: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmBackupRestore {
    /// Name of the new VM (not with `in_place`).
    pub name: Option<String>,
    /// Restore over the backed-up VM itself (STOPPED, with the same disks
    /// of the same sizes): its disks and UEFI variables go back to the
    /// backup; its configuration and NICs stay.
    #[serde(default)]
    pub in_place: bool,
    /// One entry per NIC of the backup, in order, when any changes.
    pub nics: Option<Vec<NicEdit>>,
    /// Start the VM once restored (default true).
    #[serde(default = "yes")]
    pub start: bool,
}

fn yes() -> bool {
    true
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_vm_backup))
        .routes(routes!(list_vm_backups))
        .routes(routes!(get_vm_backup, delete_vm_backup))
        .routes(routes!(restore_vm_backup))
}

#[utoipa::path(post, path = "/vms/{id}/backups", tag = "compute", request_body = BackupCreate,
    params(("id" = String, Path)),
    responses(
        (status = 202, description = "Queued: the task backs up every disk at one cut (a running VM is paused only for the cut) with the VM's configuration; `params.vm_backup_id` names the VM backup", body = Task),
        (status = 409, description = "Not allowed in the VM's status, a task runs on the VM or one of its disks, or the VM is protected by a protection group", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_vm_backup(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<BackupCreate>,
) -> Result<Response, ApiError> {
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    principal.require(Family::Compute, Action::Create)?;
    let mut tx = state.store.begin_write().await?;
    let vm = vm_for(
        &mut tx,
        &principal,
        &id,
        "back up",
        &[vms::RUNNING, vms::PAUSED, vms::STOPPED],
    )
    .await?;
    let task = start_vm_backup(
        &mut tx,
        &vm,
        NewBackup {
            name: &body.name,
            incremental: body.incremental,
            description: body.description,
            policy_id: None,
        },
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

/// Stores a CREATING VM backup of `vm` (and a CREATING `/backups` record
/// per disk) and queues the VM's task that takes them, for
/// `POST /vms/{id}/backups` and backup policies. Refuses (409) a VM not
/// RUNNING, PAUSED or STOPPED, one with a task on it or its disks, and one
/// in an active protection group.
pub async fn start_vm_backup(
    tx: &mut DbConnection,
    vm: &Record,
    new: NewBackup<'_>,
) -> Result<Task, ApiError> {
    let id = vm.meta.id.clone();
    if ![vms::RUNNING, vms::PAUSED, vms::STOPPED].contains(&vm.meta.status.as_str()) {
        return Err(ApiError::Conflict(format!(
            "cannot back up a VM that is {}; allowed when RUNNING, PAUSED or STOPPED",
            vm.meta.status
        )));
    }
    if let Some(task) = tasks::pending_for(tx, &id).await? {
        return Err(ApiError::Conflict(format!(
            "task {} ({}) is still {} on VM {id}",
            task.id, task.action, task.state
        )));
    }
    super::protection_groups::refuse_if_member(tx, &id, "back up", false).await?;
    let spec: VmSpec = vm.spec()?;
    volumes::require_raw(tx, &spec.volume_ids, "a VM backup").await?;
    let vdc_id = vm.meta.vdc_id.as_deref();
    let vm_backup_id = uuid::Uuid::new_v4().to_string();
    let mut disks = Vec::with_capacity(spec.volume_ids.len());
    for (i, volume_id) in spec.volume_ids.iter().enumerate() {
        let volume = records::get(tx, volumes::KIND, volume_id)
            .await?
            .ok_or_else(|| ApiError::Conflict(format!("volume {volume_id} is gone")))?;
        if volume.meta.status != volumes::IN_USE {
            return Err(ApiError::Conflict(format!(
                "disk {i} (volume {volume_id}) is {}; every disk must be IN_USE",
                volume.meta.status
            )));
        }
        if let Some(task) = tasks::pending_for(tx, volume_id).await? {
            return Err(ApiError::Conflict(format!(
                "task {} ({}) is still {} on volume {volume_id}",
                task.id, task.action, task.state
            )));
        }
        let vspec: VolumeSpec = volume.spec()?;
        let backup = records::insert(
            tx,
            NewRecord {
                kind: backups::KIND,
                vdc_id,
                parent_id: Some(volume_id),
                name: &format!("{}-disk{i}", new.name),
                spec: to_json(&BackupSpec {
                    volume_id: volume_id.clone(),
                    incremental: new.incremental,
                    description: format!("disk {i} of VM backup {vm_backup_id}"),
                    size_bytes: vspec.size_bytes,
                    vm_backup_id: Some(vm_backup_id.clone()),
                    ..BackupSpec::default()
                })?,
                status: backups::CREATING,
            },
        )
        .await?;
        disks.push(VmBackupDisk {
            volume_id: volume_id.clone(),
            size_bytes: vspec.size_bytes,
            backup_id: backup.meta.id,
        });
    }
    let mut nics = Vec::with_capacity(spec.port_ids.len());
    for port_id in &spec.port_ids {
        let port = records::get(tx, ports::KIND, port_id)
            .await?
            .ok_or_else(|| ApiError::Conflict(format!("port {port_id} is gone")))?;
        let pspec: PortSpec = port.spec()?;
        nics.push(VmBackupNic {
            subnet_id: pspec.subnet_id,
            fixed_ip: pspec.fixed_ip,
            security_group_ids: pspec.security_group_ids,
            qos_policy_id: pspec.qos_policy_id,
        });
    }
    // Not a child of the VM: it outlives it.
    records::insert_with_id(
        tx,
        &vm_backup_id,
        NewRecord {
            kind: KIND,
            vdc_id,
            parent_id: None,
            name: new.name,
            spec: to_json(&VmBackupSpec {
                vm_id: id.clone(),
                vm_name: vm.meta.name.clone(),
                incremental: new.incremental,
                description: new.description,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                firmware: spec.firmware,
                cpu_arch: spec.cpu_arch.clone(),
                disks,
                nics,
                host_id: spec.host_id.clone(),
                nvram_point: None,
                bytes_stored: 0,
                paused_ms: None,
                policy_id: new.policy_id,
                status_reason: String::new(),
            })?,
            status: CREATING,
        },
    )
    .await?;
    tasks::enqueue(
        tx,
        vdc_id,
        vms::KIND,
        &id,
        "backup",
        serde_json::json!({ "vm_backup_id": vm_backup_id }),
    )
    .await
}

/// Marks an AVAILABLE or ERROR VM backup DELETING and queues the task that
/// removes its points (for `DELETE /vm-backups/{id}` and policy retention).
pub async fn start_delete(tx: &mut DbConnection, record: &Record) -> Result<Task, ApiError> {
    backups::queue_delete(tx, record, KIND, "VM backup").await
}

#[utoipa::path(get, path = "/vm-backups", tag = "compute", params(ListQuery),
    responses((status = 200, description = "One page", body = VmBackupPage)), security(("bearer" = [])))]
async fn list_vm_backups(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<VmBackupPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<VmBackup>(&state, &principal, &query).await?;
    Ok(Json(VmBackupPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/vm-backups/{id}", tag = "compute", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The VM backup", body = VmBackup),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_vm_backup(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<VmBackup>(&state, &principal, &id).await
}

#[utoipa::path(delete, path = "/vm-backups/{id}", tag = "compute",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 202, description = "DELETING: the task removes every disk's point and the UEFI variables, then collects chunks no other point uses", body = Task),
        (status = 409, description = "Still being taken, or a task runs on it", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_vm_backup(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<VmBackup>(&state, &principal, Action::Delete, &id, &headers).await?;
    let task = start_delete(&mut tx, &record).await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

#[utoipa::path(post, path = "/vm-backups/{id}/actions/restore", tag = "compute", request_body = VmBackupRestore,
    params(("id" = String, Path)),
    responses(
        (status = 202, description = "Queued: a new VM (CREATING) with new volumes restored from the backup's points (verified), new NICs and the backed-up UEFI variables; the task runs on the new VM. With `in_place`, the task overwrites the backed-up VM's disks and UEFI variables (their next backups are full)", body = Task),
        (status = 409, description = "The backup is not AVAILABLE, no host fits, or a quota has no room; in place: the VM is gone, not STOPPED, busy, or its disks changed since", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field (NIC count, subnet, address, security group)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn restore_vm_backup(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<VmBackupRestore>,
) -> Result<Response, ApiError> {
    let name = backups::restore_name(body.name.as_deref(), body.in_place)?;
    principal.require(Family::Compute, Action::Create)?;
    let mut tx = state.store.begin_write().await?;
    let backup = backups::load_restorable(&mut tx, &principal, KIND, &id, "VM backup").await?;
    let spec: VmBackupSpec = backup.spec()?;
    let Some(name) = name else {
        if body.nics.is_some() {
            return Err(ApiError::invalid(
                "nics",
                "an in-place restore keeps the VM's NICs",
            ));
        }
        let task = start_restore_in_place(&mut tx, &principal, &id, &spec).await?;
        tx.commit().await?;
        state.changes.notify_waiters();
        return Ok(tasks::accepted(&task));
    };
    let edits = match body.nics {
        None => std::iter::repeat_with(NicEdit::default)
            .take(spec.nics.len())
            .collect(),
        Some(edits) if edits.len() == spec.nics.len() => edits,
        Some(edits) => {
            return Err(ApiError::invalid(
                "nics",
                format!(
                    "the backup has {} NIC(s) and {} were given: give one entry per NIC \
                     (NICs can be edited, not added or removed)",
                    spec.nics.len(),
                    edits.len()
                ),
            ))
        }
    };
    let vdc_id = backup.meta.vdc_id.clone();
    let vdc = match &vdc_id {
        Some(v) => records::get(&mut tx, "vdc", v).await?,
        None => None,
    };
    if let Some(vdc) = &vdc {
        vms::check_compute_quota(&mut tx, vdc, spec.vcpus, spec.memory_mib).await?;
    }
    // The points are in that host's repository.
    let host = hosts::place(
        &mut tx,
        &spec.cpu_arch,
        spec.memory_mib,
        Some(&spec.host_id),
    )
    .await?;
    let vm_id = uuid::Uuid::new_v4().to_string();
    let mut port_ids = Vec::with_capacity(edits.len());
    for (i, (nic, edit)) in spec.nics.iter().zip(edits).enumerate() {
        let subnet_id = edit.subnet_id.unwrap_or_else(|| nic.subnet_id.clone());
        let subnet = match records::get(&mut tx, "subnet", &subnet_id).await? {
            Some(s) if s.meta.vdc_id == vdc_id => s,
            _ => {
                return Err(ApiError::invalid(
                    format!("nics[{i}].subnet_id"),
                    format!("no subnet {subnet_id} in the backup's VDC"),
                ))
            }
        };
        let groups = edit
            .security_group_ids
            .unwrap_or_else(|| nic.security_group_ids.clone());
        ports::check_groups(
            &mut tx,
            vdc_id.as_deref(),
            &format!("nics[{i}].security_group_ids"),
            &groups,
        )
        .await?;
        // A policy deleted since the backup is not brought back.
        let qos_policy_id = match &nic.qos_policy_id {
            Some(q) => records::get(&mut tx, "qos_policy", q)
                .await?
                .map(|r| r.meta.id),
            None => None,
        };
        let port = ports::insert_port(
            &mut tx,
            &subnet,
            ports::NewPort {
                name: &format!("{}-nic{i}", name),
                fixed_ip: edit.fixed_ip,
                security_group_ids: groups,
                description: format!("NIC {i} of {}, restored from VM backup {id}", name),
                device_id: Some(vm_id.clone()),
                delete_with_device: true,
                qos_policy_id,
            },
        )
        .await
        .map_err(|e| match e {
            ApiError::InvalidField { field, message } => ApiError::InvalidField {
                field: format!("nics[{i}].{field}"),
                message,
            },
            other => other,
        })?;
        port_ids.push(port.meta.id);
    }
    let mut volume_ids = Vec::with_capacity(spec.disks.len());
    let mut restores = Vec::with_capacity(spec.disks.len());
    for (i, disk) in spec.disks.iter().enumerate() {
        if let Some(vdc) = &vdc {
            volumes::check_volume_quota(&mut tx, vdc, disk.size_bytes).await?;
        }
        let volume = records::insert(
            &mut tx,
            NewRecord {
                kind: volumes::KIND,
                vdc_id: vdc_id.as_deref(),
                parent_id: None,
                name: &format!("{}-disk{i}", name),
                spec: to_json(&VolumeSpec {
                    size_bytes: disk.size_bytes,
                    image_id: None,
                    provisioning: "thin".into(),
                    format: volumes::RAW.into(),
                    cluster_size: None,
                    attached_to: Some(vm_id.clone()),
                    description: format!("disk {i} restored from VM backup {id}"),
                    status_reason: String::new(),
                    host_id: Some(host.meta.id.clone()),
                    purge_at: None,
                })?,
                status: volumes::CREATING,
            },
        )
        .await?;
        restores
            .push(serde_json::json!({ "volume_id": volume.meta.id, "backup_id": disk.backup_id }));
        volume_ids.push(volume.meta.id);
    }
    records::insert_with_id(
        &mut tx,
        &vm_id,
        NewRecord {
            kind: vms::KIND,
            vdc_id: vdc_id.as_deref(),
            parent_id: None,
            name,
            spec: to_json(&VmSpec {
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                firmware: spec.firmware,
                cpu_arch: spec.cpu_arch.clone(),
                volume_ids,
                port_ids,
                host_id: host.meta.id.clone(),
                vnc_port: None,
                description: format!("restored from VM backup {id} of {}", spec.vm_name),
                status_reason: String::new(),
            })?,
            status: vms::CREATING,
        },
    )
    .await?;
    let task = tasks::enqueue(
        &mut tx,
        vdc_id.as_deref(),
        vms::KIND,
        &vm_id,
        "create",
        serde_json::json!({
            "start": body.start,
            "restore": { "vm_backup_id": id, "disks": restores, "nvram_point": spec.nvram_point },
        }),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

/// Queues the restore of VM backup `id` over its own VM: still there,
/// STOPPED, no task, the same disks in the same order and sizes.
async fn start_restore_in_place(
    tx: &mut DbConnection,
    principal: &Principal,
    id: &str,
    spec: &VmBackupSpec,
) -> Result<Task, ApiError> {
    if records::get(tx, vms::KIND, &spec.vm_id).await?.is_none() {
        return Err(ApiError::Conflict(format!(
            "VM {} was deleted; restore into a new VM (give a name)",
            spec.vm_id
        )));
    }
    let vm = vm_for(
        tx,
        principal,
        &spec.vm_id,
        "restore a backup over",
        &[vms::STOPPED],
    )
    .await?;
    let vm_spec: VmSpec = vm.spec()?;
    let backed_up: Vec<&str> = spec.disks.iter().map(|d| d.volume_id.as_str()).collect();
    if vm_spec.volume_ids != backed_up {
        return Err(ApiError::Conflict(format!(
            "VM {}'s disks changed since the backup; restore into a new VM (give a name)",
            spec.vm_id
        )));
    }
    for disk in &spec.disks {
        let backup = records::get(tx, backups::KIND, &disk.backup_id)
            .await?
            .ok_or_else(|| ApiError::Conflict(format!("disk backup {} is gone", disk.backup_id)))?;
        backups::load_restore_target(tx, principal, &backup.spec()?).await?;
    }
    tasks::enqueue(
        tx,
        vm.meta.vdc_id.as_deref(),
        vms::KIND,
        &spec.vm_id,
        "restore-backup",
        serde_json::json!({ "vm_backup_id": id }),
    )
    .await
}
