//! `/vms`: virtual machines. The API validates and records; every change
//! of a VM's running state is a task the host agent carries out against the
//! hypervisor, and the VM's `status` is what the agent last observed
//! (`CREATING`, `STOPPED`, `RUNNING`, `PAUSED`, `ERROR`, `DELETING`), so a
//! VM killed outside keel shows as `STOPPED`, never as `RUNNING`.

use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::hosts;
use super::images::{Firmware, ImageSpec};
use super::listing::{ListQuery, Page};
use super::ports::PortSpec;
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record};
use super::respond::{get_one, list_page, load, referenced_vdc, target_vdc, Resource};
use super::tasks::{self, Task};
use super::volumes::{self, VolumeSpec};
use super::AppState;

pub const KIND: &str = "vm";
pub const CREATING: &str = "CREATING";
pub const STOPPED: &str = "STOPPED";
pub const RUNNING: &str = "RUNNING";
pub const PAUSED: &str = "PAUSED";
pub const ERROR: &str = "ERROR";
pub const DELETING: &str = "DELETING";
/// The hypervisor no longer knows the VM (its domain was removed outside keel).
pub const LOST: &str = "LOST";

const MAX_VCPUS: u32 = 64;
const MAX_MEMORY_MIB: u32 = 1 << 20;
pub const MAX_DISKS: usize = 16;
const MAX_NICS: usize = 8;

/// Every action and the states it is allowed in.
pub const ACTIONS: &[(&str, &[&str])] = &[
    ("start", &[STOPPED]),
    ("stop", &[RUNNING, PAUSED]),
    ("force-stop", &[RUNNING, PAUSED, ERROR]),
    ("reboot", &[RUNNING]),
    ("force-reboot", &[RUNNING]),
    ("pause", &[RUNNING]),
    ("resume", &[PAUSED]),
];

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub firmware: Firmware,
    pub cpu_arch: String,
    /// Disks in boot order; the first is the boot disk.
    pub volume_ids: Vec<String>,
    /// NICs: ports on VPC subnets, in order (eth0 first).
    #[serde(default)]
    pub port_ids: Vec<String>,
    /// The host the VM was placed on.
    #[serde(default)]
    pub host_id: String,
    /// Loopback VNC port of the running VM, as the host agent observed it.
    #[serde(default)]
    pub vnc_port: Option<u16>,
    pub description: String,
    /// What the agent last saw go wrong (hypervisor message), or why the
    /// VM stopped when keel did not stop it.
    #[serde(default)]
    pub status_reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Vm {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: VmSpec,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    pub name: String,
    pub vdc_id: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Existing AVAILABLE (or still CREATING) volumes, boot disk first.
    pub volume_ids: Vec<String>,
    /// Defaults to the boot volume's image firmware, else BIOS.
    pub firmware: Option<Firmware>,
    /// NICs: existing ports of the VM's VDC not used by another VM.
    #[serde(default)]
    pub port_ids: Vec<String>,
    /// Start once defined (default true).
    #[serde(default = "default_true")]
    pub start: bool,
    #[serde(default)]
    pub description: String,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmPage {
    pub items: Vec<Vm>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Delete the VM's volumes too (default: keep them, detached).
    pub delete_volumes: Option<bool>,
}

impl Resource for Vm {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Compute;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        Ok(Vm {
            spec: record.spec()?,
            meta: record.meta,
        })
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_vm, list_vms))
        .routes(routes!(get_vm, delete_vm))
        .routes(routes!(vm_action))
}

