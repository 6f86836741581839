//! `/volumes`: VM disks. A volume is a raw file on the host (thin: sparse;
//! thick: allocated up front), blank or a copy of an image; the host agent
//! provisions it (a task, since copying an image takes time) and serves it
//! to its VM through keel's vhost-user-blk backend. A volume belongs to at
//! most one VM at a time.
//!
//! A VDC with a recycle bin (`recycle_bin_hours` > 0) keeps deleted volumes
//! `DELETED`, with their data, until `purge_at`: `restore` brings one back,
//! a second delete (or `?purge=true`) purges it at once, and the host agent
//! purges the expired ones. Volumes in the bin count against no quota and
//! cannot be attached, copied, resized or backed up.

use std::path::{Path as FsPath, PathBuf};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::images::{self, ImageSpec};
use super::listing::{ListQuery, Page};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record};
use super::respond::{
    begin_change, get_one, list_page, load, referenced_vdc, target_vdc, Resource,
};
use super::tasks::{self, Task};
use super::AppState;

pub const KIND: &str = "volume";
pub const CREATING: &str = "CREATING";
pub const AVAILABLE: &str = "AVAILABLE";
pub const IN_USE: &str = "IN_USE";
pub const ERROR: &str = "ERROR";
/// In the recycle bin.
pub const DELETED: &str = "DELETED";
const MAX_VOLUME_BYTES: u64 = 16 << 40;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeSpec {
    /// Virtual size; for a volume from an image, set by the agent to at
    /// least the image's virtual size.
    pub size_bytes: u64,
    pub image_id: Option<String>,
    /// `thin` (sparse file) or `thick` (allocated at creation).
    pub provisioning: String,
    /// `raw` (the file is the disk) or `qcow2` (clusters allocated as
    /// written; served by keel's qcow2 engine).
    #[serde(default = "raw_format")]
    pub format: String,
    /// qcow2 cluster size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// The VM using it.
    pub attached_to: Option<String>,
    pub description: String,
    /// Why the volume is in ERROR.
    #[serde(default)]
    pub status_reason: String,
    /// The host whose agent made the file (its tasks run there, and VMs
    /// using it are placed there); none until it is made.
    #[serde(default)]
    pub host_id: Option<String>,
    /// Unix ms when a volume in the recycle bin is purged.
    #[serde(default)]
    pub purge_at: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Volume {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: VolumeSpec,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    pub name: String,
    pub vdc_id: Option<String>,
    /// Required for a blank volume; for one from an image, grows the copy.
    pub size_gib: Option<u64>,
    pub image_id: Option<String>,
    #[serde(default = "default_provisioning")]
    pub provisioning: String,
    /// `raw` (default) or `qcow2`.
    #[serde(default = "raw_format")]
    pub format: String,
    /// qcow2 only: cluster size in KiB, a power of two from 64 (default)
    /// to 2048.
    pub cluster_size_kib: Option<u64>,
    #[serde(default)]
    pub description: String,
}

fn default_provisioning() -> String {
    "thin".into()
}

/// Volume file formats.
pub const RAW: &str = "raw";
pub const QCOW2: &str = "qcow2";

fn raw_format() -> String {
    RAW.into()
}

/// The qcow2 cluster size (bytes) a create request asks for, checked.
fn cluster_size(body: &VolumeCreate) -> Result<Option<u64>, ApiError> {
    match (body.format.as_str(), body.cluster_size_kib) {
        (RAW, None) => Ok(None),
        (RAW, Some(_)) => Err(ApiError::invalid(
            "cluster_size_kib",
            "only qcow2 volumes have clusters",
        )),
        (QCOW2, kib) => {
            let kib = kib.unwrap_or(64);
            if !kib.is_power_of_two() || !(64..=2048).contains(&kib) {
                return Err(ApiError::invalid(
                    "cluster_size_kib",
                    "must be a power of two from 64 to 2048",
                ));
            }
            if body.provisioning == "thick" {
                return Err(ApiError::invalid(
                    "provisioning",
                    "qcow2 volumes allocate clusters as they are written; thick applies to raw volumes",
                ));
            }
            Ok(Some(kib << 10))
        }
        (other, _) => Err(ApiError::invalid(
            "format",
            format!("must be raw or qcow2, not {other:?}"),
        )),
    }
}

/// Refuses `what` when one of `ids` is not a raw volume: backups, CDP,
/// snapshots and copies read and copy the volume file as the disk itself.
pub async fn require_raw(
    conn: &mut crate::store::DbConnection,
    ids: &[String],
    what: &str,
) -> Result<(), ApiError> {
    for id in ids {
        if let Some(v) = records::get(conn, KIND, id).await? {
            let spec: VolumeSpec = v.spec()?;
            if spec.format != RAW {
                return Err(ApiError::Conflict(format!(
                    "{what} works on raw volumes only; volume {id} is {}",
                    spec.format
                )));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VolumePage {
    pub items: Vec<Volume>,
    pub next_cursor: Option<String>,
}

impl Resource for Volume {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Compute;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        Ok(Volume {
            spec: record.spec()?,
            meta: record.meta,
        })
    }
}

/// Where volume files live: `<state dir>/volumes/<id>.raw`, or
/// `<id>.qcow2` for a qcow2 volume (the name says the format; the
/// content never does: a guest could write a qcow2 header into a raw disk).
pub fn volume_path(state_dir: &FsPath, id: &str) -> PathBuf {
    let qcow2 = volume_file(state_dir, id, QCOW2);
    if qcow2.exists() {
        qcow2
    } else {
        volume_file(state_dir, id, RAW)
    }
}

/// The file of a volume of `format`.
pub fn volume_file(state_dir: &FsPath, id: &str, format: &str) -> PathBuf {
    let ext = if format == QCOW2 { QCOW2 } else { RAW };
    state_dir.join("volumes").join(format!("{id}.{ext}"))
}

/// The VDC's volume count and volume GiB quotas leave room for one more
/// volume of `new_bytes`. Checked in the inserting transaction (SQLite
/// serializes writers, so racing creates cannot both pass).
pub async fn check_volume_quota(
    conn: &mut crate::store::DbConnection,
    vdc: &Record,
    new_bytes: u64,
) -> Result<(), ApiError> {
    let quota = super::vdcs::quota_of(vdc)?;
    if quota.volumes.is_none() && quota.volume_gb.is_none() {
        return Ok(());
    }
    let mut existing = records::in_vdc(conn, KIND, &vdc.meta.id).await?;
    existing.retain(|v| v.meta.status != DELETED);
    if let Some(limit) = quota.volumes {
        if existing.len() as u64 >= limit {
            return Err(ApiError::QuotaExceeded {
                resource: "volumes",
                limit,
            });
        }
    }
    if let Some(limit) = quota.volume_gb {
        let mut gib = new_bytes.div_ceil(1 << 30);
        for v in &existing {
            gib += v.spec::<VolumeSpec>()?.size_bytes.div_ceil(1 << 30);
        }
        if gib > limit {
            return Err(ApiError::QuotaExceeded {
                resource: "volume_gb",
                limit,
            });
        }
    }
    Ok(())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_volume, list_volumes))
        .routes(routes!(get_volume, delete_volume))
        .routes(routes!(resize_volume))
        .routes(routes!(copy_volume))
        .routes(routes!(restore_volume))
}

/// What [`discard`] did with a volume.
#[derive(Debug)]
pub enum Discarded {
    /// Into its VDC's recycle bin, until `purge_at`.
    Binned(Record),
    /// Gone: its files may be removed.
    Deleted,
}

/// Deletes a detached volume: into the recycle bin when its VDC keeps one
/// (and `purge` is false and it is not already there), for good otherwise.
pub async fn discard(
    conn: &mut crate::store::DbConnection,
    volume: &Record,
    purge: bool,
) -> Result<Discarded, ApiError> {
    let hours = match &volume.meta.vdc_id {
        Some(vdc) if !purge && volume.meta.status != DELETED => {
            match records::get(conn, super::vdcs::KIND, vdc).await? {
                Some(vdc) => super::vdcs::recycle_bin_hours_of(&vdc)?,
                None => 0,
            }
        }
        _ => 0,
    };
    if hours == 0 {
        records::delete(conn, volume, KIND).await?;
        return Ok(Discarded::Deleted);
    }
    let mut spec: VolumeSpec = volume.spec()?;
    spec.attached_to = None;
    spec.purge_at = Some(records::now_ms() + i64::from(hours) * 3_600_000);
    let binned = records::observe(conn, KIND, &volume.meta.id, DELETED, Some(to_json(&spec)?))
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Discarded::Binned(binned))
}

/// Purges the volumes whose time in the recycle bin ended by `now` (unix
/// ms); returns their ids (their files are the host agent's to remove).
pub async fn purge_expired(
    conn: &mut crate::store::DbConnection,
    now: i64,
) -> Result<Vec<String>, ApiError> {
    let mut purged = Vec::new();
    for volume in records::all(conn, KIND).await? {
        if volume.meta.status != DELETED {
            continue;
        }
        let spec: VolumeSpec = volume.spec()?;
        if spec.purge_at.is_some_and(|at| at <= now) {
            records::delete(conn, &volume, KIND).await?;
            purged.push(volume.meta.id);
        }
    }
    Ok(purged)
}

/// Takes a volume out of the recycle bin: AVAILABLE again, if its VDC's
/// quota has room for it.
#[utoipa::path(post, path = "/volumes/{id}/actions/restore", tag = "compute",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "The volume, AVAILABLE again with its data", body = Volume),
        (status = 409, description = "The volume is not in the recycle bin, or the VDC quota has no room for it", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn restore_volume(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut tx = state.store.begin_write().await?;
    let volume = load(
        &mut tx,
        &principal,
        Family::Compute,
        Action::Update,
        KIND,
        &id,
    )
    .await?;
    if volume.meta.status != DELETED {
        return Err(ApiError::Conflict(format!(
            "the volume is {}, not in the recycle bin",
            volume.meta.status
        )));
    }
    let mut spec: VolumeSpec = volume.spec()?;
    if let Some(vdc_id) = &volume.meta.vdc_id {
        let vdc = referenced_vdc(&mut tx, &principal, "vdc_id", vdc_id).await?;
        check_volume_quota(&mut tx, &vdc, spec.size_bytes).await?;
    }
    spec.purge_at = None;
    let restored = records::observe(&mut tx, KIND, &id, AVAILABLE, Some(to_json(&spec)?))
        .await?
        .ok_or(ApiError::NotFound)?;
    tx.commit().await?;
    super::respond::ok::<Volume>(restored)
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct VolumeDeleteQuery {
    /// Skip the recycle bin: delete for good at once.
    pub purge: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeCopy {
    /// Name of the new volume.
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[utoipa::path(post, path = "/volumes/{id}/actions/copy", tag = "compute", request_body = VolumeCopy,
    params(("id" = String, Path)),
    responses(
        (status = 202, description = "A new volume, CREATING; the task (Location) copies the source's data into it, keeping holes", body = Task),
        (status = 409, description = "The source is not AVAILABLE (or IN_USE by a STOPPED VM), a task runs on it or its VM, or the VDC quota is full", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn copy_volume(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<VolumeCopy>,
) -> Result<Response, ApiError> {
    principal.require(Family::Compute, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    let mut tx = state.store.begin_write().await?;
    let source = load(
        &mut tx,
        &principal,
        Family::Compute,
        Action::Read,
        KIND,
        &id,
    )
    .await?;
    let spec: VolumeSpec = source.spec()?;
    require_quiet(&mut tx, &source, "copied").await?;
    let vdc_id = source
        .meta
        .vdc_id
        .clone()
        .ok_or_else(|| ApiError::Internal(format!("volume {id} has no VDC")))?;
    let vdc = referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    check_volume_quota(&mut tx, &vdc, spec.size_bytes).await?;
    let copy = VolumeSpec {
        size_bytes: spec.size_bytes,
        image_id: spec.image_id.clone(),
        provisioning: spec.provisioning.clone(),
        format: spec.format.clone(),
        cluster_size: spec.cluster_size,
        attached_to: None,
        description: body.description,
        status_reason: String::new(),
        // Copied where the source's file is.
        host_id: spec.host_id.clone(),
        purge_at: None,
    };
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: KIND,
            vdc_id: Some(&vdc_id),
            parent_id: None,
            name: &body.name,
            spec: to_json(&copy)?,
            status: CREATING,
        },
    )
    .await?;
    let task = tasks::enqueue(
        &mut tx,
        Some(&vdc_id),
        KIND,
        &record.meta.id,
        "create",
        serde_json::json!({ "copy_of": id }),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

/// Refuses work on a volume whose data may still change: it must be
/// AVAILABLE, or IN_USE by a STOPPED VM, with no task to run on it or its
/// VM. `what` says what the work would do to it ("copied", "grown", ...).
pub async fn require_quiet(
    conn: &mut crate::store::DbConnection,
    volume: &Record,
    what: &str,
) -> Result<(), ApiError> {
    let spec: VolumeSpec = volume.spec()?;
    let mut busy = vec![volume.meta.id.clone()];
    match (volume.meta.status.as_str(), &spec.attached_to) {
        (AVAILABLE, _) => {}
        (IN_USE, Some(vm_id)) => {
            let vm = records::get(conn, super::vms::KIND, vm_id)
                .await?
                .ok_or(ApiError::NotFound)?;
            if vm.meta.status != super::vms::STOPPED {
                return Err(ApiError::Conflict(format!(
                    "the volume is used by VM {vm_id}, which is {}; stop it first \
                     (a running VM's disk is not {what} yet)",
                    vm.meta.status
                )));
            }
            busy.push(vm_id.clone());
        }
        (status, _) => {
            return Err(ApiError::Conflict(format!(
                "the volume is {status}; it can be {what} when AVAILABLE, or IN_USE by a STOPPED VM"
            )))
        }
    }
    require_no_task(conn, &busy).await
}

/// Refuses (409, naming it) while a task is queued or running on any of
/// `resources` (a volume and the VM using it).
pub async fn require_no_task(
    conn: &mut crate::store::DbConnection,
    resources: &[String],
) -> Result<(), ApiError> {
    for resource in resources {
        if let Some(task) = tasks::pending_for(conn, resource).await? {
            return Err(ApiError::Conflict(format!(
                "task {} ({}) is still {} on {resource}",
                task.id, task.action, task.state
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeResize {
    /// The new size; volumes only grow.
    pub size_gib: u64,
}

#[utoipa::path(post, path = "/volumes/{id}/actions/resize", tag = "compute", request_body = VolumeResize,
    params(("id" = String, Path)),
    responses(
        (status = 202, description = "Queued: the task grows the file (thick volumes are allocated)", body = Task),
        (status = 409, description = "In use by a VM that is not STOPPED, not AVAILABLE or IN_USE, or a task runs on it or its VM", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not larger than the current size, or too large", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn resize_volume(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<VolumeResize>,
) -> Result<Response, ApiError> {
    let size_bytes = body
        .size_gib
        .checked_mul(1 << 30)
        .filter(|b| *b <= MAX_VOLUME_BYTES)
        .ok_or_else(|| ApiError::invalid("size_gib", "at most 16384"))?;
    let mut tx = state.store.begin_write().await?;
    let record = load(
        &mut tx,
        &principal,
        Family::Compute,
        Action::Update,
        KIND,
        &id,
    )
    .await?;
    let spec: VolumeSpec = record.spec()?;
    if size_bytes <= spec.size_bytes {
        return Err(ApiError::invalid(
            "size_gib",
            format!(
                "volumes only grow: it has {} bytes ({} GiB)",
                spec.size_bytes,
                spec.size_bytes.div_ceil(1 << 30)
            ),
        ));
    }
    require_quiet(&mut tx, &record, "grown").await?;
    let task = tasks::enqueue(
        &mut tx,
        record.meta.vdc_id.as_deref(),
        KIND,
        &id,
        "resize",
        serde_json::json!({ "size_bytes": size_bytes }),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

#[utoipa::path(post, path = "/volumes", tag = "compute", request_body = VolumeCreate,
    responses(
        (status = 202, description = "CREATING; the task (Location) provisions the file", body = Task),
        (status = 422, description = "Invalid field (unknown or not ACTIVE image, size)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_volume(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<VolumeCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Compute, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    if !matches!(body.provisioning.as_str(), "thin" | "thick") {
        return Err(ApiError::invalid("provisioning", "must be thin or thick"));
    }
    let cluster_size = cluster_size(&body)?;
    let requested = match body.size_gib {
        Some(0) => return Err(ApiError::invalid("size_gib", "must be at least 1")),
        Some(g) => Some(
            g.checked_mul(1 << 30)
                .filter(|b| *b <= MAX_VOLUME_BYTES)
                .ok_or_else(|| ApiError::invalid("size_gib", "at most 16384"))?,
        ),
        None => None,
    };
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let mut tx = state.store.begin_write().await?;
    let vdc = referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    let size_bytes = match &body.image_id {
        Some(image_id) => {
            let image = images::visible_image(&mut tx, &principal, image_id)
                .await
                .map_err(|_| ApiError::invalid("image_id", format!("no image {image_id}")))?;
            if image.meta.status != images::ACTIVE {
                return Err(ApiError::invalid(
                    "image_id",
                    format!("image {image_id} is {}, not ACTIVE", image.meta.status),
                ));
            }
            let spec: ImageSpec = image.spec()?;
            requested.unwrap_or(0).max(spec.size_bytes)
        }
        None => {
            requested.ok_or_else(|| ApiError::invalid("size_gib", "required for a blank volume"))?
        }
    };
    check_volume_quota(&mut tx, &vdc, size_bytes).await?;
    let spec = VolumeSpec {
        size_bytes,
        image_id: body.image_id,
        provisioning: body.provisioning,
        format: body.format,
        cluster_size,
        attached_to: None,
        description: body.description,
        status_reason: String::new(),
        host_id: None,
        purge_at: None,
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
    let task = tasks::enqueue(
        &mut tx,
        Some(&vdc_id),
        KIND,
        &record.meta.id,
        "create",
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

#[utoipa::path(get, path = "/volumes", tag = "compute", params(ListQuery),
    responses((status = 200, description = "One page", body = VolumePage)), security(("bearer" = [])))]
async fn list_volumes(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<VolumePage>, ApiError> {
    let Page { items, next_cursor } = list_page::<Volume>(&state, &principal, &query).await?;
    Ok(Json(VolumePage { items, next_cursor }))
}

#[utoipa::path(get, path = "/volumes/{id}", tag = "compute", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The volume", body = Volume),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_volume(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<Volume>(&state, &principal, &id).await
}

#[utoipa::path(delete, path = "/volumes/{id}", tag = "compute",
    params(("id" = String, Path), VolumeDeleteQuery, ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Moved to the VDC's recycle bin: DELETED until `purge_at`, restorable", body = Volume),
        (status = 204, description = "Deleted with its file (no recycle bin, `purge=true`, or already in the bin)"),
        (status = 409, description = "Attached to a VM or still being provisioned", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_volume(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidQuery(query): ValidQuery<VolumeDeleteQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<Volume>(&state, &principal, Action::Delete, &id, &headers).await?;
    let spec: VolumeSpec = record.spec()?;
    if let Some(vm) = spec.attached_to {
        return Err(ApiError::Conflict(format!(
            "the volume is attached to VM {vm}; detach or delete the VM first"
        )));
    }
    if record.meta.status == CREATING {
        return Err(ApiError::Conflict(
            "the volume is still being provisioned".into(),
        ));
    }
    match discard(&mut tx, &record, query.purge.unwrap_or(false)).await? {
        Discarded::Binned(binned) => {
            tx.commit().await?;
            super::respond::ok::<Volume>(binned)
        }
        Discarded::Deleted => {
            tx.commit().await?;
            remove_volume_files(state.state_dir.as_path(), &id);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

/// Removes a volume's file and its changed-block-tracking sidecar.
pub fn remove_volume_files(state_dir: &FsPath, id: &str) {
    let path = volume_path(state_dir, id);
    let mut cbt = path.clone().into_os_string();
    cbt.push(".cbt");
    for p in [path, PathBuf::from(cbt)] {
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %p.display(), error = %e, "volume file not removed");
            }
        }
    }
}
