//! `/ports`: a NIC's place on a subnet. The MAC is generated (locally
//! administered, unicast, unique); the fixed IP is given or allocated from
//! the subnet's pools, always inside the subnet and never the gateway, a
//! reserved address or another port's. PENDING until a data plane plugs it.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::store::DbConnection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::listing::{ListQuery, Page};
use super::networks::{as_u128, from_u128, usable, SubnetSpec, NOT_REALIZED};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record, PENDING};
use super::respond::{begin_change, created, finish_delete, get_one, list_page, ok, Resource};
use super::AppState;

pub const KIND: &str = "port";
/// OpenStack's locally administered prefix, so keel MACs are recognisable.
const MAC_PREFIX: [u8; 3] = [0xfa, 0x16, 0x3e];
const MAX_GROUPS: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PortSpec {
    pub subnet_id: String,
    pub vpc_id: String,
    pub mac_address: String,
    #[schema(value_type = String)]
    pub fixed_ip: IpAddr,
    pub security_group_ids: Vec<String>,
    pub description: String,
    /// The VM whose NIC this port is.
    #[serde(default)]
    pub device_id: Option<String>,
    /// keel made this port for its VM (a clone's NIC), so it goes when the
    /// VM is deleted; ports a user made stay, detached.
    #[serde(default)]
    pub delete_with_device: bool,
    /// Bandwidth limits and DSCP marking of the port (`/qos-policies`).
    #[serde(default)]
    pub qos_policy_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Port {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: PortSpec,
    pub status_reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortCreate {
    pub name: String,
    pub subnet_id: String,
    /// Allocated from the subnet's pools when absent.
    #[schema(value_type = Option<String>)]
    pub fixed_ip: Option<IpAddr>,
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    #[serde(default)]
    pub description: String,
    pub qos_policy_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub security_group_ids: Option<Vec<String>>,
    /// Sets the QoS policy; `null` removes it.
    #[serde(default, deserialize_with = "super::networks::present")]
    pub qos_policy_id: Option<Option<String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PortPage {
    pub items: Vec<Port>,
    pub next_cursor: Option<String>,
}

impl Resource for Port {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Network;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        // ACTIVE: a host's data plane serves it as a VM NIC (set by the agent).
        let status_reason = if record.meta.status == PENDING {
            NOT_REALIZED.into()
        } else {
            String::new()
        };
        Ok(Port {
            spec: record.spec()?,
            meta: record.meta,
            status_reason,
        })
    }
}

/// Whether any port of the group's VDC uses the group.
pub async fn group_in_use(conn: &mut DbConnection, group: &Record) -> Result<bool, ApiError> {
    let vdc = group.meta.vdc_id.as_deref().unwrap_or("");
    for port in records::in_vdc(conn, KIND, vdc).await? {
        let spec: PortSpec = port.spec()?;
        if spec.security_group_ids.contains(&group.meta.id) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Security groups must exist in the port's own VDC; `field` names the
/// list in refusals (`security_group_ids`, `nics[0].security_group_ids`).
pub(super) async fn check_groups(
    conn: &mut DbConnection,
    vdc_id: Option<&str>,
    field: &str,
    ids: &[String],
) -> Result<(), ApiError> {
    if ids.len() > MAX_GROUPS {
        return Err(ApiError::invalid(field, format!("at most {MAX_GROUPS}")));
    }
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            return Err(ApiError::invalid(format!("{field}[{i}]"), "listed twice"));
        }
        match records::get(conn, "security_group", id).await? {
            Some(g) if g.meta.vdc_id.as_deref() == vdc_id => {}
            _ => {
                return Err(ApiError::invalid(
                    format!("{field}[{i}]"),
                    format!("no security group {id} in the port's VDC"),
                ))
            }
        }
    }
    Ok(())
}

fn random_mac() -> String {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let [a, b, c] = MAC_PREFIX;
    format!(
        "{a:02x}:{b:02x}:{c:02x}:{:02x}:{:02x}:{:02x}",
        bytes[0], bytes[1], bytes[2]
    )
}

/// Picks the fixed IP: checks a requested one, or takes the first free
/// address of the pools. Work is bounded by the number of ports + 1 per pool.
pub(crate) fn choose_ip(
    subnet: &SubnetSpec,
    used: &HashSet<IpAddr>,
    requested: Option<IpAddr>,
    field: &str,
) -> Result<IpAddr, ApiError> {
    let taken = |ip: &IpAddr| {
        used.contains(ip) || subnet.reserved_ips.contains(ip) || subnet.gateway_ip == Some(*ip)
    };
    if let Some(ip) = requested {
        if !usable(&subnet.cidr, ip) {
            return Err(ApiError::invalid(
                field,
                format!("{ip} is not a host address inside {}", subnet.cidr),
            ));
        }
        if subnet.gateway_ip == Some(ip) {
            return Err(ApiError::invalid(
                field,
                format!("{ip} is the subnet's gateway"),
            ));
        }
        if subnet.reserved_ips.contains(&ip) {
            return Err(ApiError::invalid(field, format!("{ip} is reserved")));
        }
        if used.contains(&ip) {
            return Err(ApiError::Conflict(format!("{ip} is already in use")));
        }
        return Ok(ip);
    }
    for pool in &subnet.allocation_pools {
        let (start, end) = (as_u128(pool.start), as_u128(pool.end));
        let mut candidate = start;
        while candidate <= end {
            if let Some(ip) = from_u128(candidate, &subnet.cidr) {
                if !taken(&ip) {
                    return Ok(ip);
                }
            }
            candidate = match candidate.checked_add(1) {
                Some(c) => c,
                None => break,
            };
        }
    }
    Err(ApiError::Conflict(format!(
        "{} has no free address left in its pools",
        subnet.cidr
    )))
}

/// What a new port is made of besides its subnet.
pub struct NewPort<'a> {
    pub name: &'a str,
    /// Taken from the subnet's pools when absent.
    pub fixed_ip: Option<IpAddr>,
    /// Already checked to be groups of the subnet's VDC.
    pub security_group_ids: Vec<String>,
    pub description: String,
    pub device_id: Option<String>,
    /// See [`PortSpec::delete_with_device`].
    pub delete_with_device: bool,
    /// Already checked to be a policy of the subnet's VDC.
    pub qos_policy_id: Option<String>,
}

/// Stores a port on `subnet` with a free address and a MAC unique in its
/// VDC (for `POST /ports` and for the NICs of VM clones).
pub async fn insert_port(
    conn: &mut crate::store::DbConnection,
    subnet: &Record,
    new: NewPort<'_>,
) -> Result<Record, ApiError> {
    let subnet_spec: SubnetSpec = subnet.spec()?;
    // Only the addresses and MACs are needed: the database extracts them,
    // so a create does not parse every sibling port's spec.
    let backend = crate::store::backend_of(conn);
    let taken: Vec<(String,)> = sqlx::query_as(&format!(
        "SELECT {} FROM resources WHERE kind = $1 AND parent_id = $2",
        crate::store::json_text(backend, "spec", "fixed_ip")
    ))
    .bind(KIND)
    .bind(&subnet.meta.id)
    .fetch_all(&mut *conn)
    .await?;
    let used: HashSet<IpAddr> = taken.iter().filter_map(|(ip,)| ip.parse().ok()).collect();
    let fixed_ip = choose_ip(&subnet_spec, &used, new.fixed_ip, "fixed_ip")?;
    let mut mac_address = None;
    for _ in 0..8 {
        let candidate = random_mac();
        let (clash,): (i64,) = sqlx::query_as(&format!(
            "SELECT COUNT(*) FROM resources WHERE kind = $1 \
             AND vdc_id IS NOT DISTINCT FROM $2 AND {} = $3",
            crate::store::json_text(backend, "spec", "mac_address")
        ))
        .bind(KIND)
        .bind(subnet.meta.vdc_id.as_deref())
        .bind(&candidate)
        .fetch_one(&mut *conn)
        .await?;
        if clash == 0 {
            mac_address = Some(candidate);
            break;
        }
    }
    let mac_address =
        mac_address.ok_or_else(|| ApiError::Internal("no unique MAC after 8 tries".into()))?;
    let spec = PortSpec {
        subnet_id: subnet.meta.id.clone(),
        vpc_id: subnet_spec.vpc_id.clone(),
        mac_address,
        fixed_ip,
        security_group_ids: new.security_group_ids,
        description: new.description,
        device_id: new.device_id,
        delete_with_device: new.delete_with_device,
        qos_policy_id: new.qos_policy_id,
    };
    records::insert(
        conn,
        NewRecord {
            kind: KIND,
            vdc_id: subnet.meta.vdc_id.as_deref(),
            parent_id: Some(&subnet.meta.id),
            name: new.name,
            spec: to_json(&spec)?,
            status: PENDING,
        },
    )
    .await
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_port, list_ports))
        .routes(routes!(get_port, update_port, delete_port))
}

