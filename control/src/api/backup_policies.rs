//! `/backup-policies`: scheduled backups with retention. A policy names
//! volumes and VMs of one VDC, a schedule and how many of its backups to
//! keep per volume or VM. The schedule is one of: an interval (a new policy
//! is due at once), a cron pattern (five fields, UTC), or a single time
//! (the policy disables itself after that round). The host agent runs
//! [`run_due`] in its loop: each policy that is due takes an (incremental)
//! backup of each volume and a VM backup of each VM, and deletes the
//! oldest policy-made backups beyond the retention. What cannot be backed
//! up in a round (a task pending on it or its VM, a VM in an active
//! protection group or in another state) is skipped and the policy says
//! so. Volumes and VMs that run are backed up at a point in time (the VM
//! pauses briefly, see [`super::backups`]).

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
use super::{vm_backups, vms, volumes, AppState};
use crate::store::DbConnection;

pub const KIND: &str = "backup_policy";
const ACTIVE: &str = "ACTIVE";
const MIN_INTERVAL: u64 = 60;
const MAX_INTERVAL: u64 = 31 * 24 * 3600;
const MAX_RETENTION: u32 = 1000;
const MAX_VOLUMES: usize = 100;

/// When a policy runs.
#[derive(Debug, Clone)]
enum Schedule {
    Every(u64),
    Cron(Box<croner::Cron>),
    Once(i64),
}

