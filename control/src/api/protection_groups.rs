//! `/protection-groups`: disaster recovery of VMs by continuous data
//! protection. A group holds VMs (all their disks) that replicate together
//! in one write order to a replica at the DR site, with an RPO and an
//! optional bandwidth cap.
//!
//! Starting protection makes the host agent serve the members' disks from
//! one `keel cdp source` process (journal + shipper; a running VM's QEMU
//! reconnects to it) that first copies every disk in full, then ships a
//! sealed journal segment every RPO. Stopping goes back to one
//! `keel vhost-blk` per disk. The host agent creates the group's site CA and
//! certificates when it first sees the group; the DR site's replica takes
//! its side from `GET /protection-groups/{id}/replica-credentials`.
//!
//! The group is not changed or deleted while it protects: its journal's
//! disk order is fixed for as long as it runs, and so is each member's
//! disk set (attach/detach on members is refused until protection stops).

use std::net::SocketAddr;

use crate::store::DbConnection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::listing::{ListQuery, Page};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record};
use super::respond::{
    begin_change, created, finish_delete, get_one, list_page, load, load_for_action, ok,
    referenced_vdc, target_vdc, Resource,
};
use super::tasks::{self, Task};
use super::vms::{self, VmSpec};
use super::AppState;

pub const KIND: &str = "protection_group";
/// Not replicating (created, or stopped).
pub const UNPROTECTED: &str = "UNPROTECTED";
/// The start task runs.
pub const STARTING: &str = "STARTING";
/// The source serves the disks and ships to the replica (`observed` has
/// the lag; `status_reason` says when the replica is not reached).
pub const PROTECTING: &str = "PROTECTING";
/// The stop task runs.
pub const STOPPING: &str = "STOPPING";
/// Protection should run but the source does not (`status_reason`).
pub const ERROR: &str = "ERROR";

/// RPO bounds of the journal (seconds).
pub const RPO_MIN: u64 = 1;
pub const RPO_MAX: u64 = 86_400;
const MAX_MEMBERS: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// A VM of the group's VDC, with its disks.
    pub vm_id: String,
    /// Boot order at the DR site: 1 first .. 5 last.
    #[serde(default = "first")]
    #[schema(minimum = 1, maximum = 5)]
    pub boot_priority: u8,
}

fn first() -> u8 {
    1
}

/// The replica's side of the group's mutual TLS, and the numbers the
/// replica checks every segment against.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaCredentials {
    /// `keel cdp replica --group`.
    pub group_number: u64,
    /// `keel cdp replica --source-site`.
    pub source_site: u64,
    /// Name in the replica's certificate (the source checks it).
    pub server_name: String,
    /// The group's site CA (`--ca`).
    pub ca_pem: String,
    /// The replica's certificate (`--cert`).
    pub cert_pem: String,
    /// The replica's private key (`--key`).
    pub key_pem: String,
}

/// A protected disk: its number in the group's journal (the replica's
/// `disk-<index>.raw`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PairedDisk {
    pub index: u16,
    /// The volume at the protected site.
    pub volume_id: String,
    pub size_bytes: u64,
}

/// A protected VM as the DR site recreates it at failover.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PairedVm {
    /// The VM at the protected site.
    pub vm_id: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub firmware: super::images::Firmware,
    pub cpu_arch: String,
    pub boot_priority: u8,
    /// Boot disk first.
    pub disks: Vec<PairedDisk>,
}