#[utoipa::path(post, path = "/vms", tag = "compute", request_body = VmCreate,
    responses(
        (status = 202, description = "CREATING; the task (Location) defines and starts it", body = Task),
        (status = 409, description = "A volume is attached to another VM, or no enabled host fits (architecture, memory)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field (sizes, unknown volume, architecture)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_vm(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<VmCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Compute, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    if !(1..=MAX_VCPUS).contains(&body.vcpus) {
        return Err(ApiError::invalid(
            "vcpus",
            format!("must be 1..={MAX_VCPUS}"),
        ));
    }
    if !(64..=MAX_MEMORY_MIB).contains(&body.memory_mib) {
        return Err(ApiError::invalid(
            "memory_mib",
            format!("must be 64..={MAX_MEMORY_MIB}"),
        ));
    }
    if body.volume_ids.is_empty() || body.volume_ids.len() > MAX_DISKS {
        return Err(ApiError::invalid(
            "volume_ids",
            format!("give 1..={MAX_DISKS} volumes, boot disk first"),
        ));
    }
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let mut tx = state.store.begin_write().await?;
    let vdc = referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    check_compute_quota(&mut tx, &vdc, body.vcpus, body.memory_mib).await?;
    let mut volumes = Vec::with_capacity(body.volume_ids.len());
    for (i, id) in body.volume_ids.iter().enumerate() {
        if body.volume_ids[..i].contains(id) {
            return Err(ApiError::invalid(
                format!("volume_ids[{i}]"),
                "listed twice",
            ));
        }
        let volume = match records::get(&mut tx, volumes::KIND, id).await? {
            Some(v) if v.meta.vdc_id.as_deref() == Some(vdc_id.as_str()) => v,
            _ => {
                return Err(ApiError::invalid(
                    format!("volume_ids[{i}]"),
                    format!("no volume {id} in the VM's VDC"),
                ))
            }
        };
        let spec: VolumeSpec = volume.spec()?;
        if let Some(other) = &spec.attached_to {
            return Err(ApiError::Conflict(format!(
                "volume {id} is attached to VM {other}"
            )));
        }
        if volume.meta.status == volumes::DELETED {
            return Err(ApiError::invalid(
                format!("volume_ids[{i}]"),
                format!("volume {id} is in the recycle bin; restore it first"),
            ));
        }
        if volume.meta.status == volumes::ERROR {
            return Err(ApiError::invalid(
                format!("volume_ids[{i}]"),
                format!("volume {id} is in ERROR: {}", spec.status_reason),
            ));
        }
        volumes.push((volume, spec));
    }
    if body.port_ids.len() > MAX_NICS {
        return Err(ApiError::invalid("port_ids", format!("at most {MAX_NICS}")));
    }
    let mut nics = Vec::with_capacity(body.port_ids.len());
    for (i, id) in body.port_ids.iter().enumerate() {
        if body.port_ids[..i].contains(id) {
            return Err(ApiError::invalid(format!("port_ids[{i}]"), "listed twice"));
        }
        let port = match records::get(&mut tx, "port", id).await? {
            Some(p) if p.meta.vdc_id.as_deref() == Some(vdc_id.as_str()) => p,
            _ => {
                return Err(ApiError::invalid(
                    format!("port_ids[{i}]"),
                    format!("no port {id} in the VM's VDC"),
                ))
            }
        };
        let pspec: PortSpec = port.spec()?;
        if let Some(other) = &pspec.device_id {
            return Err(ApiError::Conflict(format!(
                "port {id} belongs to {other} (a VM's NIC or a load balancer's VIP)"
            )));
        }
        nics.push((port, pspec));
    }
    // The boot volume's image decides firmware and architecture.
    let mut firmware = Firmware::Bios;
    let mut cpu_arch = "x86_64".to_owned();
    if let Some(image_id) = volumes.first().and_then(|(_, s)| s.image_id.clone()) {
        if let Some(image) = records::get(&mut tx, "image", &image_id).await? {
            let spec: ImageSpec = image.spec()?;
            firmware = spec.firmware;
            cpu_arch = spec.cpu_arch;
        }
    }
    // Local disks: the VM runs where its volumes' files are.
    let mut homes: Vec<&str> = volumes
        .iter()
        .filter_map(|(_, s)| s.host_id.as_deref())
        .collect();
    homes.sort_unstable();
    homes.dedup();
    if homes.len() > 1 {
        return Err(ApiError::Conflict(format!(
            "the volumes live on different hosts ({}); copy them to one first",
            homes.join(", ")
        )));
    }
    let host = hosts::place(&mut tx, &cpu_arch, body.memory_mib, homes.first().copied()).await?;
    let spec = VmSpec {
        vcpus: body.vcpus,
        memory_mib: body.memory_mib,
        firmware: body.firmware.unwrap_or(firmware),
        cpu_arch,
        volume_ids: body.volume_ids.clone(),
        port_ids: body.port_ids.clone(),
        host_id: host.meta.id.clone(),
        vnc_port: None,
        description: body.description,
        status_reason: String::new(),
    };
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: KIND,
            vdc_id: Some(&vdc_id),
            parent_id: None,
            name: &body.name,
            spec: to_json(&spec)?,
            status: CREATING,
        },
    )
    .await?;
    for (volume, mut vspec) in volumes {
        vspec.attached_to = Some(record.meta.id.clone());
        let status = if volume.meta.status == volumes::AVAILABLE {
            volumes::IN_USE
        } else {
            volume.meta.status.as_str()
        };
        records::observe(
            &mut tx,
            volumes::KIND,
            &volume.meta.id,
            status,
            Some(to_json(&vspec)?),
        )
        .await?;
    }
    for (port, mut pspec) in nics {
        pspec.device_id = Some(record.meta.id.clone());
        let status = port.meta.status.clone();
        records::observe(
            &mut tx,
            "port",
            &port.meta.id,
            &status,
            Some(to_json(&pspec)?),
        )
        .await?;
    }
    let task = tasks::enqueue(
        &mut tx,
        Some(&vdc_id),
        KIND,
        &record.meta.id,
        "create",
        serde_json::json!({ "start": body.start }),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

#[utoipa::path(get, path = "/vms", tag = "compute", params(ListQuery),
    responses((status = 200, description = "One page", body = VmPage)), security(("bearer" = [])))]
