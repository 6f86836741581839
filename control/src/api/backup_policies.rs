//! `/backup-policies`: scheduled backups with retention. A policy names
//! volumes of one VDC, an interval and how many of its backups to keep per
//! volume. The host agent runs [`run_due`] in its loop: each policy that is
//! due takes an (incremental) backup of each of its volumes and deletes
//! that volume's oldest policy-made backups beyond the retention. A new
//! policy is due at once. Volumes of a running VM are backed up at a point
//! in time (the VM pauses briefly, see [`super::backups`]); volumes that
//! cannot be backed up now (a task pending on them or their VM, a VM in an
//! active protection group or in another state) are skipped for that round
//! and the policy says so.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::backups::{self, BackupSpec, NewBackup};
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::listing::{ListQuery, Page};
use super::problem::{ApiError, Problem};
use super::records::{self, now_ms, to_json, Meta, NewRecord, Record};
use super::respond::{
    begin_change, created, finish_delete, get_one, list_page, load, ok, referenced_vdc, target_vdc,
    Resource,
};
use super::{volumes, AppState};
use crate::store::DbConnection;

pub const KIND: &str = "backup_policy";
const ACTIVE: &str = "ACTIVE";
const MIN_INTERVAL: u64 = 60;
const MAX_INTERVAL: u64 = 31 * 24 * 3600;
const MAX_RETENTION: u32 = 1000;
const MAX_VOLUMES: usize = 100;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicySpec {
    pub description: String,
    pub volume_ids: Vec<String>,
    /// Seconds between rounds (60 s .. 31 days).
    pub interval_seconds: u64,
    /// Policy-made backups kept per volume (1..=1000); older ones are deleted.
    pub retention: u32,
    pub incremental: bool,
    pub enabled: bool,
    /// Unix ms of the next round.
    pub next_run_at: i64,
    /// Unix ms of the last round, if any.
    pub last_run_at: Option<i64>,
    /// What the last round did or why it skipped a volume.
    pub last_result: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BackupPolicy {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: PolicySpec,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyCreate {
    pub name: String,
    pub vdc_id: Option<String>,
    #[serde(default)]
    pub description: String,
    pub volume_ids: Vec<String>,
    pub interval_seconds: u64,
    pub retention: u32,
    #[serde(default = "yes")]
    pub incremental: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub volume_ids: Option<Vec<String>>,
    pub interval_seconds: Option<u64>,
    pub retention: Option<u32>,
    pub incremental: Option<bool>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BackupPolicyPage {
    pub items: Vec<BackupPolicy>,
    pub next_cursor: Option<String>,
}

impl Resource for BackupPolicy {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Compute;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        Ok(BackupPolicy {
            spec: record.spec()?,
            meta: record.meta,
        })
    }
}

fn check_schedule(interval_seconds: u64, retention: u32) -> Result<(), ApiError> {
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval_seconds) {
        return Err(ApiError::invalid(
            "interval_seconds",
            format!("must be {MIN_INTERVAL}..={MAX_INTERVAL}"),
        ));
    }
    if !(1..=MAX_RETENTION).contains(&retention) {
        return Err(ApiError::invalid(
            "retention",
            format!("must be 1..={MAX_RETENTION}"),
        ));
    }
    Ok(())
}

/// Each volume visible to the caller, in `vdc_id`, named once.
async fn check_volumes(
    conn: &mut DbConnection,
    principal: &Principal,
    vdc_id: &str,
    ids: &[String],
) -> Result<(), ApiError> {
    if ids.is_empty() || ids.len() > MAX_VOLUMES {
        return Err(ApiError::invalid(
            "volume_ids",
            format!("1..={MAX_VOLUMES} volumes"),
        ));
    }
    for (i, id) in ids.iter().enumerate() {
        let field = format!("volume_ids[{i}]");
        if ids[..i].contains(id) {
            return Err(ApiError::invalid(field, "listed twice"));
        }
        let volume = load(
            conn,
            principal,
            Family::Compute,
            Action::Read,
            volumes::KIND,
            id,
        )
        .await
        .map_err(|_| ApiError::invalid(field.clone(), format!("no volume {id}")))?;
        if volume.meta.vdc_id.as_deref() != Some(vdc_id) {
            return Err(ApiError::invalid(field, "in another VDC than the policy"));
        }
    }
    Ok(())
}

/// Whether any enabled policy is due at `now` (a read, so the agent takes
/// the write lock only when there is a round to run).
pub async fn any_due(conn: &mut DbConnection, now: i64) -> Result<bool, ApiError> {
    for policy in records::all(conn, KIND).await? {
        let spec: PolicySpec = policy.spec()?;
        if spec.enabled && spec.next_run_at <= now {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs every enabled policy due at `now` (unix ms): one round each. Call
/// in a write transaction (the agent does, every loop), so two agents never
/// run the same round. Returns how many rounds ran.
pub async fn run_due(conn: &mut DbConnection, now: i64) -> Result<usize, ApiError> {
    let mut rounds = 0;
    for policy in records::all(conn, KIND).await? {
        let mut spec: PolicySpec = policy.spec()?;
        if !spec.enabled || spec.next_run_at > now {
            continue;
        }
        let mut notes = Vec::new();
        for volume_id in &spec.volume_ids {
            let Some(volume) = records::get(conn, volumes::KIND, volume_id).await? else {
                notes.push(format!("{volume_id}: deleted"));
                continue;
            };
            let name = format!("{}-{now}", policy.meta.name);
            let taken = backups::start_backup(
                conn,
                &volume,
                NewBackup {
                    name: &name,
                    incremental: spec.incremental,
                    description: format!("by backup policy {}", policy.meta.id),
                    policy_id: Some(policy.meta.id.clone()),
                },
            )
            .await;
            match taken {
                Ok(_) => notes.push(format!("{volume_id}: backup queued")),
                Err(ApiError::Conflict(why)) => notes.push(format!("{volume_id}: skipped, {why}")),
                Err(e) => return Err(e),
            }
            let pruned = prune(conn, &policy.meta.id, volume_id, spec.retention).await?;
            if pruned > 0 {
                notes.push(format!("{volume_id}: {pruned} old backup(s) deleted"));
            }
        }
        spec.last_run_at = Some(now);
        let interval =
            i64::try_from(spec.interval_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
        spec.next_run_at = now.saturating_add(interval);
        spec.last_result = notes.join("; ");
        records::observe(conn, KIND, &policy.meta.id, ACTIVE, Some(to_json(&spec)?)).await?;
        rounds += 1;
    }
    Ok(rounds)
}

/// Deletes the oldest AVAILABLE backups `policy_id` took of `volume_id`
/// beyond `keep`. The backup a round has just queued is not counted until
/// it is taken, so a failing backup never costs a good one: between a
/// round and the next there are `keep` + 1.
async fn prune(
    conn: &mut DbConnection,
    policy_id: &str,
    volume_id: &str,
    keep: u32,
) -> Result<usize, ApiError> {
    let mut kept: Vec<Record> = Vec::new();
    for b in records::children(conn, backups::KIND, volume_id).await? {
        let spec: BackupSpec = b.spec()?;
        if b.meta.status == backups::AVAILABLE && spec.policy_id.as_deref() == Some(policy_id) {
            kept.push(b);
        }
    }
    kept.sort_by(|x, y| (x.meta.created_at, &x.meta.id).cmp(&(y.meta.created_at, &y.meta.id)));
    let extra = kept
        .len()
        .saturating_sub(usize::try_from(keep).unwrap_or(usize::MAX));
    for old in &kept[..extra] {
        backups::start_delete(conn, old).await?;
    }
    Ok(extra)
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_policy, list_policies))
        .routes(routes!(get_policy, update_policy, delete_policy))
}

#[utoipa::path(post, path = "/backup-policies", tag = "compute", request_body = PolicyCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Created; its first round is due at once", body = BackupPolicy),
        (status = 422, description = "Invalid field (schedule, retention, volumes)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_policy(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<PolicyCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Compute, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    check_schedule(body.interval_seconds, body.retention)?;
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let mut tx = state.store.begin_write().await?;
    referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    check_volumes(&mut tx, &principal, &vdc_id, &body.volume_ids).await?;
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: KIND,
            vdc_id: Some(&vdc_id),
            parent_id: Some(&vdc_id),
            name: &body.name,
            spec: to_json(&PolicySpec {
                description: body.description,
                volume_ids: body.volume_ids,
                interval_seconds: body.interval_seconds,
                retention: body.retention,
                incremental: body.incremental,
                enabled: body.enabled,
                next_run_at: now_ms(),
                last_run_at: None,
                last_result: String::new(),
            })?,
            status: ACTIVE,
        },
    )
    .await?;
    tx.commit().await?;
    let location = format!("/api/v1/backup-policies/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(
        &location,
        revision,
        &BackupPolicy::from_record(record)?,
    ))
}

