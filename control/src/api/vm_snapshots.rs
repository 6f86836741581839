//! VM snapshots, revert and clones. A snapshot copies every disk of the
//! VM at one instant (the agent pauses a running VM for the cut, so the
//! disks agree with each other: crash-consistent); revert copies them back
//! into a stopped VM; a clone is new volumes copied from the VM's disks and
//! new VMs with the same spec (the seed's design: a temporary cut, then new
//! VMs), several at once if asked. All three are tasks of the source VM.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::{check_name, ValidJson};
use super::hosts;
use super::ports::{self, PortSpec};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record};
use super::respond::load;
use super::tasks::{self, Task};
use super::vms::{self, vm_for, VmSpec};
use super::volumes::{self, VolumeSpec};
use super::AppState;

pub const KIND: &str = "vm_snapshot";
pub const CREATING: &str = "CREATING";
pub const AVAILABLE: &str = "AVAILABLE";
const MAX_CLONES: u32 = 16;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotSpec {
    pub vm_id: String,
    /// The VM's volumes at the cut, in its disk order.
    pub volume_ids: Vec<String>,
    pub description: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Snapshot {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: SnapshotSpec,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// Name of the clone; with `count` > 1, suffixed `-1`, `-2`, ...
    pub name: String,
    /// How many clones (1..=16, default 1).
    #[serde(default = "one")]
    pub count: u32,
    /// Start the clones once made (default true).
    #[serde(default = "yes")]
    pub start: bool,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotList {
    pub items: Vec<Snapshot>,
}

fn to_snapshot(record: Record) -> Result<Snapshot, ApiError> {
    Ok(Snapshot {
        spec: record.spec()?,
        meta: record.meta,
    })
}

/// Where a snapshot keeps its copies: one per volume, and the VM's UEFI
/// NVRAM (boot entries, secure-boot keys) when it has one.
pub fn snapshot_dir(state_dir: &std::path::Path, snapshot: &str) -> std::path::PathBuf {
    state_dir.join("snapshots").join(snapshot)
}

/// Where a snapshot keeps the copy of one volume.
pub fn snapshot_file(
    state_dir: &std::path::Path,
    snapshot: &str,
    volume: &str,
) -> std::path::PathBuf {
    snapshot_dir(state_dir, snapshot).join(format!("{volume}.raw"))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_snapshot, list_snapshots))
        .routes(routes!(delete_snapshot))
        .routes(routes!(revert_snapshot))
        .routes(routes!(clone_vm))
}

