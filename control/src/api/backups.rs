//! Volume backups: `POST /volumes/{id}/backups`, `/backups`, restore into a
//! new volume. The host agent runs keel's backup engine (keel-cdp): a
//! content-addressed, deduplicating repository in the state directory;
//! the first backup of a volume is full, later ones read only the chunks
//! its disk server's changed-block bitmap marks. Every backup point
//! restores on its own.
//!
//! A volume in use by a RUNNING (or PAUSED) VM is backed up at a point in
//! time: the agent pauses the VM briefly, freezes the changed-block bitmap
//! in the volume's disk server, copies only the chunks the backup will read
//! into a staging file, resumes the VM and backs up the copy (crash-
//! consistent; the pause is reported as `paused_ms`). Volumes of a VM in
//! an active protection group are refused: their disks are served by the
//! group's CDP source, which has no backup control channel.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::listing::{ListQuery, Page};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record};
use super::respond::{begin_change, get_one, list_page, load, Resource};
use super::tasks::{self, Task};
use super::volumes::{self, VolumeSpec};
use super::AppState;

pub const KIND: &str = "backup";
pub const CREATING: &str = "CREATING";
pub const AVAILABLE: &str = "AVAILABLE";
pub const ERROR: &str = "ERROR";
pub const DELETING: &str = "DELETING";

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct BackupSpec {
    pub volume_id: String,
    /// Incremental was asked for (the first backup of a volume is full).
    pub incremental: bool,
    pub description: String,
    /// The repository's point (set once taken).
    pub point_id: Option<String>,
    /// `full` or `incremental`, as taken.
    pub kind: Option<String>,
    /// Why an asked-for incremental was taken full.
    pub fallback: Option<String>,
    /// Size of the volume at the backup.
    pub size_bytes: u64,
    pub chunks_total: u64,
    /// Chunks read from the volume (an incremental reads only changed ones).
    pub chunks_read: u64,
    /// Bytes added to the repository (compressed, deduplicated).
    pub bytes_stored: u64,
    /// Bytes read from the volume.
    #[serde(default)]
    pub bytes_read: u64,
    /// Chunks read that the repository already held.
    #[serde(default)]
    pub chunks_dedup: u64,
    /// Seconds the backup job took (after the cut).
    #[serde(default)]
    pub seconds: f64,
    /// MB read per second.
    #[serde(default)]
    pub throughput_mb_s: f64,
    /// Non-zero chunks read per chunk newly stored (1.0: nothing was
    /// already there; higher: deduplicated).
    #[serde(default)]
    pub dedup_ratio: f64,
    /// How long the VM using the volume was paused for the point-in-time
    /// cut, in milliseconds (absent when no VM was running).
    #[serde(default)]
    pub paused_ms: Option<u64>,
    #[serde(default)]
    pub status_reason: String,
    /// The backup policy that took it (its retention applies), if any.
    #[serde(default)]
    pub policy_id: Option<String>,
    /// Fingerprint of the VDC key the point is encrypted with (none: plain).
    #[serde(default)]
    pub encryption: Option<String>,
    /// The VM backup this disk's point belongs to (`/vm-backups/{id}`):
    /// deleted with it, not on its own.
    #[serde(default)]
    pub vm_backup_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Backup {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: BackupSpec,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BackupPage {
    pub items: Vec<Backup>,
    pub next_cursor: Option<String>,
}

impl Resource for Backup {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Compute;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        Ok(Backup {
            spec: record.spec()?,
            meta: record.meta,
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupCreate {
    pub name: String,
    /// Read only what changed since the volume's last backup (default).
    #[serde(default = "yes")]
    pub incremental: bool,
    #[serde(default)]
    pub description: String,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRestore {
    /// Name of the new volume (not with `in_place`).
    pub name: Option<String>,
    /// Restore over the backed-up volume itself (AVAILABLE, or used by a
    /// STOPPED VM; same size) instead of into a new volume.
    #[serde(default)]
    pub in_place: bool,
}

/// Checks a restore request's name: required for a new resource, refused
/// in place (the resource keeps its own).
pub(super) fn restore_name(name: Option<&str>, in_place: bool) -> Result<Option<&str>, ApiError> {
    match (name, in_place) {
        (Some(_), true) => Err(ApiError::invalid(
            "name",
            "an in-place restore keeps the existing name",
        )),
        (None, false) => Err(ApiError::invalid("name", "required")),
        (Some(name), false) => {
            check_name("name", name)?;
            Ok(Some(name))
        }
        (None, true) => Ok(None),
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_backup))
        .routes(routes!(list_backups))
        .routes(routes!(get_backup, delete_backup))
        .routes(routes!(restore_backup))
}

#[utoipa::path(post, path = "/volumes/{id}/backups", tag = "compute", request_body = BackupCreate,
    params(("id" = String, Path)),
    responses(
        (status = 202, description = "Queued: the backup is CREATING; the task reports percent done. A running VM using the volume is paused briefly for a point-in-time cut", body = Task),
        (status = 409, description = "The volume is not AVAILABLE or IN_USE by a STOPPED, RUNNING or PAUSED VM, a task runs on it or its VM, or its VM is in an active protection group", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_backup(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<BackupCreate>,
) -> Result<Response, ApiError> {
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    let mut tx = state.store.begin_write().await?;
    let volume = load(
        &mut tx,
        &principal,
        Family::Compute,
        Action::Update,
        volumes::KIND,
        &id,
    )
    .await?;
    let task = start_backup(
        &mut tx,
        &volume,
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

pub struct NewBackup<'a> {
    pub name: &'a str,
    pub incremental: bool,
    pub description: String,
    pub policy_id: Option<String>,
}

/// Refuses a backup of `volume` unless it is AVAILABLE or IN_USE by a
/// STOPPED, RUNNING or PAUSED VM that no active protection group
/// replicates, with no task pending on the volume or its VM.
async fn require_backup_ready(
    conn: &mut crate::store::DbConnection,
    volume: &Record,
) -> Result<(), ApiError> {
    use super::vms;
    let spec: VolumeSpec = volume.spec()?;
    volumes::require_raw(conn, std::slice::from_ref(&volume.meta.id), "a backup").await?;
    let mut busy = vec![volume.meta.id.clone()];
    match (volume.meta.status.as_str(), &spec.attached_to) {
        (volumes::AVAILABLE, _) => {}
        (volumes::IN_USE, Some(vm_id)) => {
            let vm = records::get(conn, vms::KIND, vm_id)
                .await?
                .ok_or(ApiError::NotFound)?;
            let status = vm.meta.status.as_str();
            if ![vms::STOPPED, vms::RUNNING, vms::PAUSED].contains(&status) {
                return Err(ApiError::Conflict(format!(
                    "the volume is used by VM {vm_id}, which is {status}; it can be backed up \
                     while the VM is STOPPED, RUNNING or PAUSED"
                )));
            }
            super::protection_groups::refuse_if_member(conn, vm_id, "back up a volume of", false)
                .await?;
            busy.push(vm_id.clone());
        }
        (status, _) => {
            return Err(ApiError::Conflict(format!(
                "the volume is {status}; it can be backed up when AVAILABLE or IN_USE"
            )))
        }
    }
    volumes::require_no_task(conn, &busy).await
}

/// Stores a CREATING backup of `volume` and queues the task that takes it
/// (for `POST /volumes/{id}/backups` and backup policies); see
/// [`require_backup_ready`] for when it is refused.
pub async fn start_backup(
    conn: &mut crate::store::DbConnection,
    volume: &Record,
    new: NewBackup<'_>,
) -> Result<Task, ApiError> {
    require_backup_ready(conn, volume).await?;
    let id = &volume.meta.id;
    let backup = records::insert(
        conn,
        NewRecord {
            kind: KIND,
            vdc_id: volume.meta.vdc_id.as_deref(),
            parent_id: Some(id),
            name: new.name,
            spec: to_json(&BackupSpec {
                volume_id: id.clone(),
                incremental: new.incremental,
                description: new.description,
                policy_id: new.policy_id,
                ..BackupSpec::default()
            })?,
            status: CREATING,
        },
    )
    .await?;
    tasks::enqueue(
        conn,
        volume.meta.vdc_id.as_deref(),
        volumes::KIND,
        id,
        "backup",
        serde_json::json!({ "backup_id": backup.meta.id, "incremental": new.incremental }),
    )
    .await
}

/// Marks an AVAILABLE or ERROR backup DELETING and queues the task that
/// removes its point (for `DELETE /backups/{id}` and policy retention).
pub async fn start_delete(
    conn: &mut crate::store::DbConnection,
    record: &Record,
) -> Result<Task, ApiError> {
    let spec: BackupSpec = record.spec()?;
    if let Some(vm_backup) = &spec.vm_backup_id {
        if records::get(conn, super::vm_backups::KIND, vm_backup)
            .await?
            .is_some()
        {
            return Err(ApiError::Conflict(format!(
                "the backup is a disk of VM backup {vm_backup}; delete that instead"
            )));
        }
    }
    queue_delete(conn, record, KIND, "backup").await
}

/// Marks an AVAILABLE or ERROR backup of `kind` (a volume's or a VM's)
/// DELETING and queues the task that removes its points; refused while it
/// is being taken or deleted, or a task runs on it.
pub(super) async fn queue_delete(
    conn: &mut crate::store::DbConnection,
    record: &Record,
    kind: &str,
    noun: &str,
) -> Result<Task, ApiError> {
    let id = &record.meta.id;
    if record.meta.status == CREATING || record.meta.status == DELETING {
        return Err(ApiError::Conflict(format!(
            "the {noun} is {}",
            record.meta.status
        )));
    }
    if let Some(task) = tasks::pending_for(conn, id).await? {
        return Err(ApiError::Conflict(format!(
            "task {} ({}) is still {} on this {noun}",
            task.id, task.action, task.state
        )));
    }
    records::observe(conn, kind, id, DELETING, None).await?;
    tasks::enqueue(
        conn,
        record.meta.vdc_id.as_deref(),
        kind,
        id,
        "delete",
        serde_json::json!({}),
    )
    .await
}

#[utoipa::path(get, path = "/backups", tag = "compute", params(ListQuery),
    responses((status = 200, description = "One page; filter by volume with parent_id", body = BackupPage)), security(("bearer" = [])))]
async fn list_backups(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<BackupPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<Backup>(&state, &principal, &query).await?;
    Ok(Json(BackupPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/backups/{id}", tag = "compute", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The backup", body = Backup),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_backup(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<Backup>(&state, &principal, &id).await
}

#[utoipa::path(delete, path = "/backups/{id}", tag = "compute",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 202, description = "DELETING: the task removes the point and collects chunks no other point uses", body = Task),
        (status = 409, description = "Still being taken, a task runs on it, or it is a disk of a VM backup (delete that)", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_backup(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<Backup>(&state, &principal, Action::Delete, &id, &headers).await?;
    let task = start_delete(&mut tx, &record).await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

#[utoipa::path(post, path = "/backups/{id}/actions/restore", tag = "compute", request_body = BackupRestore,
    params(("id" = String, Path)),
    responses(
        (status = 202, description = "Queued: a new volume (CREATING) is restored from the backup and verified; with `in_place`, the backed-up volume is overwritten (its next backup is full)", body = Task),
        (status = 409, description = "The backup is not AVAILABLE; in place: the volume is gone, in use by a VM that is not STOPPED, busy, or resized since", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn restore_backup(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<BackupRestore>,
) -> Result<Response, ApiError> {
    let name = restore_name(body.name.as_deref(), body.in_place)?;
    principal.require(Family::Compute, Action::Create)?;
    let mut tx = state.store.begin_write().await?;
    let backup = load_restorable(&mut tx, &principal, KIND, &id, "backup").await?;
    let spec: BackupSpec = backup.spec()?;
    let vdc_id = backup.meta.vdc_id.clone();
    let Some(name) = name else {
        let volume = load_restore_target(&mut tx, &principal, &spec).await?;
        let task = tasks::enqueue(
            &mut tx,
            volume.meta.vdc_id.as_deref(),
            volumes::KIND,
            &volume.meta.id,
            "restore",
            serde_json::json!({ "backup_id": id }),
        )
        .await?;
        tx.commit().await?;
        state.changes.notify_waiters();
        return Ok(tasks::accepted(&task));
    };
    // Restored on the host holding the repository: its volume's host.
    let host_id = match records::get(&mut tx, volumes::KIND, &spec.volume_id).await? {
        Some(source) => source.spec::<VolumeSpec>()?.host_id,
        None => None,
    };
    if let Some(vdc) = &vdc_id {
        if let Some(vdc_record) = records::get(&mut tx, "vdc", vdc).await? {
            volumes::check_volume_quota(&mut tx, &vdc_record, spec.size_bytes).await?;
        }
    }
    let volume = records::insert(
        &mut tx,
        NewRecord {
            kind: volumes::KIND,
            vdc_id: vdc_id.as_deref(),
            parent_id: None,
            name,
            spec: to_json(&VolumeSpec {
                size_bytes: spec.size_bytes,
                image_id: None,
                provisioning: "thin".into(),
                format: volumes::RAW.into(),
                cluster_size: None,
                attached_to: None,
                description: format!("restored from backup {id}"),
                status_reason: String::new(),
                host_id,
                purge_at: None,
            })?,
            status: volumes::CREATING,
        },
    )
    .await?;
    let task = tasks::enqueue(
        &mut tx,
        vdc_id.as_deref(),
        volumes::KIND,
        &volume.meta.id,
        "create",
        serde_json::json!({ "from_backup": id }),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

/// A backup of `kind` (a volume's or a VM's) the caller can read, and
/// AVAILABLE: only those restore.
pub(super) async fn load_restorable(
    conn: &mut crate::store::DbConnection,
    principal: &Principal,
    kind: &str,
    id: &str,
    noun: &str,
) -> Result<Record, ApiError> {
    let backup = load(conn, principal, Family::Compute, Action::Read, kind, id).await?;
    if backup.meta.status != AVAILABLE {
        return Err(ApiError::Conflict(format!(
            "the {noun} is {}; only an AVAILABLE one restores",
            backup.meta.status
        )));
    }
    Ok(backup)
}

/// The volume an in-place restore of a backup with `spec` overwrites:
/// still there, writable by the caller, quiet (AVAILABLE or used by a
/// STOPPED VM, no task) and of the backed-up size.
pub(super) async fn load_restore_target(
    conn: &mut crate::store::DbConnection,
    principal: &Principal,
    spec: &BackupSpec,
) -> Result<Record, ApiError> {
    let volume = match records::get(conn, volumes::KIND, &spec.volume_id).await? {
        Some(v) => v,
        None => {
            return Err(ApiError::Conflict(format!(
                "volume {} was deleted; restore into a new volume (give a name)",
                spec.volume_id
            )))
        }
    };
    principal.authorize(
        Family::Compute,
        Action::Update,
        volume.meta.vdc_id.as_deref(),
    )?;
    volumes::require_quiet(conn, &volume, "restored in place").await?;
    let size = volume.spec::<VolumeSpec>()?.size_bytes;
    if size != spec.size_bytes {
        return Err(ApiError::Conflict(format!(
            "volume {} has {size} bytes, the backup {}: restore into a new volume",
            spec.volume_id, spec.size_bytes
        )));
    }
    Ok(volume)
}