/// Everything the DR site needs to receive a group and fail it over: the
/// replica's credentials and the protected VMs with their disk numbers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicaPairing {
    pub credentials: ReplicaCredentials,
    pub vms: Vec<PairedVm>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProtectionGroupSpec {
    pub description: String,
    pub mode: String,
    pub rpo_seconds: u64,
    #[serde(default = "default_sync_timeout")]
    pub sync_timeout_seconds: u64,
    pub max_mbit: Option<u64>,
    pub replica_address: String,
    pub replica_server_name: String,
    pub members: Vec<Member>,
    /// Desired: the members' disks replicate.
    pub protecting: bool,
    /// Written by the host agent once it made the group's certificates.
    #[serde(default)]
    pub credentials: Option<ReplicaCredentials>,
    /// The source's shipping status as the agent last read it.
    #[serde(default)]
    pub observed: Option<Value>,
    #[serde(default)]
    pub status_reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProtectionGroup {
    #[serde(flatten)]
    pub meta: Meta,
    pub description: String,
    /// `async` (RPO ≥ 1 s) or `sync` (RPO 0: a guest write completes only
    /// once the DR site has it durably).
    pub mode: String,
    pub rpo_seconds: u64,
    /// `sync`: after this long without an acknowledgement from the DR
    /// site, writes go on asynchronously (`observed.replication`
    /// `sync-fallback`) until the replica caught up.
    pub sync_timeout_seconds: u64,
    /// Shipping bandwidth cap.
    pub max_mbit: Option<u64>,
    /// The DR site's `keel cdp replica` listener (IP:port).
    pub replica_address: String,
    pub replica_server_name: String,
    pub members: Vec<Member>,
    pub protecting: bool,
    /// The consistency group number the replica checks.
    pub group_number: u64,
    /// Whether `replica-credentials` can be fetched yet.
    pub credentials_ready: bool,
    /// Shipping status of the source: `lag_seconds` (age of the newest
    /// point the DR site has), `resyncing`, `last_sealed_seq`,
    /// `last_acked_seq`, `bytes_sent`, `mode` (journal or dirty bitmap), ...
    #[schema(value_type = Option<Object>)]
    pub observed: Option<Value>,
    pub status_reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProtectionGroupCreate {
    pub name: String,
    /// Owning VDC; tenants may omit it. Ignored on replace.
    pub vdc_id: Option<String>,
    #[serde(default)]
    pub description: String,
    /// `async` (default) or `sync`.
    #[serde(default = "async_mode")]
    pub mode: String,
    /// 1 .. 86400, default 30. In `sync` mode the period of the heartbeat
    /// segments the lag is measured with.
    #[serde(default = "default_rpo")]
    #[schema(minimum = 1, maximum = 86400)]
    pub rpo_seconds: u64,
    /// `sync` only: 1 .. 300, default 10.
    #[serde(default = "default_sync_timeout")]
    #[schema(minimum = 1, maximum = 300)]
    pub sync_timeout_seconds: u64,
    /// Shipping bandwidth cap in Mbit/s.
    #[schema(minimum = 1)]
    pub max_mbit: Option<u64>,
    /// The DR site's replica listener, IP:port.
    pub replica_address: String,
    /// Name in the replica's certificate (default `keel-replica`).
    #[serde(default = "default_server_name")]
    pub replica_server_name: String,
    pub members: Vec<Member>,
}

fn async_mode() -> String {
    "async".into()
}
fn default_rpo() -> u64 {
    30
}
fn default_sync_timeout() -> u64 {
    10
}
fn default_server_name() -> String {
    "keel-replica".into()
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProtectionGroupPage {
    pub items: Vec<ProtectionGroup>,
    pub next_cursor: Option<String>,
}

/// The group's number in the journal and on the wire: stable, from its id.
pub fn group_number(id: &str) -> u64 {
    let hex: String = id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(15)
        .collect();
    u64::from_str_radix(&hex, 16).unwrap_or(1).max(1)
}

impl Resource for ProtectionGroup {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Compute;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        let spec: ProtectionGroupSpec = record.spec()?;
        Ok(ProtectionGroup {
            group_number: group_number(&record.meta.id),
            meta: record.meta,
            description: spec.description,
            mode: spec.mode,
            rpo_seconds: spec.rpo_seconds,
            sync_timeout_seconds: spec.sync_timeout_seconds,
            max_mbit: spec.max_mbit,
            replica_address: spec.replica_address,
            replica_server_name: spec.replica_server_name,
            members: spec.members,
            protecting: spec.protecting,
            credentials_ready: spec.credentials.is_some(),
            observed: spec.observed,
            status_reason: spec.status_reason,
        })
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_group, list_groups))
        .routes(routes!(get_group, replace_group, delete_group))
        .routes(routes!(group_action))
        .routes(routes!(replica_credentials))
}

/// Checks everything in the body that needs no store.
fn check_body(body: &ProtectionGroupCreate) -> Result<(), ApiError> {
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    match body.mode.as_str() {
        "async" | "sync" => {}
        other => {
            return Err(ApiError::invalid(
                "mode",
                format!("{other:?} is not a mode; use async or sync"),
            ))
        }
    }
    if !(1..=300).contains(&body.sync_timeout_seconds) {
        return Err(ApiError::invalid(
            "sync_timeout_seconds",
            "must be 1 .. 300",
        ));
    }
    if !(RPO_MIN..=RPO_MAX).contains(&body.rpo_seconds) {
        return Err(ApiError::invalid(
            "rpo_seconds",
            format!("must be {RPO_MIN} .. {RPO_MAX}"),
        ));
    }
    if body.max_mbit == Some(0) {
        return Err(ApiError::invalid("max_mbit", "must be at least 1"));
    }
    if body.replica_address.parse::<SocketAddr>().is_err() {
        return Err(ApiError::invalid(
            "replica_address",
            "must be an IP address and port, e.g. 198.18.0.2:7400",
        ));
    }
    let name_ok = (1..=253).contains(&body.replica_server_name.len())
        && body
            .replica_server_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
    if !name_ok {
        return Err(ApiError::invalid(
            "replica_server_name",
            "must be a DNS name: 1-253 letters, digits, '.' or '-'",
        ));
    }
    if body.members.is_empty() || body.members.len() > MAX_MEMBERS {
        return Err(ApiError::invalid(
            "members",
            format!("must hold 1 .. {MAX_MEMBERS} VMs"),
        ));
    }
    for (i, m) in body.members.iter().enumerate() {
        if !(1..=5).contains(&m.boot_priority) {
            return Err(ApiError::invalid(
                format!("members[{i}].boot_priority"),
                "must be 1 .. 5",
            ));
        }
        if body.members[..i].iter().any(|o| o.vm_id == m.vm_id) {
            return Err(ApiError::invalid(
                format!("members[{i}].vm_id"),
                "listed twice",
            ));
        }
    }
    Ok(())
}

/// The groups `vm_id` is a member of, other than `except`.
async fn groups_of(
    conn: &mut DbConnection,
    vm_id: &str,
    except: Option<&str>,
) -> Result<Vec<(Record, ProtectionGroupSpec)>, ApiError> {
    let mut found = Vec::new();
    for g in records::all(conn, KIND).await? {
        if Some(g.meta.id.as_str()) == except {
            continue;
        }
        let spec: ProtectionGroupSpec = g.spec()?;
        if spec.members.iter().any(|m| m.vm_id == vm_id) {
            found.push((g, spec));
        }
    }
    Ok(found)
}

/// Refuses `what` on a VM whose disks a group replicates (`always`: also
/// when the group is not protecting, for changes that would leave the
/// group pointing at nothing).
pub async fn refuse_if_member(
    conn: &mut DbConnection,
    vm_id: &str,
    what: &str,
    always: bool,
) -> Result<(), ApiError> {
    for (g, spec) in groups_of(conn, vm_id, None).await? {
        if always || spec.protecting || g.meta.status != UNPROTECTED {
            return Err(ApiError::Conflict(format!(
                "cannot {what} a VM that is a member of protection group {} ({}); {}",
                g.meta.id,
                g.meta.status,
                if always {
                    "remove it from the group first"
                } else {
                    "stop protection first"
                }
            )));
        }
    }
    Ok(())
}

/// Every member is a VM with disks in the group's VDC and in no other group.
async fn check_members(
    conn: &mut DbConnection,
    vdc_id: &str,
    group_id: &str,
    members: &[Member],
) -> Result<(), ApiError> {
    for (i, m) in members.iter().enumerate() {
        let field = format!("members[{i}].vm_id");
        let vm = match records::get(conn, vms::KIND, &m.vm_id).await? {
            Some(vm) if vm.meta.vdc_id.as_deref() == Some(vdc_id) => vm,
            _ => {
                return Err(ApiError::invalid(
                    field,
                    format!("no VM {} in VDC {vdc_id}", m.vm_id),
                ))
            }
        };
        let spec: VmSpec = vm.spec()?;
        if spec.volume_ids.is_empty() {
            return Err(ApiError::invalid(field, "the VM has no disks to protect"));
        }
        super::volumes::require_raw(conn, &spec.volume_ids, "continuous data protection").await?;
        if let Some((other, _)) = groups_of(conn, &m.vm_id, Some(group_id))
            .await?
            .into_iter()
            .next()
        {
            return Err(ApiError::Conflict(format!(
                "VM {} is already a member of protection group {}",
                m.vm_id, other.meta.id
            )));
        }
    }
    Ok(())
}

#[utoipa::path(post, path = "/protection-groups", tag = "compute", request_body = ProtectionGroupCreate,
    responses(
        (status = 201, description = "Stored UNPROTECTED; the host agent makes its certificates (credentials_ready)", body = ProtectionGroup),
        (status = 409, description = "A member is already in another group", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field (named): mode, RPO range, replica address, members", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_group(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<ProtectionGroupCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Compute, Action::Create)?;
    check_body(&body)?;
    let vdc_id = target_vdc(&principal, body.vdc_id.clone())?;
    let id = uuid::Uuid::new_v4().to_string();
    let mut tx = state.store.begin_write().await?;
    referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    check_members(&mut tx, &vdc_id, &id, &body.members).await?;
    let record = records::insert_with_id(
        &mut tx,
        &id,
        NewRecord {
            kind: KIND,
            vdc_id: Some(&vdc_id),
            parent_id: None,
            name: &body.name,
            spec: to_json(&ProtectionGroupSpec {
                description: body.description,
                mode: body.mode,
                rpo_seconds: body.rpo_seconds,
                sync_timeout_seconds: body.sync_timeout_seconds,
                max_mbit: body.max_mbit,
                replica_address: body.replica_address,
                replica_server_name: body.replica_server_name,
                members: body.members,
                protecting: false,
                credentials: None,
                observed: None,
                status_reason: String::new(),
            })?,
            status: UNPROTECTED,
        },
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    let location = format!("/api/v1/protection-groups/{id}");
    let revision = record.meta.revision;
    Ok(created(
        &location,
        revision,
        &ProtectionGroup::from_record(record)?,
    ))
}

#[utoipa::path(get, path = "/protection-groups", tag = "compute", params(ListQuery),
    responses((status = 200, description = "One page", body = ProtectionGroupPage)), security(("bearer" = [])))]
async fn list_groups(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<ProtectionGroupPage>, ApiError> {
    let Page { items, next_cursor } =
        list_page::<ProtectionGroup>(&state, &principal, &query).await?;
    Ok(Json(ProtectionGroupPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/protection-groups/{id}", tag = "compute", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The group with the source's shipping status", body = ProtectionGroup),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_group(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<ProtectionGroup>(&state, &principal, &id).await
}

#[utoipa::path(put, path = "/protection-groups/{id}", tag = "compute", request_body = ProtectionGroupCreate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Replaced", body = ProtectionGroup),
        (status = 409, description = "The group is not UNPROTECTED, or a member is in another group", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field (named)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn replace_group(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<ProtectionGroupCreate>,
) -> Result<Response, ApiError> {
    check_body(&body)?;
    let (mut tx, record) =
        begin_change::<ProtectionGroup>(&state, &principal, Action::Update, &id, &headers).await?;
    require_unprotected(&record, "change")?;
    let vdc_id = record.meta.vdc_id.clone().unwrap_or_default();
    check_members(&mut tx, &vdc_id, &id, &body.members).await?;
    let old: ProtectionGroupSpec = record.spec()?;
    let spec = ProtectionGroupSpec {
        description: body.description,
        mode: body.mode,
        rpo_seconds: body.rpo_seconds,
        sync_timeout_seconds: body.sync_timeout_seconds,
        max_mbit: body.max_mbit,
        replica_address: body.replica_address,
        // The certificates name the replica: a new name needs new ones.
        credentials: old
            .credentials
            .filter(|c| c.server_name == body.replica_server_name),
        replica_server_name: body.replica_server_name,
        members: body.members,
        protecting: false,
        observed: old.observed,
        status_reason: String::new(),
    };
    let updated = records::update(&mut tx, &record, KIND, &body.name, to_json(&spec)?).await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    ok::<ProtectionGroup>(updated)
}

fn require_unprotected(record: &Record, what: &str) -> Result<(), ApiError> {
    if record.meta.status == UNPROTECTED {
        Ok(())
    } else {
        Err(ApiError::Conflict(format!(
            "cannot {what} a protection group that is {}; stop protection first",
            record.meta.status
        )))
    }
}

#[utoipa::path(delete, path = "/protection-groups/{id}", tag = "compute",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted (the host agent removes its journal and certificates)"),
        (status = 409, description = "The group is not UNPROTECTED", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_group(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (tx, record) =
        begin_change::<ProtectionGroup>(&state, &principal, Action::Delete, &id, &headers).await?;
    require_unprotected(&record, "delete")?;
    let done = finish_delete::<ProtectionGroup>(tx, &record).await;
    state.changes.notify_waiters();
    done
}

#[utoipa::path(post, path = "/protection-groups/{id}/actions/{action}", tag = "compute",
    params(("id" = String, Path), ("action" = String, Path, description = "start (full copy, then a journal segment every RPO) or stop")),
    responses(
        (status = 202, description = "Queued; the task (Location) reports the outcome", body = Task),
        (status = 404, description = "No such group or action", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not allowed in the group's status (the allowed ones are named), or a task runs on it", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn group_action(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (allowed, next, protecting): (&[&str], &str, bool) = match action.as_str() {
        "start" => (&[UNPROTECTED, ERROR], STARTING, true),
        "stop" => (&[PROTECTING, ERROR], STOPPING, false),
        _ => return Err(ApiError::NotFound),
    };
    let mut tx = state.store.begin_write().await?;
    let record = load_for_action::<ProtectionGroup>(
        &mut tx,
        &principal,
        "protection group",
        &id,
        &action,
        allowed,
    )
    .await?;
    let mut spec: ProtectionGroupSpec = record.spec()?;
    if protecting {
        let vdc_id = record.meta.vdc_id.clone().unwrap_or_default();
        check_members(&mut tx, &vdc_id, &id, &spec.members).await?;
    }
    spec.protecting = protecting;
    spec.status_reason = String::new();
    records::observe(&mut tx, KIND, &id, next, Some(to_json(&spec)?)).await?;
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

#[utoipa::path(get, path = "/protection-groups/{id}/replica-credentials", tag = "compute",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "What the DR site needs (pass it whole to its `POST /replica-groups` as `pairing`): group number, source site, server name, CA, the replica's certificate and private key (PEM), and the protected VMs with their disk numbers. Needs update rights on the group.", body = ReplicaPairing),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The host agent has not made the group's certificates yet", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn replica_credentials(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<ReplicaPairing>, ApiError> {
    let mut conn = state.store.pool().acquire().await?;
    let record = load(
        &mut conn,
        &principal,
        Family::Compute,
        Action::Update,
        KIND,
        &id,
    )
    .await?;
    let spec: ProtectionGroupSpec = record.spec()?;
    let credentials = spec.credentials.clone().ok_or_else(|| {
        ApiError::Conflict(
            "the host agent has not made this group's certificates yet; retry in a second".into(),
        )
    })?;
    Ok(Json(ReplicaPairing {
        credentials,
        vms: protected_vms(&mut conn, &spec).await?,
    }))
}

/// The members with their disks numbered in journal order (every disk of
/// every member, in member order): the one definition of the disk order
/// the source journals and the replica's files follow.
pub async fn protected_vms(
    conn: &mut DbConnection,
    spec: &ProtectionGroupSpec,
) -> Result<Vec<PairedVm>, ApiError> {
    let mut vms_out = Vec::with_capacity(spec.members.len());
    let mut index: u16 = 0;
    for m in &spec.members {
        let vm = records::get(conn, vms::KIND, &m.vm_id)
            .await?
            .ok_or_else(|| ApiError::Conflict(format!("member VM {} is gone", m.vm_id)))?;
        let vspec: VmSpec = vm.spec()?;
        let mut disks = Vec::with_capacity(vspec.volume_ids.len());
        for v in &vspec.volume_ids {
            let size_bytes = match records::get(conn, super::volumes::KIND, v).await? {
                Some(r) => r.spec::<super::volumes::VolumeSpec>()?.size_bytes,
                None => return Err(ApiError::Conflict(format!("volume {v} is gone"))),
            };
            disks.push(PairedDisk {
                index,
                volume_id: v.clone(),
                size_bytes,
            });
            index = index
                .checked_add(1)
                .ok_or_else(|| ApiError::Conflict("too many disks in one group".into()))?;
        }
        vms_out.push(PairedVm {
            vm_id: m.vm_id.clone(),
            name: vm.meta.name.clone(),
            vcpus: vspec.vcpus,
            memory_mib: vspec.memory_mib,
            firmware: vspec.firmware,
            cpu_arch: vspec.cpu_arch.clone(),
            boot_priority: m.boot_priority,
            disks,
        });
    }
    Ok(vms_out)
}