#[utoipa::path(post, path = "/ports", tag = "networks", request_body = PortCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Stored; PENDING until a data plane plugs it", body = Port),
        (status = 409, description = "Address taken or pool exhausted", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_port(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<PortCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Network, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    let mut tx = state.store.begin_write().await?;
    let subnet = match records::get(&mut tx, "subnet", &body.subnet_id).await? {
        Some(s) if principal.sees(s.meta.vdc_id.as_deref()) => s,
        _ => {
            return Err(ApiError::invalid(
                "subnet_id",
                format!("no subnet {}", body.subnet_id),
            ))
        }
    };
    check_groups(
        &mut tx,
        subnet.meta.vdc_id.as_deref(),
        "security_group_ids",
        &body.security_group_ids,
    )
    .await?;
    if let Some(q) = &body.qos_policy_id {
        super::qos_policies::check_reference(
            &mut tx,
            subnet.meta.vdc_id.as_deref(),
            "qos_policy_id",
            q,
            false,
        )
        .await?;
    }
    let record = insert_port(
        &mut tx,
        &subnet,
        NewPort {
            name: &body.name,
            fixed_ip: body.fixed_ip,
            security_group_ids: body.security_group_ids,
            description: body.description,
            device_id: None,
            delete_with_device: false,
            qos_policy_id: body.qos_policy_id,
        },
    )
    .await?;
    tx.commit().await?;
    let location = format!("/api/v1/ports/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(&location, revision, &Port::from_record(record)?))
}

#[utoipa::path(get, path = "/ports", tag = "networks", params(ListQuery),
    responses((status = 200, description = "One page; filter by subnet with parent_id", body = PortPage)), security(("bearer" = [])))]
