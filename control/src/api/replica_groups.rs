//! `/replica-groups`: the DR site's side of a protection group. Created
//! from the pairing the protected site hands out
//! (`GET /protection-groups/{id}/replica-credentials`), it makes the host
//! agent run `keel cdp replica` on `listen_address`, which applies whole
//! journal segments only (the disks are always at a crash-consistent
//! point of the source) and keeps `keep` recovery points.
//!
//! Failover promotes the replica at the latest (or a chosen) recovery
//! point and turns it into ordinary resources of this site: a volume per
//! protected disk and a VM per protected VM, booted in boot-priority order.
//!
//! `network_mappings` name this site's subnet for each subnet the protected
//! NICs are on: failover gives each recovered VM a port per NIC there
//! (its old address when the subnet has it free).
//!
//! Reprotect and failback: after a failover the recovered VMs can be
//! protected back to the old primary (a protection group at this site).
//! There, a replica group created with `adopt_volumes` receives into the
//! original VMs' own volumes (stopped meanwhile; the source's first copy
//! only sends chunks whose digests differ), and its failover promotes
//! them in place and starts the original VMs again.

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
use super::protection_groups::{PairedVm, ReplicaPairing};
use super::records::{self, to_json, Meta, NewRecord, Record, PENDING};
use super::respond::{
    begin_change, created, finish_delete, get_one, list_page, load_for_action, referenced_vdc,
    target_vdc, Resource,
};
use super::tasks::{self, Task};
use super::vms::{self, VmSpec};
use super::volumes::{self, VolumeSpec};
use super::AppState;

pub const KIND: &str = "replica_group";
/// The replica listens and applies segments.
pub const RECEIVING: &str = "RECEIVING";
/// The replica does not run (`status_reason`).
pub const ERROR: &str = "ERROR";
/// The failover task runs.
pub const FAILING_OVER: &str = "FAILING_OVER";
/// Promoted: the disks are volumes of this site, the VMs run here.
pub const FAILED_OVER: &str = "FAILED_OVER";

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Failover {
    /// The recovery point (segment number) the disks hold.
    pub recovery_point: u64,
    /// The VMs made here, in boot order.
    pub vm_ids: Vec<String>,
    /// The volumes made here, by disk index.
    pub volume_ids: Vec<String>,
}

/// Where the NICs of one protected subnet go at failover.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkMapping {
    /// A subnet of the protected site (`pairing.vms[].nics[].subnet_id`).
    pub source_subnet_id: String,
    /// A subnet of this site, in the group's VDC.
    pub subnet_id: String,
}

