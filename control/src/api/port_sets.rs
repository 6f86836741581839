//! `/port-sets`: keel's named port sets. A list of destination ports and
//! port ranges (protocol-independent: the rule naming the set says TCP or
//! UDP) that security-group rules match with `port_set_id` instead of one
//! `port_range_min`/`port_range_max`. The data plane matches a rule
//! against the whole list at once (a set of port intervals); changing the
//! list changes the verdict of every rule naming the set at once.
//!
//! Ranges are kept sorted; an empty range (`min > max`), port 0, or two
//! overlapping ranges are refused naming the entry. A set a rule names
//! cannot be deleted.

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
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, Record};
use super::respond::{
    begin_change, create_in_vdc, finish_delete, get_one, list_page, ok, referenced_vdc, target_vdc,
    Resource,
};
use super::AppState;

pub const KIND: &str = "port_set";
const ACTIVE: &str = "ACTIVE";
/// Far above real service lists, small enough to recompile at once.
pub const MAX_RANGES: usize = 1000;

/// An inclusive port range; `min == max` for one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct PortSetSpec {
    pub description: String,
    /// Sorted, disjoint.
    pub ports: Vec<PortRange>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PortSet {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: PortSetSpec,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortSetCreate {
    pub name: String,
    pub vdc_id: Option<String>,
    #[serde(default)]
    pub description: String,
    /// At least one range, e.g. `[{"min":80,"max":80},{"min":8000,"max":8099}]`.
    pub ports: Vec<PortRange>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortSetUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Replaces the whole list.
    pub ports: Option<Vec<PortRange>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PortSetPage {
    pub items: Vec<PortSet>,
    pub next_cursor: Option<String>,
}

impl Resource for PortSet {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Network;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        Ok(PortSet {
            spec: record.spec()?,
            meta: record.meta,
        })
    }
}

/// Checks `ports` (field `ports[i]`) and sorts them.
fn validate_ports(ports: &[PortRange]) -> Result<Vec<PortRange>, ApiError> {
    if ports.is_empty() {
        return Err(ApiError::invalid("ports", "give at least one port range"));
    }
    if ports.len() > MAX_RANGES {
        return Err(ApiError::invalid("ports", format!("at most {MAX_RANGES}")));
    }
    for (i, r) in ports.iter().enumerate() {
        if r.min == 0 || r.min > r.max {
            return Err(ApiError::invalid(
                format!("ports[{i}].min"),
                format!("must be 1..=max ({})", r.max),
            ));
        }
        if let Some(j) = ports[..i]
            .iter()
            .position(|o| o.min <= r.max && r.min <= o.max)
        {
            return Err(ApiError::invalid(
                format!("ports[{i}]"),
                format!("{}-{} overlaps ports[{j}]", r.min, r.max),
            ));
        }
    }
    let mut sorted = ports.to_vec();
    sorted.sort();
    Ok(sorted)
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_port_set, list_port_sets))
        .routes(routes!(get_port_set, update_port_set, delete_port_set))
}

#[utoipa::path(post, path = "/port-sets", tag = "networks", request_body = PortSetCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Stored", body = PortSet),
        (status = 422, description = "Invalid field (`ports[i]` names the range)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_port_set(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<PortSetCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Network, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    let spec = PortSetSpec {
        description: body.description,
        ports: validate_ports(&body.ports)?,
    };
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let mut tx = state.store.begin_write().await?;
    referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    create_in_vdc::<PortSet>(
        tx,
        "/api/v1/port-sets",
        &vdc_id,
        &body.name,
        to_json(&spec)?,
        ACTIVE,
    )
    .await
}

#[utoipa::path(get, path = "/port-sets", tag = "networks", params(ListQuery),
    responses((status = 200, description = "One page", body = PortSetPage)), security(("bearer" = [])))]
async fn list_port_sets(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<PortSetPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<PortSet>(&state, &principal, &query).await?;
    Ok(Json(PortSetPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/port-sets/{id}", tag = "networks", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The port set", body = PortSet),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_port_set(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<PortSet>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/port-sets/{id}", tag = "networks", request_body = PortSetUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated; rules naming the set follow at once", body = PortSet),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_port_set(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<PortSetUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<PortSet>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: PortSetSpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(d) = body.description {
        check_description(&d)?;
        spec.description = d;
    }
    if let Some(ports) = body.ports {
        spec.ports = validate_ports(&ports)?;
    }
    let updated = records::update(&mut tx, &record, KIND, &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<PortSet>(updated)
}

#[utoipa::path(delete, path = "/port-sets/{id}", tag = "networks",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "A security group's rule names it (the message names the group)", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_port_set(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<PortSet>(&state, &principal, Action::Delete, &id, &headers).await?;
    let vdc = record.meta.vdc_id.clone().unwrap_or_default();
    if let Some(sg) = super::security_groups::rule_user(&mut tx, &vdc, |r| {
        r.port_set_id.as_deref() == Some(id.as_str())
    })
    .await?
    {
        return Err(ApiError::Conflict(format!(
            "security group {sg} has rules with port set {id}"
        )));
    }
    finish_delete::<PortSet>(tx, &record).await
}
