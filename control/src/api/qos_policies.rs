//! `/qos-policies`: bandwidth limits and DSCP marking a VDC puts on its
//! ports and floating IPs (Neutron's QoS policies, with the rules as
//! fields). `ingress` limits what the port (floating IP) receives, `egress`
//! what it sends; the data plane meters each with a token bucket (rate +
//! burst) and drops over the rate; `dscp_mark` rewrites the DS field of
//! what a port sends (ports only). A policy in use cannot be deleted.

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
use super::floating_ips::{self, FloatingIpSpec};
use super::listing::{ListQuery, Page};
use super::networks::present;
use super::ports::PortSpec;
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, Record};
use super::respond::{
    begin_change, create_in_vdc, finish_delete, get_one, list_page, ok, referenced_vdc, target_vdc,
    Resource,
};
use super::AppState;
use crate::store::DbConnection;

pub const KIND: &str = "qos_policy";
const ACTIVE: &str = "ACTIVE";
/// The data plane's limits: rates keep its token arithmetic in `u64`, a
/// bucket must hold one maximum-size frame (1518 bytes) and at most 1 GiB.
const MAX_KBPS: u64 = 400_000_000;
const MIN_BURST_KBITS: u64 = 13;
const MAX_BURST_KBITS: u64 = (1 << 30) / 125;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BandwidthLimit {
    /// Sustained rate, kilobits (1000 bits) per second of Ethernet frames.
    pub max_kbps: u64,
    /// Bucket size in kilobits; defaults to 80 % of a second at the rate
    /// (Neutron's default), at least one maximum-size frame.
    pub max_burst_kbits: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct QosPolicySpec {
    pub description: String,
    pub ingress: Option<BandwidthLimit>,
    pub egress: Option<BandwidthLimit>,
    /// 0..=63, written into IP packets the port sends.
    pub dscp_mark: Option<u8>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QosPolicy {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: QosPolicySpec,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QosPolicyCreate {
    pub name: String,
    pub vdc_id: Option<String>,
    #[serde(default)]
    pub description: String,
    pub ingress: Option<BandwidthLimit>,
    pub egress: Option<BandwidthLimit>,
    pub dscp_mark: Option<u8>,
}

/// Fields given replace the policy's; `null` removes a limit or the mark.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QosPolicyUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub ingress: Option<Option<BandwidthLimit>>,
    #[serde(default, deserialize_with = "present")]
    pub egress: Option<Option<BandwidthLimit>>,
    #[serde(default, deserialize_with = "present")]
    pub dscp_mark: Option<Option<u8>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QosPolicyPage {
    pub items: Vec<QosPolicy>,
    pub next_cursor: Option<String>,
}

impl Resource for QosPolicy {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Network;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        Ok(QosPolicy {
            spec: record.spec()?,
            meta: record.meta,
        })
    }
}

/// Checks a limit and fills in its default burst.
fn resolve_limit(field: &str, limit: BandwidthLimit) -> Result<BandwidthLimit, ApiError> {
    if !(1..=MAX_KBPS).contains(&limit.max_kbps) {
        return Err(ApiError::invalid(
            format!("{field}.max_kbps"),
            format!("must be 1..={MAX_KBPS}"),
        ));
    }
    let burst = limit
        .max_burst_kbits
        .unwrap_or_else(|| (limit.max_kbps * 4 / 5).clamp(MIN_BURST_KBITS, MAX_BURST_KBITS));
    if !(MIN_BURST_KBITS..=MAX_BURST_KBITS).contains(&burst) {
        return Err(ApiError::invalid(
            format!("{field}.max_burst_kbits"),
            format!(
                "must be {MIN_BURST_KBITS}..={MAX_BURST_KBITS} (at least one 1518-byte frame, at most 1 GiB)"
            ),
        ));
    }
    Ok(BandwidthLimit {
        max_kbps: limit.max_kbps,
        max_burst_kbits: Some(burst),
    })
}

fn validate(spec: QosPolicySpec) -> Result<QosPolicySpec, ApiError> {
    check_description(&spec.description)?;
    if spec.ingress.is_none() && spec.egress.is_none() && spec.dscp_mark.is_none() {
        return Err(ApiError::invalid(
            "ingress",
            "the policy sets nothing: give ingress, egress or dscp_mark",
        ));
    }
    if spec.dscp_mark.is_some_and(|d| d > 63) {
        return Err(ApiError::invalid("dscp_mark", "must be 0..=63"));
    }
    Ok(QosPolicySpec {
        ingress: spec
            .ingress
            .map(|l| resolve_limit("ingress", l))
            .transpose()?,
        egress: spec
            .egress
            .map(|l| resolve_limit("egress", l))
            .transpose()?,
        ..spec
    })
}

/// The policy `id` for a port or floating IP of `vdc_id` (422 on `field`
/// otherwise); a floating IP's may not mark DSCP.
pub async fn check_reference(
    conn: &mut DbConnection,
    vdc_id: Option<&str>,
    field: &str,
    id: &str,
    for_floating_ip: bool,
) -> Result<(), ApiError> {
    let policy = match records::get(conn, KIND, id).await? {
        Some(p) if p.meta.vdc_id.as_deref() == vdc_id => p,
        _ => {
            return Err(ApiError::invalid(
                field,
                format!("no QoS policy {id} in this VDC"),
            ))
        }
    };
    let spec: QosPolicySpec = policy.spec()?;
    if for_floating_ip && spec.dscp_mark.is_some() {
        return Err(ApiError::invalid(
            field,
            "the policy marks DSCP, which is per port: floating IPs take only bandwidth limits",
        ));
    }
    Ok(())
}

/// Ports and floating IPs using the policy `id`: (ports, floating IPs).
async fn users(
    conn: &mut DbConnection,
    vdc_id: &str,
    id: &str,
) -> Result<(Vec<String>, Vec<String>), ApiError> {
    let mut ports = Vec::new();
    for p in records::in_vdc(conn, "port", vdc_id).await? {
        if p.spec::<PortSpec>()?.qos_policy_id.as_deref() == Some(id) {
            ports.push(p.meta.id);
        }
    }
    let mut fips = Vec::new();
    for f in records::in_vdc(conn, floating_ips::KIND, vdc_id).await? {
        if f.spec::<FloatingIpSpec>()?.qos_policy_id.as_deref() == Some(id) {
            fips.push(f.meta.name);
        }
    }
    Ok((ports, fips))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_qos_policy, list_qos_policies))
        .routes(routes!(
            get_qos_policy,
            update_qos_policy,
            delete_qos_policy
        ))
}