/// This site's VMs and volumes an adopting replica group receives into.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Adopted {
    /// The original VMs, in the pairing's boot order.
    pub vm_ids: Vec<String>,
    /// Their volumes, by disk index.
    pub volume_ids: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaGroupSpec {
    pub description: String,
    pub listen_address: String,
    pub keep: usize,
    pub pairing: ReplicaPairing,
    #[serde(default)]
    pub adopted: Option<Adopted>,
    #[serde(default)]
    pub network_mappings: Vec<NetworkMapping>,
    /// The replica's status as the agent last read it.
    #[serde(default)]
    pub observed: Option<Value>,
    #[serde(default)]
    pub status_reason: String,
    #[serde(default)]
    pub failover: Option<Failover>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaGroup {
    #[serde(flatten)]
    pub meta: Meta,
    pub description: String,
    pub listen_address: String,
    /// Recovery points kept.
    pub keep: usize,
    pub group_number: u64,
    pub source_site: u64,
    /// The protected VMs this group recreates at failover.
    pub vms: Vec<PairedVm>,
    /// The replica's status: `last_seq`, `lag_seconds`, `consistent`,
    /// `recovery_points` (segment numbers failover can choose),
    /// `segments_applied`, `refused`, ...
    #[schema(value_type = Option<Object>)]
    pub observed: Option<Value>,
    pub status_reason: String,
    pub failover: Option<Failover>,
    /// Reprotect: the original VMs and volumes this group receives into.
    pub adopted: Option<Adopted>,
    pub network_mappings: Vec<NetworkMapping>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicaGroupCreate {
    pub name: String,
    /// Owning VDC (where failover puts the volumes and VMs); tenants may
    /// omit it.
    pub vdc_id: Option<String>,
    #[serde(default)]
    pub description: String,
    /// Where the replica listens for the source (IP:port of this host).
    pub listen_address: String,
    /// Recovery points to keep (1 .. 1000, default 16).
    #[serde(default = "default_keep")]
    #[schema(minimum = 1, maximum = 1000)]
    pub keep: usize,
    /// The protected site's `replica-credentials` answer, whole.
    pub pairing: ReplicaPairing,
    /// Reprotect: receive into the volumes of the VMs the paired VMs were
    /// failed over from (`pairing.vms[i].origin_vm_id`, VMs of this site,
    /// stopped, same disks), so only what differs is copied, and fail
    /// back by starting those VMs. Default false: new volumes.
    #[serde(default)]
    pub adopt_volumes: bool,
    /// A subnet of this site for every subnet the paired VMs' NICs are on
    /// (required when they have NICs; not with `adopt_volumes`, whose VMs
    /// keep their own).
    #[serde(default)]
    pub network_mappings: Vec<NetworkMapping>,
}

fn default_keep() -> usize {
    16
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    /// A recovery point from `observed.recovery_points`; the latest when
    /// absent.
    pub recovery_point: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaGroupPage {
    pub items: Vec<ReplicaGroup>,
    pub next_cursor: Option<String>,
}

impl Resource for ReplicaGroup {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Compute;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        let spec: ReplicaGroupSpec = record.spec()?;
        Ok(ReplicaGroup {
            meta: record.meta,
            description: spec.description,
            listen_address: spec.listen_address,
            keep: spec.keep,
            group_number: spec.pairing.credentials.group_number,
            source_site: spec.pairing.credentials.source_site,
            vms: spec.pairing.vms,
            observed: spec.observed,
            status_reason: spec.status_reason,
            failover: spec.failover,
            adopted: spec.adopted,
            network_mappings: spec.network_mappings,
        })
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_group, list_groups))
        .routes(routes!(get_group, delete_group))
        .routes(routes!(failover))
}

fn check_pem(field: &str, pem: &str, what: &str) -> Result<(), ApiError> {
    if pem.contains(&format!("-----BEGIN {what}")) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("must be a PEM {}", what.to_lowercase()),
        ))
    }
}

fn check_body(body: &ReplicaGroupCreate) -> Result<(), ApiError> {
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    if body.listen_address.parse::<SocketAddr>().is_err() {
        return Err(ApiError::invalid(
            "listen_address",
            "must be an IP address and port, e.g. 198.18.0.2:7400",
        ));
    }
    if !(1..=1000).contains(&body.keep) {
        return Err(ApiError::invalid("keep", "must be 1 .. 1000"));
    }
    let c = &body.pairing.credentials;
    check_pem("pairing.credentials.ca_pem", &c.ca_pem, "CERTIFICATE")?;
    check_pem("pairing.credentials.cert_pem", &c.cert_pem, "CERTIFICATE")?;
    check_pem("pairing.credentials.key_pem", &c.key_pem, "PRIVATE KEY")?;
    if body.pairing.vms.is_empty() {
        return Err(ApiError::invalid("pairing.vms", "no VMs to recover"));
    }
    let mut next: u16 = 0;
    for (i, vm) in body.pairing.vms.iter().enumerate() {
        check_name(&format!("pairing.vms[{i}].name"), &vm.name)?;
        if vm.disks.is_empty() {
            return Err(ApiError::invalid(
                format!("pairing.vms[{i}].disks"),
                "a VM needs its boot disk",
            ));
        }
        for (j, d) in vm.disks.iter().enumerate() {
            if d.index != next || d.size_bytes == 0 {
                return Err(ApiError::invalid(
                    format!("pairing.vms[{i}].disks[{j}]"),
                    format!("expected disk index {next} with a size"),
                ));
            }
            next = next.saturating_add(1);
        }
    }
    Ok(())
}