#[utoipa::path(post, path = "/vms/{id}/snapshots", tag = "compute", request_body = SnapshotCreate,
    params(("id" = String, Path)),
    responses(
        (status = 202, description = "Queued: the task copies every disk at one instant (a running VM is paused for the cut)", body = Task),
        (status = 409, description = "Not allowed in the VM's status, or a task is running on it", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_snapshot(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<SnapshotCreate>,
) -> Result<Response, ApiError> {
    check_name("name", &body.name)?;
    let mut tx = state.store.begin_write().await?;
    let vm = vm_for(
        &mut tx,
        &principal,
        &id,
        "snapshot",
        &[vms::RUNNING, vms::PAUSED, vms::STOPPED],
    )
    .await?;
    let vm_spec: VmSpec = vm.spec()?;
    volumes::require_raw(&mut tx, &vm_spec.volume_ids, "a VM snapshot").await?;
    let snap = records::insert(
        &mut tx,
        NewRecord {
            kind: KIND,
            vdc_id: vm.meta.vdc_id.as_deref(),
            parent_id: Some(&id),
            name: &body.name,
            spec: to_json(&SnapshotSpec {
                vm_id: id.clone(),
                volume_ids: vm_spec.volume_ids,
                description: body.description,
            })?,
            status: CREATING,
        },
    )
    .await?;
    let task = tasks::enqueue(
        &mut tx,
        vm.meta.vdc_id.as_deref(),
        vms::KIND,
        &id,
        "snapshot",
        serde_json::json!({ "snapshot_id": snap.meta.id }),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

#[utoipa::path(get, path = "/vms/{id}/snapshots", tag = "compute", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The VM's snapshots", body = SnapshotList),
        (status = 404, description = "No such VM", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn list_snapshots(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<SnapshotList>, ApiError> {
    let mut conn = state.store.pool().acquire().await?;
    load(
        &mut conn,
        &principal,
        Family::Compute,
        Action::Read,
        vms::KIND,
        &id,
    )
    .await?;
    let items = records::children(&mut conn, KIND, &id).await?;
    Ok(Json(SnapshotList {
        items: items
            .into_iter()
            .map(to_snapshot)
            .collect::<Result<_, _>>()?,
    }))
}

#[utoipa::path(delete, path = "/vms/{id}/snapshots/{snapshot_id}", tag = "compute",
    params(("id" = String, Path), ("snapshot_id" = String, Path)),
    responses(
        (status = 204, description = "Deleted with its copies"),
        (status = 409, description = "Still being made", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_snapshot(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, snapshot_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.store.begin_write().await?;
    load(
        &mut tx,
        &principal,
        Family::Compute,
        Action::Update,
        vms::KIND,
        &id,
    )
    .await?;
    let snap = match records::get(&mut tx, KIND, &snapshot_id).await? {
        Some(s) if s.parent_id.as_deref() == Some(id.as_str()) => s,
        _ => return Err(ApiError::NotFound),
    };
    if snap.meta.status == CREATING {
        return Err(ApiError::Conflict(
            "the snapshot is still being made".into(),
        ));
    }
    records::delete(&mut tx, &snap, KIND).await?;
    tx.commit().await?;
    let dir = state
        .state_dir
        .as_path()
        .join("snapshots")
        .join(&snapshot_id);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "snapshot files not removed");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/vms/{id}/snapshots/{snapshot_id}/revert", tag = "compute",
    params(("id" = String, Path), ("snapshot_id" = String, Path)),
    responses(
        (status = 202, description = "Queued: the task copies the snapshot back over the VM's disks", body = Task),
        (status = 409, description = "The VM is not STOPPED, or the snapshot is not AVAILABLE", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn revert_snapshot(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, snapshot_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let mut tx = state.store.begin_write().await?;
    let vm = vm_for(&mut tx, &principal, &id, "revert", &[vms::STOPPED]).await?;
    match records::get(&mut tx, KIND, &snapshot_id).await? {
        Some(s) if s.parent_id.as_deref() == Some(id.as_str()) => {
            if s.meta.status != AVAILABLE {
                return Err(ApiError::Conflict(format!(
                    "the snapshot is {}, not AVAILABLE",
                    s.meta.status
                )));
            }
        }
        _ => return Err(ApiError::NotFound),
    }
    let task = tasks::enqueue(
        &mut tx,
        vm.meta.vdc_id.as_deref(),
        vms::KIND,
        &id,
        "revert",
        serde_json::json!({ "snapshot_id": snapshot_id }),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

#[utoipa::path(post, path = "/vms/{id}/clone", tag = "compute", request_body = CloneRequest,
    params(("id" = String, Path)),
    responses(
        (status = 202, description = "Queued: the task copies the disks (pausing a running source for the cut) and creates the clones, each with its own NICs (new ports on the source's subnets, same security groups, new address and MAC); `params.vm_ids` names them", body = Task),
        (status = 409, description = "Not allowed in the VM's status, a task is running on it, or no host fits", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn clone_vm(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<CloneRequest>,
) -> Result<Response, ApiError> {
    principal.require(Family::Compute, Action::Create)?;
    check_name("name", &body.name)?;
    if !(1..=MAX_CLONES).contains(&body.count) {
        return Err(ApiError::invalid(
            "count",
            format!("must be 1..={MAX_CLONES}"),
        ));
    }
    let mut tx = state.store.begin_write().await?;
    let vm = vm_for(
        &mut tx,
        &principal,
        &id,
        "clone",
        &[vms::RUNNING, vms::PAUSED, vms::STOPPED],
    )
    .await?;
    let spec: VmSpec = vm.spec()?;
    volumes::require_raw(&mut tx, &spec.volume_ids, "a VM clone").await?;
    // The clone's disks are copied from the source's, on the source's host.
    let host = hosts::place(
        &mut tx,
        &spec.cpu_arch,
        spec.memory_mib,
        Some(&spec.host_id),
    )
    .await?;
    let vdc = match &vm.meta.vdc_id {
        Some(v) => records::get(&mut tx, "vdc", v).await?,
        None => None,
    };
    let mut vm_ids = Vec::new();
    let mut copies = Vec::new();
    for n in 1..=body.count {
        let name = if body.count == 1 {
            body.name.clone()
        } else {
            format!("{}-{n}", body.name)
        };
        let clone_id = uuid::Uuid::new_v4().to_string();
        if let Some(vdc) = &vdc {
            vms::check_compute_quota(&mut tx, vdc, spec.vcpus, spec.memory_mib).await?;
        }
        // Each clone gets its own NICs: new ports on the source's subnets,
        // same security groups, a new address and MAC.
        let mut port_ids = Vec::new();
        for (i, source) in spec.port_ids.iter().enumerate() {
            let src = records::get(&mut tx, "port", source)
                .await?
                .ok_or_else(|| ApiError::Conflict(format!("port {source} is gone")))?;
            let pspec: PortSpec = src.spec()?;
            let subnet = records::get(&mut tx, "subnet", &pspec.subnet_id)
                .await?
                .ok_or_else(|| ApiError::Conflict(format!("subnet {} is gone", pspec.subnet_id)))?;
            let port = ports::insert_port(
                &mut tx,
                &subnet,
                ports::NewPort {
                    name: &format!("{name}-nic{i}"),
                    fixed_ip: None,
                    security_group_ids: pspec.security_group_ids,
                    description: format!("NIC {i} of {name}, a clone of {}", vm.meta.name),
                    device_id: Some(clone_id.clone()),
                    delete_with_device: true,
                    qos_policy_id: pspec.qos_policy_id,
                },
            )
            .await?;
            port_ids.push(port.meta.id);
        }
        let mut volume_ids = Vec::new();
        for (i, source) in spec.volume_ids.iter().enumerate() {
            let src = records::get(&mut tx, volumes::KIND, source)
                .await?
                .ok_or_else(|| ApiError::Conflict(format!("volume {source} is gone")))?;
            let mut vspec: VolumeSpec = src.spec()?;
            vspec.attached_to = None;
            vspec.status_reason = String::new();
            if let Some(vdc) = &vdc {
                volumes::check_volume_quota(&mut tx, vdc, vspec.size_bytes).await?;
            }
            let vol = records::insert(
                &mut tx,
                NewRecord {
                    kind: volumes::KIND,
                    vdc_id: vm.meta.vdc_id.as_deref(),
                    parent_id: None,
                    name: &format!("{name}-disk{i}"),
                    spec: to_json(&vspec)?,
                    status: volumes::CREATING,
                },
            )
            .await?;
            copies.push(serde_json::json!({ "from": source, "to": vol.meta.id }));
            volume_ids.push(vol.meta.id);
        }
        let clone = records::insert_with_id(
            &mut tx,
            &clone_id,
            NewRecord {
                kind: vms::KIND,
                vdc_id: vm.meta.vdc_id.as_deref(),
                parent_id: None,
                name: &name,
                spec: to_json(&VmSpec {
                    volume_ids: volume_ids.clone(),
                    port_ids,
                    host_id: host.meta.id.clone(),
                    vnc_port: None,
                    status_reason: String::new(),
                    description: format!("clone of {}", vm.meta.name),
                    ..spec.clone()
                })?,
                status: vms::CREATING,
            },
        )
        .await?;
        for vol in &volume_ids {
            let v = records::get(&mut tx, volumes::KIND, vol)
                .await?
                .ok_or(ApiError::NotFound)?;
            let mut vspec: VolumeSpec = v.spec()?;
            vspec.attached_to = Some(clone.meta.id.clone());
            records::observe(
                &mut tx,
                volumes::KIND,
                vol,
                volumes::CREATING,
                Some(to_json(&vspec)?),
            )
            .await?;
        }
        vm_ids.push(clone.meta.id);
    }
    let task = tasks::enqueue(
        &mut tx,
        vm.meta.vdc_id.as_deref(),
        vms::KIND,
        &id,
        "clone",
        serde_json::json!({ "vm_ids": vm_ids, "copies": copies, "start": body.start }),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}