async fn list_vms(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<VmPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<Vm>(&state, &principal, &query).await?;
    Ok(Json(VmPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/vms/{id}", tag = "compute", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The VM with its observed status", body = Vm),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_vm(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<Vm>(&state, &principal, &id).await
}

/// The VDC's vCPU and memory quotas leave room for one more VM of this
/// size (every VM counts, running or not: it holds its reservation).
pub(super) async fn check_compute_quota(
    conn: &mut crate::store::DbConnection,
    vdc: &Record,
    vcpus: u32,
    memory_mib: u32,
) -> Result<(), ApiError> {
    let quota = super::vdcs::quota_of(vdc)?;
    if quota.vcpus.is_none() && quota.memory_mib.is_none() {
        return Ok(());
    }
    let (mut cpus, mut mem) = (u64::from(vcpus), u64::from(memory_mib));
    for vm in records::in_vdc(conn, KIND, &vdc.meta.id).await? {
        let spec: VmSpec = vm.spec()?;
        cpus += u64::from(spec.vcpus);
        mem += u64::from(spec.memory_mib);
    }
    for (resource, used, limit) in [
        ("vcpus", cpus, quota.vcpus),
        ("memory_mib", mem, quota.memory_mib),
    ] {
        if let Some(limit) = limit {
            if used > limit {
                return Err(ApiError::QuotaExceeded { resource, limit });
            }
        }
    }
    Ok(())
}

/// Loads the VM for a state-changing request: visible, no task running on
/// it, and in one of `allowed`.
pub(super) async fn vm_for(
    tx: &mut crate::store::DbConnection,
    principal: &Principal,
    id: &str,
    what: &str,
    allowed: &[&str],
) -> Result<Record, ApiError> {
    super::respond::load_for_action::<Vm>(tx, principal, "VM", id, what, allowed).await
}

#[utoipa::path(post, path = "/vms/{id}/actions/{action}", tag = "compute",
    params(("id" = String, Path), ("action" = String, Path, description = "start, stop (ACPI, then forced after a timeout), force-stop, reboot, force-reboot, pause, resume")),
    responses(
        (status = 202, description = "Queued; the task (Location) reports the outcome", body = Task),
        (status = 404, description = "No such VM or action", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not allowed in the VM's current status (the message lists the allowed ones), or another task is still running on it", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn vm_action(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let Some((_, allowed)) = ACTIONS.iter().find(|(name, _)| *name == action) else {
        return Err(ApiError::NotFound);
    };
    let mut tx = state.store.begin_write().await?;
    let record = vm_for(&mut tx, &principal, &id, &action, allowed).await?;
    if action == "start" {
        if let Some(group) = super::replica_groups::adopting(&mut tx, &id).await? {
            return Err(ApiError::Conflict(format!(
                "replica group {group} receives into this VM's volumes: fail it over to start the VM"
            )));
        }
    }
    let task = tasks::enqueue(
        &mut tx,
        record.meta.vdc_id.as_deref(),
        KIND,
        &id,
        &action,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

#[utoipa::path(delete, path = "/vms/{id}", tag = "compute",
    params(("id" = String, Path), DeleteQuery),
    responses(
        (status = 202, description = "DELETING; the task stops the VM and removes it (and its volumes if asked)", body = Task),
        (status = 409, description = "Another task is still running on it, or the VM is a member of a protection group", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_vm(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidQuery(query): ValidQuery<DeleteQuery>,
) -> Result<Response, ApiError> {
    let mut tx = state.store.begin_write().await?;
    let record = load(
        &mut tx,
        &principal,
        Family::Compute,
        Action::Delete,
        KIND,
        &id,
    )
    .await?;
    if let Some(task) = tasks::pending_for(&mut tx, &id).await? {
        return Err(ApiError::Conflict(format!(
            "task {} ({}) is still {} on this VM",
            task.id, task.action, task.state
        )));
    }
    super::protection_groups::refuse_if_member(&mut tx, &id, "delete", true).await?;
    records::observe(&mut tx, KIND, &id, DELETING, None).await?;
    let task = tasks::enqueue(
        &mut tx,
        record.meta.vdc_id.as_deref(),
        KIND,
        &id,
        "delete",
        serde_json::json!({ "delete_volumes": query.delete_volumes.unwrap_or(false) }),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}