#[utoipa::path(post, path = "/replica-groups", tag = "compute", request_body = ReplicaGroupCreate,
    responses(
        (status = 201, description = "Stored PENDING; RECEIVING once the host's replica listens", body = ReplicaGroup),
        (status = 409, description = "Another replica group listens on that address or receives that group", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field (named)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_group(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<ReplicaGroupCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Compute, Action::Create)?;
    check_body(&body)?;
    let vdc_id = target_vdc(&principal, body.vdc_id.clone())?;
    let mut tx = state.store.begin_write().await?;
    referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    let adopted = if body.adopt_volumes {
        Some(adoptable(&mut tx, &vdc_id, &body.pairing).await?)
    } else {
        None
    };
    check_mappings(&mut tx, &vdc_id, &body).await?;
    for other in records::all(&mut tx, KIND).await? {
        if other.meta.status == FAILED_OVER {
            continue;
        }
        let o: ReplicaGroupSpec = other.spec()?;
        if o.listen_address == body.listen_address {
            return Err(ApiError::Conflict(format!(
                "replica group {} already listens on {}",
                other.meta.id, o.listen_address
            )));
        }
        if o.pairing.credentials.group_number == body.pairing.credentials.group_number
            && o.pairing.credentials.source_site == body.pairing.credentials.source_site
        {
            return Err(ApiError::Conflict(format!(
                "replica group {} already receives this protection group",
                other.meta.id
            )));
        }
        if let (Some(a), Some(b)) = (&o.adopted, &adopted) {
            if let Some(vm) = a.vm_ids.iter().find(|v| b.vm_ids.contains(v)) {
                return Err(ApiError::Conflict(format!(
                    "replica group {} already receives into VM {vm}",
                    other.meta.id
                )));
            }
        }
    }
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: KIND,
            vdc_id: Some(&vdc_id),
            parent_id: None,
            name: &body.name,
            spec: to_json(&ReplicaGroupSpec {
                description: body.description,
                listen_address: body.listen_address,
                keep: body.keep,
                pairing: body.pairing,
                adopted,
                network_mappings: body.network_mappings,
                observed: None,
                status_reason: String::new(),
                failover: None,
            })?,
            status: PENDING,
        },
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    let location = format!("/api/v1/replica-groups/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(
        &location,
        revision,
        &ReplicaGroup::from_record(record)?,
    ))
}

#[utoipa::path(get, path = "/replica-groups", tag = "compute", params(ListQuery),
    responses((status = 200, description = "One page", body = ReplicaGroupPage)), security(("bearer" = [])))]
