//! `/address-groups`: named lists of IPv4 and IPv6 CIDRs a VDC's
//! security-group rules match as their far end (`remote_address_group_id`;
//! Neutron's address groups). The data plane matches a rule against the
//! whole list at once (a prefix set); changing the list changes the
//! verdict of every rule naming the group at once, with no rule edit.
//!
//! Addresses are normalized (`10.0.0.1` → `10.0.0.1/32`, IPv6 in its
//! canonical text) and kept sorted; host bits set or a duplicate in one
//! body are refused naming the entry. `add-addresses` folds addresses the
//! group already has (retries are harmless), `remove-addresses` refuses
//! ones it does not have. A group a rule names cannot be deleted.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use ipnet::IpNet;
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

pub const KIND: &str = "address_group";
const ACTIVE: &str = "ACTIVE";
/// Far above real allow/deny lists, small enough to recompile at once.
pub const MAX_ADDRESSES: usize = 10_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct AddressGroupSpec {
    pub description: String,
    /// Sorted, canonical CIDRs (IPv4 and IPv6).
    #[schema(value_type = Vec<String>)]
    pub addresses: Vec<IpNet>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AddressGroup {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: AddressGroupSpec,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressGroupCreate {
    pub name: String,
    pub vdc_id: Option<String>,
    #[serde(default)]
    pub description: String,
    /// CIDRs or single addresses, IPv4 and IPv6 mixed.
    #[serde(default)]
    pub addresses: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressGroupUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Replaces the whole list.
    pub addresses: Option<Vec<String>>,
}

/// Body of `add-addresses` and `remove-addresses`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressChange {
    pub addresses: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AddressGroupPage {
    pub items: Vec<AddressGroup>,
    pub next_cursor: Option<String>,
}

impl Resource for AddressGroup {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Network;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        Ok(AddressGroup {
            spec: record.spec()?,
            meta: record.meta,
        })
    }
}

/// Parses and normalizes `addresses` (field `addresses[i]`); a duplicate
/// within the body is refused.
fn parse_addresses(addresses: &[String]) -> Result<Vec<IpNet>, ApiError> {
    if addresses.len() > MAX_ADDRESSES {
        return Err(ApiError::invalid(
            "addresses",
            format!("at most {MAX_ADDRESSES}"),
        ));
    }
    let mut parsed: Vec<IpNet> = Vec::with_capacity(addresses.len());
    for (i, text) in addresses.iter().enumerate() {
        let field = format!("addresses[{i}]");
        let net: IpNet = match text.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => text
                .parse::<std::net::IpAddr>()
                .map(IpNet::from)
                .map_err(|_| ApiError::invalid(&field, format!("{text:?} is not a CIDR")))?,
        };
        if net.trunc() != net {
            return Err(ApiError::invalid(
                field,
                format!("host bits set: did you mean {}?", net.trunc()),
            ));
        }
        if let Some(j) = parsed.iter().position(|p| *p == net) {
            return Err(ApiError::invalid(
                field,
                format!("{net} is given twice (also addresses[{j}])"),
            ));
        }
        parsed.push(net);
    }
    Ok(parsed)
}

fn sorted(mut addresses: Vec<IpNet>) -> Vec<IpNet> {
    addresses.sort();
    addresses
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_address_group, list_address_groups))
        .routes(routes!(
            get_address_group,
            update_address_group,
            delete_address_group
        ))
        .routes(routes!(add_addresses))
        .routes(routes!(remove_addresses))
}

#[utoipa::path(post, path = "/address-groups", tag = "networks", request_body = AddressGroupCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Stored", body = AddressGroup),
        (status = 422, description = "Invalid field (`addresses[i]` names the entry)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_address_group(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<AddressGroupCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Network, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    let spec = AddressGroupSpec {
        description: body.description,
        addresses: sorted(parse_addresses(&body.addresses)?),
    };
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let mut tx = state.store.begin_write().await?;
    referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    create_in_vdc::<AddressGroup>(
        tx,
        "/api/v1/address-groups",
        &vdc_id,
        &body.name,
        to_json(&spec)?,
        ACTIVE,
    )
    .await
}