#[utoipa::path(get, path = "/backup-policies", tag = "compute", params(ListQuery),
    responses((status = 200, description = "One page", body = BackupPolicyPage)), security(("bearer" = [])))]
async fn list_policies(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<BackupPolicyPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<BackupPolicy>(&state, &principal, &query).await?;
    Ok(Json(BackupPolicyPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/backup-policies/{id}", tag = "compute", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The policy with its last round", body = BackupPolicy),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_policy(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<BackupPolicy>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/backup-policies/{id}", tag = "compute", request_body = PolicyUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated; a new interval counts from the last round", body = BackupPolicy),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_policy(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<PolicyUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<BackupPolicy>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: PolicySpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(d) = body.description {
        check_description(&d)?;
        spec.description = d;
    }
    let interval = body.interval_seconds.unwrap_or(spec.interval_seconds);
    let retention = body.retention.unwrap_or(spec.retention);
    check_schedule(interval, retention)?;
    if interval != spec.interval_seconds {
        let base = spec.last_run_at.unwrap_or_else(now_ms);
        spec.next_run_at =
            base.saturating_add(i64::try_from(interval.saturating_mul(1000)).unwrap_or(i64::MAX));
    }
    spec.interval_seconds = interval;
    spec.retention = retention;
    if let Some(ids) = body.volume_ids {
        let vdc_id = record.meta.vdc_id.clone().unwrap_or_default();
        check_volumes(&mut tx, &principal, &vdc_id, &ids).await?;
        spec.volume_ids = ids;
    }
    if let Some(i) = body.incremental {
        spec.incremental = i;
    }
    if let Some(e) = body.enabled {
        spec.enabled = e;
    }
    let updated = records::update(&mut tx, &record, KIND, &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<BackupPolicy>(updated)
}

#[utoipa::path(delete, path = "/backup-policies/{id}", tag = "compute",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted; the backups it took stay"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_policy(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (tx, record) =
        begin_change::<BackupPolicy>(&state, &principal, Action::Delete, &id, &headers).await?;
    finish_delete::<BackupPolicy>(tx, &record).await
}