async fn list_groups(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<ReplicaGroupPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<ReplicaGroup>(&state, &principal, &query).await?;
    Ok(Json(ReplicaGroupPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/replica-groups/{id}", tag = "compute", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The group with the replica's status and recovery points", body = ReplicaGroup),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_group(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<ReplicaGroup>(&state, &principal, &id).await
}

#[utoipa::path(delete, path = "/replica-groups/{id}", tag = "compute",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted: the replica stops and its data is removed (volumes and VMs of a failover stay)"),
        (status = 409, description = "A failover runs", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_group(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (tx, record) =
        begin_change::<ReplicaGroup>(&state, &principal, Action::Delete, &id, &headers).await?;
    if record.meta.status == FAILING_OVER {
        return Err(ApiError::Conflict(
            "a failover runs on this replica group".into(),
        ));
    }
    let done = finish_delete::<ReplicaGroup>(tx, &record).await;
    state.changes.notify_waiters();
    done
}

#[utoipa::path(post, path = "/replica-groups/{id}/actions/failover", tag = "compute",
    request_body = FailoverRequest, params(("id" = String, Path)),
    responses(
        (status = 202, description = "Queued: the replica stops and is promoted at the recovery point; its disks become volumes here and the VMs boot here by boot priority", body = Task),
        (status = 409, description = "Not RECEIVING or ERROR, or a task runs on it", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The recovery point is not held", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn failover(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<FailoverRequest>,
) -> Result<Response, ApiError> {
    let mut tx = state.store.begin_write().await?;
    let record = load_for_action::<ReplicaGroup>(
        &mut tx,
        &principal,
        "replica group",
        &id,
        "fail over",
        &[RECEIVING, ERROR],
    )
    .await?;
    let spec: ReplicaGroupSpec = record.spec()?;
    if let Some(point) = body.recovery_point {
        let held: Vec<u64> = spec
            .observed
            .as_ref()
            .and_then(|o| o["recovery_points"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        if !held.contains(&point) {
            return Err(ApiError::invalid(
                "recovery_point",
                format!("not a recovery point the replica holds; held: {held:?}"),
            ));
        }
    }
    records::observe(&mut tx, KIND, &id, FAILING_OVER, None).await?;
    let task = tasks::enqueue(
        &mut tx,
        record.meta.vdc_id.as_deref(),
        KIND,
        &id,
        "failover",
        serde_json::json!({ "recovery_point": body.recovery_point }),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

/// Every mapping names a paired NIC's subnet once and a subnet of this
/// site in `vdc_id`; every paired NIC's subnet is mapped.
async fn check_mappings(
    conn: &mut DbConnection,
    vdc_id: &str,
    body: &ReplicaGroupCreate,
) -> Result<(), ApiError> {
    let maps = &body.network_mappings;
    if body.adopt_volumes && !maps.is_empty() {
        return Err(ApiError::invalid(
            "network_mappings",
            "adopted VMs keep their own NICs: no mappings with adopt_volumes",
        ));
    }
    let nic_subnets: Vec<&str> = body
        .pairing
        .vms
        .iter()
        .flat_map(|vm| vm.nics.iter().map(|n| n.subnet_id.as_str()))
        .collect();
    for (i, m) in maps.iter().enumerate() {
        if maps[..i]
            .iter()
            .any(|o| o.source_subnet_id == m.source_subnet_id)
        {
            return Err(ApiError::invalid(
                format!("network_mappings[{i}].source_subnet_id"),
                "mapped twice",
            ));
        }
        if !nic_subnets.contains(&m.source_subnet_id.as_str()) {
            return Err(ApiError::invalid(
                format!("network_mappings[{i}].source_subnet_id"),
                format!("no protected NIC is on subnet {}", m.source_subnet_id),
            ));
        }
        match records::get(conn, "subnet", &m.subnet_id).await? {
            Some(s) if s.meta.vdc_id.as_deref() == Some(vdc_id) => {}
            _ => {
                return Err(ApiError::invalid(
                    format!("network_mappings[{i}].subnet_id"),
                    format!("no subnet {} in VDC {vdc_id}", m.subnet_id),
                ))
            }
        }
    }
    if body.adopt_volumes {
        return Ok(());
    }
    for (i, vm) in body.pairing.vms.iter().enumerate() {
        for (j, nic) in vm.nics.iter().enumerate() {
            if !maps.iter().any(|m| m.source_subnet_id == nic.subnet_id) {
                return Err(ApiError::invalid(
                    "network_mappings",
                    format!(
                        "pairing.vms[{i}].nics[{j}] is on subnet {}, which has no mapping",
                        nic.subnet_id
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The port a recovered VM's NIC `i` gets on its mapped subnet: the old
/// address when that subnet has it free, else one from its pools.
async fn recovered_port(
    conn: &mut DbConnection,
    spec: &ReplicaGroupSpec,
    vm: &PairedVm,
    i: usize,
    nic: &super::protection_groups::PairedNic,
    vm_id: &str,
) -> Result<String, ApiError> {
    let target = spec
        .network_mappings
        .iter()
        .find(|m| m.source_subnet_id == nic.subnet_id)
        .ok_or_else(|| ApiError::Conflict(format!("subnet {} has no mapping", nic.subnet_id)))?;
    let subnet = records::get(conn, "subnet", &target.subnet_id)
        .await?
        .ok_or_else(|| ApiError::Conflict(format!("subnet {} is gone", target.subnet_id)))?;
    let name = format!("{}-nic{i}", vm.name);
    let new = |fixed_ip| super::ports::NewPort {
        name: &name,
        fixed_ip,
        security_group_ids: Vec::new(),
        description: format!("NIC {i} of {}, recovered by a failover", vm.name),
        device_id: Some(vm_id.to_owned()),
        delete_with_device: true,
        qos_policy_id: None,
    };
    let port = match super::ports::insert_port(conn, &subnet, new(Some(nic.fixed_ip))).await {
        Ok(p) => p,
        Err(ApiError::InvalidField { .. } | ApiError::Conflict(_)) => {
            super::ports::insert_port(conn, &subnet, new(None)).await?
        }
        Err(e) => return Err(e),
    };
    Ok(port.meta.id)
}

/// The pairing's VMs in the order failover boots them (stable: equal
/// priorities keep the pairing's order).
pub fn boot_order(pairing: &ReplicaPairing) -> Vec<&PairedVm> {
    let mut order: Vec<&PairedVm> = pairing.vms.iter().collect();
    order.sort_by_key(|vm| vm.boot_priority);
    order
}

/// The VM at the other site that a failover here recovered `vm_id` from.
pub async fn failed_over_from(
    conn: &mut DbConnection,
    vm_id: &str,
) -> Result<Option<String>, ApiError> {
    for group in records::all(conn, KIND).await? {
        let spec: ReplicaGroupSpec = group.spec()?;
        let Some(done) = &spec.failover else {
            continue;
        };
        if let Some(pos) = done.vm_ids.iter().position(|v| v == vm_id) {
            return Ok(boot_order(&spec.pairing)
                .get(pos)
                .map(|vm| vm.vm_id.clone()));
        }
    }
    Ok(None)
}

/// The replica groups that receive into `vm_id`'s volumes right now.
pub async fn adopting(conn: &mut DbConnection, vm_id: &str) -> Result<Option<String>, ApiError> {
    for group in records::all(conn, KIND).await? {
        if group.meta.status == FAILED_OVER {
            continue;
        }
        let spec: ReplicaGroupSpec = group.spec()?;
        if spec
            .adopted
            .is_some_and(|a| a.vm_ids.iter().any(|v| v == vm_id))
        {
            return Ok(Some(group.meta.id));
        }
    }
    Ok(None)
}

/// Checks that every paired VM names a stopped VM of this site (in
/// `vdc_id`, in no protection group that protects, its disks matching the
/// pairing's) and returns what the group will receive into.
async fn adoptable(
    conn: &mut DbConnection,
    vdc_id: &str,
    pairing: &ReplicaPairing,
) -> Result<Adopted, ApiError> {
    let disks: usize = pairing.vms.iter().map(|vm| vm.disks.len()).sum();
    let mut volume_ids = vec![String::new(); disks];
    for (i, vm) in pairing.vms.iter().enumerate() {
        let field = format!("pairing.vms[{i}].origin_vm_id");
        let Some(origin) = &vm.origin_vm_id else {
            return Err(ApiError::invalid(
                field,
                "this VM was not failed over from another site: nothing to adopt",
            ));
        };
        let local = match records::get(conn, vms::KIND, origin).await? {
            Some(r) if r.meta.vdc_id.as_deref() == Some(vdc_id) => r,
            _ => {
                return Err(ApiError::invalid(
                    field,
                    format!("no VM {origin} in VDC {vdc_id}"),
                ))
            }
        };
        if local.meta.status != vms::STOPPED {
            return Err(ApiError::Conflict(format!(
                "VM {origin} is {}: stop it before its volumes receive the other site's data",
                local.meta.status
            )));
        }
        super::protection_groups::refuse_if_member(conn, origin, "adopt", false).await?;
        let lspec: VmSpec = local.spec()?;
        volumes::require_raw(conn, &lspec.volume_ids, "Receiving replicated data").await?;
        if lspec.volume_ids.len() != vm.disks.len() {
            return Err(ApiError::invalid(
                format!("pairing.vms[{i}].disks"),
                format!(
                    "VM {origin} has {} disks, the recovered VM {}",
                    lspec.volume_ids.len(),
                    vm.disks.len()
                ),
            ));
        }
        for (d, volume_id) in vm.disks.iter().zip(&lspec.volume_ids) {
            let vol = records::get(conn, volumes::KIND, volume_id)
                .await?
                .ok_or_else(|| ApiError::Conflict(format!("volume {volume_id} is gone")))?;
            let vspec: VolumeSpec = vol.spec()?;
            if vspec.size_bytes != d.size_bytes {
                return Err(ApiError::invalid(
                    format!("pairing.vms[{i}].disks[{}]", d.index),
                    format!(
                        "volume {volume_id} has {} bytes, the recovered disk {}",
                        vspec.size_bytes, d.size_bytes
                    ),
                ));
            }
            if let Some(slot) = volume_ids.get_mut(usize::from(d.index)) {
                slot.clone_from(volume_id);
            }
        }
    }
    let vm_ids = boot_order(pairing)
        .iter()
        .filter_map(|vm| vm.origin_vm_id.clone())
        .collect();
    Ok(Adopted { vm_ids, volume_ids })
}

/// The failover's resources, in one transaction with the group's
/// `failover` record (so a re-run of the task finds them instead of making
/// them twice): a volume per promoted disk, attached to a VM per protected
/// VM (CREATING, placed on a host), VMs in boot-priority order.
pub async fn failover_records(
    conn: &mut DbConnection,
    group: &Record,
    recovery_point: u64,
) -> Result<Failover, ApiError> {
    let spec: ReplicaGroupSpec = group.spec()?;
    if let Some(done) = spec.failover {
        return Ok(done);
    }
    if let Some(a) = spec.adopted {
        // Failback: the disks are the original volumes, the VMs the
        // original VMs.
        let done = Failover {
            recovery_point,
            vm_ids: a.vm_ids,
            volume_ids: a.volume_ids,
        };
        return record_failover(conn, &group.meta.id, done).await;
    }
    let vdc_id = group.meta.vdc_id.clone().unwrap_or_default();
    let order = boot_order(&spec.pairing);
    let mut volume_ids = vec![String::new(); order.iter().map(|vm| vm.disks.len()).sum()];
    let mut vm_ids = Vec::with_capacity(order.len());
    for vm in order {
        let host = super::hosts::place(conn, &vm.cpu_arch, vm.memory_mib, None).await?;
        let vm_id = uuid::Uuid::new_v4().to_string();
        let mut disks = Vec::with_capacity(vm.disks.len());
        for d in &vm.disks {
            let volume = records::insert(
                conn,
                NewRecord {
                    kind: volumes::KIND,
                    vdc_id: Some(&vdc_id),
                    parent_id: None,
                    name: &format!("{}-disk{}", vm.name, d.index),
                    spec: to_json(&VolumeSpec {
                        size_bytes: d.size_bytes,
                        image_id: None,
                        provisioning: "thin".into(),
                        format: volumes::RAW.into(),
                        cluster_size: None,
                        attached_to: Some(vm_id.clone()),
                        description: format!(
                            "failed over from volume {} (replica group {}, recovery point {recovery_point})",
                            d.volume_id, group.meta.id
                        ),
                        status_reason: String::new(),
                host_id: None,
                        purge_at: None,
                    })?,
                    status: volumes::IN_USE,
                },
            )
            .await?;
            if let Some(slot) = volume_ids.get_mut(usize::from(d.index)) {
                slot.clone_from(&volume.meta.id);
            }
            disks.push(volume.meta.id);
        }
        let mut port_ids = Vec::with_capacity(vm.nics.len());
        for (i, nic) in vm.nics.iter().enumerate() {
            port_ids.push(recovered_port(conn, &spec, vm, i, nic, &vm_id).await?);
        }
        records::insert_with_id(
            conn,
            &vm_id,
            NewRecord {
                kind: vms::KIND,
                vdc_id: Some(&vdc_id),
                parent_id: None,
                name: &vm.name,
                spec: to_json(&VmSpec {
                    vcpus: vm.vcpus,
                    memory_mib: vm.memory_mib,
                    firmware: vm.firmware,
                    cpu_arch: vm.cpu_arch.clone(),
                    volume_ids: disks,
                    port_ids,
                    host_id: host.meta.id.clone(),
                    vnc_port: None,
                    description: format!(
                        "failed over from VM {} (replica group {})",
                        vm.vm_id, group.meta.id
                    ),
                    status_reason: String::new(),
                })?,
                status: vms::CREATING,
            },
        )
        .await?;
        vm_ids.push(vm_id);
    }
    let done = Failover {
        recovery_point,
        vm_ids,
        volume_ids,
    };
    record_failover(conn, &group.meta.id, done).await
}

/// Stores what a failover made (or took over) in the group, so a re-run
/// finds it.
async fn record_failover(
    conn: &mut DbConnection,
    group_id: &str,
    done: Failover,
) -> Result<Failover, ApiError> {
    let record = done.clone();
    records::observe_spec(conn, KIND, group_id, None, |s: &mut ReplicaGroupSpec| {
        s.failover = Some(record);
    })
    .await?;
    Ok(done)
}