impl Schedule {
    /// The one schedule the fields name (422 naming the field otherwise).
    fn of(
        interval_seconds: Option<u64>,
        cron: Option<&str>,
        once_at: Option<i64>,
    ) -> Result<Schedule, ApiError> {
        match (interval_seconds, cron, once_at) {
            (Some(every), None, None) => {
                if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&every) {
                    return Err(ApiError::invalid(
                        "interval_seconds",
                        format!("must be {MIN_INTERVAL}..={MAX_INTERVAL}"),
                    ));
                }
                Ok(Schedule::Every(every))
            }
            (None, Some(pattern), None) => {
                let parser = croner::parser::CronParser::builder()
                    .seconds(croner::parser::Seconds::Disallowed)
                    .build();
                let cron = parser.parse(pattern).map_err(|e| {
                    ApiError::invalid(
                        "cron",
                        format!("not a five-field cron pattern (minute hour day month weekday, UTC): {e}"),
                    )
                })?;
                Ok(Schedule::Cron(Box::new(cron)))
            }
            (None, None, Some(at)) => Ok(Schedule::Once(at)),
            _ => Err(ApiError::invalid(
                "interval_seconds",
                "give exactly one schedule: interval_seconds, cron or once_at",
            )),
        }
    }

    fn of_spec(spec: &PolicySpec) -> Result<Schedule, ApiError> {
        Schedule::of(spec.interval_seconds, spec.cron.as_deref(), spec.once_at)
    }

    /// The first round of a policy created or rescheduled at `now` (`last`:
    /// its last round, if any).
    fn first(&self, now: i64, last: Option<i64>) -> Option<i64> {
        match self {
            Schedule::Every(_) => match last {
                None => Some(now),
                Some(last) => self.after(last),
            },
            Schedule::Cron(_) => self.after(now),
            Schedule::Once(at) => Some(*at),
        }
    }

    /// The round after one at `at`; none for a single-time schedule.
    fn after(&self, at: i64) -> Option<i64> {
        match self {
            Schedule::Every(every) => Some(
                at.saturating_add(i64::try_from(every.saturating_mul(1000)).unwrap_or(i64::MAX)),
            ),
            Schedule::Cron(cron) => {
                // Whole seconds: cron times fall on the minute.
                let t = chrono::DateTime::from_timestamp(at.div_euclid(1000), 0)?;
                cron.find_next_occurrence(&t, false)
                    .ok()
                    .map(|next| next.timestamp_millis())
            }
            Schedule::Once(_) => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicySpec {
    pub description: String,
    #[serde(default)]
    pub volume_ids: Vec<String>,
    /// VMs backed up whole (`/vm-backups`), all disks at one cut.
    #[serde(default)]
    pub vm_ids: Vec<String>,
    /// Seconds between rounds (60 s .. 31 days); or `cron`, or `once_at`.
    #[serde(default)]
    pub interval_seconds: Option<u64>,
    /// Five-field cron pattern (minute hour day-of-month month weekday), UTC.
    #[serde(default)]
    pub cron: Option<String>,
    /// Unix ms of the only round; the policy disables itself after it.
    #[serde(default)]
    pub once_at: Option<i64>,
    /// Policy-made backups kept per volume or VM (1..=1000); older ones are deleted.
    pub retention: u32,
    /// Policy-made backups older than this many hours are deleted too
    /// (never the newest, nor a full an unexpired incremental follows).
    #[serde(default)]
    pub max_age_hours: Option<u32>,
    pub incremental: bool,
    pub enabled: bool,
    /// Unix ms of the next round (none once a single-time policy ran).
    pub next_run_at: Option<i64>,
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
    #[serde(default)]
    pub volume_ids: Vec<String>,
    #[serde(default)]
    pub vm_ids: Vec<String>,
    /// One of `interval_seconds`, `cron` and `once_at`.
    pub interval_seconds: Option<u64>,
    pub cron: Option<String>,
    pub once_at: Option<i64>,
    pub retention: u32,
    /// 1..=87600 (ten years); default: no age limit.
    pub max_age_hours: Option<u32>,
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
    pub vm_ids: Option<Vec<String>>,
    /// A new schedule replaces the old: give one of `interval_seconds`,
    /// `cron` and `once_at`.
    pub interval_seconds: Option<u64>,
    pub cron: Option<String>,
    pub once_at: Option<i64>,
    pub retention: Option<u32>,
    /// Replaces the age limit; `0` removes it.
    pub max_age_hours: Option<u32>,
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

const MAX_AGE_HOURS: u32 = 87_600;

fn check_max_age(hours: Option<u32>) -> Result<(), ApiError> {
    if hours.is_some_and(|h| !(1..=MAX_AGE_HOURS).contains(&h)) {
        return Err(ApiError::invalid(
            "max_age_hours",
            format!("must be 1..={MAX_AGE_HOURS}"),
        ));
    }
    Ok(())
}

fn check_retention(retention: u32) -> Result<(), ApiError> {
    if !(1..=MAX_RETENTION).contains(&retention) {
        return Err(ApiError::invalid(
            "retention",
            format!("must be 1..={MAX_RETENTION}"),
        ));
    }
    Ok(())
}

/// Each volume and VM visible to the caller, in `vdc_id`, named once; at
/// least one of either.
async fn check_targets(
    conn: &mut DbConnection,
    principal: &Principal,
    vdc_id: &str,
    volume_ids: &[String],
    vm_ids: &[String],
) -> Result<(), ApiError> {
    if volume_ids.is_empty() && vm_ids.is_empty() {
        return Err(ApiError::invalid(
            "volume_ids",
            "name volumes (volume_ids) or VMs (vm_ids) to back up",
        ));
    }
    for (field, kind, noun, ids) in [
        ("volume_ids", volumes::KIND, "volume", volume_ids),
        ("vm_ids", vms::KIND, "VM", vm_ids),
    ] {
        if ids.len() > MAX_VOLUMES {
            return Err(ApiError::invalid(field, format!("at most {MAX_VOLUMES}")));
        }
        for (i, id) in ids.iter().enumerate() {
            let field = format!("{field}[{i}]");
            if ids[..i].contains(id) {
                return Err(ApiError::invalid(field, "listed twice"));
            }
            let target = load(conn, principal, Family::Compute, Action::Read, kind, id)
                .await
                .map_err(|_| ApiError::invalid(field.clone(), format!("no {noun} {id}")))?;
            if target.meta.vdc_id.as_deref() != Some(vdc_id) {
                return Err(ApiError::invalid(field, "in another VDC than the policy"));
            }
        }
    }
    Ok(())
}

/// Whether any enabled policy is due at `now` (a read, so the agent takes
/// the write lock only when there is a round to run).
pub async fn any_due(conn: &mut DbConnection, now: i64) -> Result<bool, ApiError> {
    for policy in records::all(conn, KIND).await? {
        let spec: PolicySpec = policy.spec()?;
        if spec.enabled && spec.next_run_at.is_some_and(|at| at <= now) {
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
        if !spec.enabled || spec.next_run_at.is_none_or(|at| at > now) {
            continue;
        }
        let mut notes = Vec::new();
        let name = format!("{}-{now}", policy.meta.name);
        let new_backup = || NewBackup {
            name: &name,
            incremental: spec.incremental,
            description: format!("by backup policy {}", policy.meta.id),
            policy_id: Some(policy.meta.id.clone()),
        };
        for volume_id in &spec.volume_ids {
            let Some(volume) = records::get(conn, volumes::KIND, volume_id).await? else {
                notes.push(format!("{volume_id}: deleted"));
                continue;
            };
            let taken = backups::start_backup(conn, &volume, new_backup()).await;
            match taken {
                Ok(_) => notes.push(format!("{volume_id}: backup queued")),
                Err(ApiError::Conflict(why)) => notes.push(format!("{volume_id}: skipped, {why}")),
                Err(e) => return Err(e),
            }
            let pruned = prune(conn, &policy.meta.id, volume_id, Retention::of(&spec, now)).await?;
            if pruned > 0 {
                notes.push(format!("{volume_id}: {pruned} old backup(s) deleted"));
            }
        }
        for vm_id in &spec.vm_ids {
            let Some(vm) = records::get(conn, vms::KIND, vm_id).await? else {
                notes.push(format!("{vm_id}: deleted"));
                continue;
            };
            match vm_backups::start_vm_backup(conn, &vm, new_backup()).await {
                Ok(_) => notes.push(format!("{vm_id}: VM backup queued")),
                Err(ApiError::Conflict(why)) => notes.push(format!("{vm_id}: skipped, {why}")),
                Err(e) => return Err(e),
            }
            let pruned = prune_vm(conn, &policy.meta.id, vm_id, Retention::of(&spec, now)).await?;
            if pruned > 0 {
                notes.push(format!("{vm_id}: {pruned} old VM backup(s) deleted"));
            }
        }
        spec.last_run_at = Some(now);
        spec.next_run_at = Schedule::of_spec(&spec)?.after(now);
        if spec.next_run_at.is_none() {
            spec.enabled = false;
        }
        spec.last_result = notes.join("; ");
        records::observe(conn, KIND, &policy.meta.id, ACTIVE, Some(to_json(&spec)?)).await?;
        rounds += 1;
    }
    Ok(rounds)
}

/// A policy's retention at a round.
#[derive(Debug, Clone, Copy)]
struct Retention {
    keep: u32,
    /// Backups created before this (unix ms) are expired.
    expired_before: Option<i64>,
}

impl Retention {
    fn of(spec: &PolicySpec, now: i64) -> Retention {
        Retention {
            keep: spec.retention,
            expired_before: spec
                .max_age_hours
                .map(|h| now.saturating_sub(i64::from(h) * 3_600_000)),
        }
    }

    /// Which of `taken` (each with whether it is a full) to delete: those
    /// beyond the newest `keep` and those expired, but never the newest,
    /// nor a full (or an incremental between it and a kept one) that a
    /// kept incremental follows: the reference product's full-kept rule.
    /// `taken`: (created unix ms, backup, is a full).
    fn expired<T>(self, mut taken: Vec<(i64, T, bool)>) -> Vec<T> {
        taken.sort_by_key(|(created, _, _)| *created);
        let n = taken.len();
        let by_count = n.saturating_sub(usize::try_from(self.keep).unwrap_or(usize::MAX));
        let mut kept: Vec<bool> = taken
            .iter()
            .enumerate()
            .map(|(i, (created, _, _))| {
                i + 1 == n || (i >= by_count && self.expired_before.is_none_or(|t| *created >= t))
            })
            .collect();
        for i in (0..n).rev() {
            if kept[i] && !taken[i].2 {
                // Back to the full this incremental follows.
                let mut j = i;
                while j > 0 && !taken[j].2 {
                    j -= 1;
                    kept[j] = true;
                }
            }
        }
        taken
            .into_iter()
            .zip(kept)
            .filter_map(|((_, b, _), keep)| (!keep).then_some(b))
            .collect()
    }
}

/// Deletes the AVAILABLE backups `policy_id` took of `volume_id` that its
/// retention expires. The backup a round has just queued is not counted
/// until it is taken, so a failing backup never costs a good one: between
/// a round and the next there are `keep` + 1.
async fn prune(
    conn: &mut DbConnection,
    policy_id: &str,
    volume_id: &str,
    retention: Retention,
) -> Result<usize, ApiError> {
    let mut taken = Vec::new();
    for b in records::children(conn, backups::KIND, volume_id).await? {
        let spec: BackupSpec = b.spec()?;
        if b.meta.status == backups::AVAILABLE && spec.policy_id.as_deref() == Some(policy_id) {
            let full = spec.kind.as_deref() != Some("incremental");
            taken.push((b.meta.created_at, b, full));
        }
    }
    let expired = retention.expired(taken);
    for old in &expired {
        backups::start_delete(conn, old).await?;
    }
    Ok(expired.len())
}

/// As [`prune`], for the VM backups `policy_id` took of `vm_id` (each
/// counts as whole: the full-kept rule applies to each disk's own chain
/// of volume backups, not across VM backups).
async fn prune_vm(
    conn: &mut DbConnection,
    policy_id: &str,
    vm_id: &str,
    retention: Retention,
) -> Result<usize, ApiError> {
    let mut taken = Vec::new();
    for b in records::all(conn, vm_backups::KIND).await? {
        let spec: vm_backups::VmBackupSpec = b.spec()?;
        if b.meta.status == vm_backups::AVAILABLE
            && spec.vm_id == vm_id
            && spec.policy_id.as_deref() == Some(policy_id)
        {
            taken.push((b.meta.created_at, b, true));
        }
    }
    let expired = retention.expired(taken);
    for old in &expired {
        vm_backups::start_delete(conn, old).await?;
    }
    Ok(expired.len())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_policy, list_policies))
        .routes(routes!(get_policy, update_policy, delete_policy))
}

#[utoipa::path(post, path = "/backup-policies", tag = "compute", request_body = PolicyCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Created; an interval policy is due at once, a cron one at its next time, a single-time one at `once_at`", body = BackupPolicy),
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
    let schedule = Schedule::of(body.interval_seconds, body.cron.as_deref(), body.once_at)?;
    check_retention(body.retention)?;
    check_max_age(body.max_age_hours)?;
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let mut tx = state.store.begin_write().await?;
    referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    check_targets(&mut tx, &principal, &vdc_id, &body.volume_ids, &body.vm_ids).await?;
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
                vm_ids: body.vm_ids,
                interval_seconds: body.interval_seconds,
                cron: body.cron,
                once_at: body.once_at,
                retention: body.retention,
                max_age_hours: body.max_age_hours,
                incremental: body.incremental,
                enabled: body.enabled,
                next_run_at: schedule.first(now_ms(), None),
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
        (status = 200, description = "Updated; a new interval counts from the last round, a new cron pattern from now", body = BackupPolicy),
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
    if body.interval_seconds.is_some() || body.cron.is_some() || body.once_at.is_some() {
        let schedule = Schedule::of(body.interval_seconds, body.cron.as_deref(), body.once_at)?;
        let given = (body.interval_seconds, body.cron, body.once_at);
        if given != (spec.interval_seconds, spec.cron.clone(), spec.once_at) {
            spec.next_run_at = schedule.first(now_ms(), spec.last_run_at);
            (spec.interval_seconds, spec.cron, spec.once_at) = given;
        }
    }
    let retention = body.retention.unwrap_or(spec.retention);
    check_retention(retention)?;
    spec.retention = retention;
    if let Some(hours) = body.max_age_hours {
        spec.max_age_hours = (hours != 0).then_some(hours);
        check_max_age(spec.max_age_hours)?;
    }
    if body.volume_ids.is_some() || body.vm_ids.is_some() {
        let volume_ids = body.volume_ids.unwrap_or_else(|| spec.volume_ids.clone());
        let vm_ids = body.vm_ids.unwrap_or_else(|| spec.vm_ids.clone());
        let vdc_id = record.meta.vdc_id.clone().unwrap_or_default();
        check_targets(&mut tx, &principal, &vdc_id, &volume_ids, &vm_ids).await?;
        (spec.volume_ids, spec.vm_ids) = (volume_ids, vm_ids);
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

#[cfg(test)]
mod tests {
    use super::Retention;

    /// Backups 0.. taken an hour apart; `kinds`: F full, I incremental.
    fn expired(kinds: &str, keep: u32, max_age_hours: Option<i64>) -> Vec<usize> {
        const HOUR: i64 = 3_600_000;
        let now = kinds.len() as i64 * HOUR;
        let r = Retention {
            keep,
            expired_before: max_age_hours.map(|h| now - h * HOUR),
        };
        let taken = kinds
            .chars()
            .enumerate()
            .map(|(i, k)| ((i as i64 + 1) * HOUR, i, k == 'F'))
            .collect();
        let mut out = r.expired(taken);
        out.sort_unstable();
        out
    }

    #[test]
    fn count_age_newest_and_full_kept_rules() {
        assert_eq!(
            expired("FIIFI", 2, None),
            [0, 1, 2],
            "count: the newest chain stays"
        );
        assert_eq!(
            expired("FII", 1, None),
            Vec::<usize>::new(),
            "the kept incremental keeps its full"
        );
        assert_eq!(
            expired("FIFII", 2, None),
            [0, 1],
            "a full starts a new chain"
        );
        assert_eq!(expired("FIFI", 10, Some(1)), [0, 1], "age: older than 1 h");
        assert_eq!(
            expired("FIII", 10, Some(1)),
            Vec::<usize>::new(),
            "the full ages, its incrementals keep it"
        );
        assert_eq!(
            expired("FFFF", 10, Some(0)),
            [0, 1, 2],
            "the newest always stays"
        );
        assert_eq!(expired("", 1, Some(1)), Vec::<usize>::new());
    }
}