#[utoipa::path(post, path = "/qos-policies", tag = "networks", request_body = QosPolicyCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Stored", body = QosPolicy),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_qos_policy(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<QosPolicyCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Network, Action::Create)?;
    check_name("name", &body.name)?;
    let spec = validate(QosPolicySpec {
        description: body.description,
        ingress: body.ingress,
        egress: body.egress,
        dscp_mark: body.dscp_mark,
    })?;
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let mut tx = state.store.begin_write().await?;
    referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    create_in_vdc::<QosPolicy>(
        tx,
        "/api/v1/qos-policies",
        &vdc_id,
        &body.name,
        to_json(&spec)?,
        ACTIVE,
    )
    .await
}

#[utoipa::path(get, path = "/qos-policies", tag = "networks", params(ListQuery),
    responses((status = 200, description = "One page", body = QosPolicyPage)), security(("bearer" = [])))]
async fn list_qos_policies(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<QosPolicyPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<QosPolicy>(&state, &principal, &query).await?;
    Ok(Json(QosPolicyPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/qos-policies/{id}", tag = "networks", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The policy", body = QosPolicy),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_qos_policy(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<QosPolicy>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/qos-policies/{id}", tag = "networks", request_body = QosPolicyUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated; data planes apply it in place", body = QosPolicy),
        (status = 409, description = "A DSCP mark on a policy floating IPs use", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_qos_policy(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<QosPolicyUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<QosPolicy>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: QosPolicySpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(d) = body.description {
        spec.description = d;
    }
    if let Some(l) = body.ingress {
        spec.ingress = l;
    }
    if let Some(l) = body.egress {
        spec.egress = l;
    }
    if let Some(d) = body.dscp_mark {
        spec.dscp_mark = d;
    }
    let spec = validate(spec)?;
    if spec.dscp_mark.is_some() {
        let vdc = record.meta.vdc_id.clone().unwrap_or_default();
        if let Some(fip) = users(&mut tx, &vdc, &id).await?.1.first() {
            return Err(ApiError::Conflict(format!(
                "floating IP {fip} uses the policy, and DSCP marking is per port"
            )));
        }
    }
    let updated = records::update(&mut tx, &record, KIND, &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<QosPolicy>(updated)
}

#[utoipa::path(delete, path = "/qos-policies/{id}", tag = "networks",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "A port or floating IP uses it", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_qos_policy(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<QosPolicy>(&state, &principal, Action::Delete, &id, &headers).await?;
    let vdc = record.meta.vdc_id.clone().unwrap_or_default();
    let (ports, fips) = users(&mut tx, &vdc, &id).await?;
    if let Some(user) = ports.first().or(fips.first()) {
        return Err(ApiError::Conflict(format!("{user} uses the policy")));
    }
    finish_delete::<QosPolicy>(tx, &record).await
}