async fn list_ports(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<PortPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<Port>(&state, &principal, &query).await?;
    Ok(Json(PortPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/ports/{id}", tag = "networks", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The port", body = Port),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_port(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<Port>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/ports/{id}", tag = "networks", request_body = PortUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated", body = Port),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_port(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<PortUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<Port>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: PortSpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(d) = body.description {
        check_description(&d)?;
        spec.description = d;
    }
    if let Some(groups) = body.security_group_ids {
        check_groups(
            &mut tx,
            record.meta.vdc_id.as_deref(),
            "security_group_ids",
            &groups,
        )
        .await?;
        spec.security_group_ids = groups;
    }
    if let Some(policy) = body.qos_policy_id {
        if let Some(q) = &policy {
            super::qos_policies::check_reference(
                &mut tx,
                record.meta.vdc_id.as_deref(),
                "qos_policy_id",
                q,
                false,
            )
            .await?;
        }
        spec.qos_policy_id = policy;
    }
    let updated = records::update(&mut tx, &record, KIND, &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<Port>(updated)
}

#[utoipa::path(delete, path = "/ports/{id}", tag = "networks",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted; its address is free again, its floating IP disassociated"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_port(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<Port>(&state, &principal, Action::Delete, &id, &headers).await?;
    if let Some(device) = record.spec::<PortSpec>()?.device_id {
        return Err(ApiError::Conflict(format!(
            "the port belongs to {device} (a VM's NIC or a load balancer's VIP); delete that first"
        )));
    }
    let vdc = record.meta.vdc_id.clone().unwrap_or_default();
    if let Some(session) = super::mirror_sessions::port_in_use(&mut tx, &vdc, &id).await? {
        return Err(ApiError::Conflict(format!(
            "mirror session {session} uses the port"
        )));
    }
    super::floating_ips::release_port(&mut tx, &id).await?;
    finish_delete::<Port>(tx, &record).await
}