#[utoipa::path(get, path = "/address-groups", tag = "networks", params(ListQuery),
    responses((status = 200, description = "One page", body = AddressGroupPage)), security(("bearer" = [])))]
async fn list_address_groups(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<AddressGroupPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<AddressGroup>(&state, &principal, &query).await?;
    Ok(Json(AddressGroupPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/address-groups/{id}", tag = "networks", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The address group", body = AddressGroup),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_address_group(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<AddressGroup>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/address-groups/{id}", tag = "networks", request_body = AddressGroupUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated; rules naming the group follow at once", body = AddressGroup),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_address_group(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<AddressGroupUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<AddressGroup>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: AddressGroupSpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(d) = body.description {
        check_description(&d)?;
        spec.description = d;
    }
    if let Some(addresses) = body.addresses {
        spec.addresses = sorted(parse_addresses(&addresses)?);
    }
    let updated = records::update(&mut tx, &record, KIND, &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<AddressGroup>(updated)
}

/// Applies `change` to the group's addresses (no `If-Match`: the change
/// names what it adds or removes, as Neutron's actions do).
async fn change_addresses(
    state: &AppState,
    principal: &Principal,
    id: &str,
    change: impl FnOnce(&mut Vec<IpNet>) -> Result<(), ApiError>,
) -> Result<Response, ApiError> {
    let mut tx = state.store.begin_write().await?;
    let record = super::respond::load(
        &mut tx,
        principal,
        Family::Network,
        Action::Update,
        KIND,
        id,
    )
    .await?;
    let mut spec: AddressGroupSpec = record.spec()?;
    change(&mut spec.addresses)?;
    if spec.addresses.len() > MAX_ADDRESSES {
        return Err(ApiError::invalid(
            "addresses",
            format!("the group would hold more than {MAX_ADDRESSES}"),
        ));
    }
    spec.addresses.sort();
    let name = record.meta.name.clone();
    let updated = records::update(&mut tx, &record, KIND, &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<AddressGroup>(updated)
}

#[utoipa::path(post, path = "/address-groups/{id}/actions/add-addresses", tag = "networks", request_body = AddressChange,
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "Added (addresses already in the group are folded)", body = AddressGroup),
        (status = 422, description = "Invalid address (`addresses[i]`)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn add_addresses(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<AddressChange>,
) -> Result<Response, ApiError> {
    let added = parse_addresses(&body.addresses)?;
    change_addresses(&state, &principal, &id, |addresses| {
        for net in added {
            if !addresses.contains(&net) {
                addresses.push(net);
            }
        }
        Ok(())
    })
    .await
}

#[utoipa::path(post, path = "/address-groups/{id}/actions/remove-addresses", tag = "networks", request_body = AddressChange,
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "Removed", body = AddressGroup),
        (status = 422, description = "Invalid address or not in the group (`addresses[i]`)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn remove_addresses(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<AddressChange>,
) -> Result<Response, ApiError> {
    let removed = parse_addresses(&body.addresses)?;
    change_addresses(&state, &principal, &id, |addresses| {
        for (i, net) in removed.iter().enumerate() {
            let Some(at) = addresses.iter().position(|a| a == net) else {
                return Err(ApiError::invalid(
                    format!("addresses[{i}]"),
                    format!("{net} is not in the group"),
                ));
            };
            addresses.remove(at);
        }
        Ok(())
    })
    .await
}

#[utoipa::path(delete, path = "/address-groups/{id}", tag = "networks",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "A security group's rule names it (the message names the group)", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_address_group(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<AddressGroup>(&state, &principal, Action::Delete, &id, &headers).await?;
    let vdc = record.meta.vdc_id.clone().unwrap_or_default();
    if let Some(sg) = super::security_groups::rule_user(&mut tx, &vdc, |r| {
        r.remote_address_group_id.as_deref() == Some(id.as_str())
    })
    .await?
    {
        return Err(ApiError::Conflict(format!(
            "security group {sg} has rules with address group {id} as remote"
        )));
    }
    finish_delete::<AddressGroup>(tx, &record).await
}
