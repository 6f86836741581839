//! `/security-groups`: per-VDC packet filters with their rules embedded
//! (rules change through PATCH of the group, guarded by `If-Match`, so a
//! rule set is replaced atomically). PENDING until a data plane enforces them.
//!
//! Rules allow by default (OpenStack's white list); `action: deny` with a
//! `priority` (higher first, deny before allow on a tie) makes black lists.
//! A rule's peers are a CIDR, the members of another group of the VDC
//! (`remote_group_id`, followed as membership changes) or the CIDRs of an
//! address group (`remote_address_group_id`, followed as its list
//! changes); its TCP/UDP ports one range or a port set (`port_set_id`).
//! Ingress that no rule allows is denied, egress that no rule denies is
//! allowed.

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
use super::extract::{check_description, check_name, check_port_range, ValidJson, ValidQuery};
use super::listing::{ListQuery, Page};
use super::networks::not_realized;
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record, PENDING};
use super::respond::{
    begin_change, created, finish_delete, get_one, list_page, ok, referenced_vdc, target_vdc,
    Resource,
};
use super::AppState;
use crate::store::DbConnection;

const KIND: &str = "security_group";
const MAX_RULES: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub direction: Direction,
    pub protocol: Protocol,
    /// TCP/UDP only; both or neither (or `port_set_id`).
    pub port_range_min: Option<u16>,
    pub port_range_max: Option<u16>,
    /// Peer addresses; absent means any (of the rule's family: any family).
    #[schema(value_type = Option<String>)]
    pub remote_cidr: Option<String>,
    /// Peers are the ports of this group (instead of `remote_cidr`).
    #[serde(default)]
    pub remote_group_id: Option<String>,
    /// Peers are the CIDRs of this address group of the rule's address
    /// family (instead of `remote_cidr` and `remote_group_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_address_group_id: Option<String>,
    /// TCP/UDP only: the destination ports of this port set (instead of
    /// `port_range_min`/`port_range_max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_set_id: Option<String>,
    /// ICMP only: the type, and with it optionally the code (ICMPv4 numbers;
    /// a rule with a type matches IPv4 unless its remote CIDR is IPv6).
    #[serde(default)]
    pub icmp_type: Option<u8>,
    #[serde(default)]
    pub icmp_code: Option<u8>,
    #[serde(default)]
    pub action: RuleAction,
    /// Higher first; deny wins a tie.
    #[serde(default)]
    pub priority: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    #[default]
    Allow,
    Deny,
}

impl Rule {
    /// Everything a packet is matched on (all but action and priority).
    fn same_match(&self, other: &Rule) -> bool {
        Rule {
            action: other.action,
            priority: other.priority,
            ..self.clone()
        } == *other
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SgSpec {
    pub description: String,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SecurityGroup {
    #[serde(flatten)]
    pub meta: Meta,
    pub description: String,
    pub rules: Vec<Rule>,
    pub status_reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupCreate {
    pub name: String,
    pub vdc_id: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Replaces the whole rule set.
    pub rules: Option<Vec<Rule>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SecurityGroupPage {
    pub items: Vec<SecurityGroup>,
    pub next_cursor: Option<String>,
}

fn validate_rules(rules: &[Rule]) -> Result<(), ApiError> {
    if rules.len() > MAX_RULES {
        return Err(ApiError::invalid("rules", format!("at most {MAX_RULES}")));
    }
    for (i, rule) in rules.iter().enumerate() {
        let field = |f: &str| format!("rules[{i}].{f}");
        let ports = matches!(rule.protocol, Protocol::Tcp | Protocol::Udp);
        check_port_range(field, ports, rule.port_range_min, rule.port_range_max)?;
        if rule.protocol != Protocol::Icmp && (rule.icmp_type.is_some() || rule.icmp_code.is_some())
        {
            return Err(ApiError::invalid(
                field("icmp_type"),
                "only for protocol icmp",
            ));
        }
        if rule.icmp_code.is_some() && rule.icmp_type.is_none() {
            return Err(ApiError::invalid(
                field("icmp_code"),
                "give icmp_type with it",
            ));
        }
        if rule.remote_cidr.is_some() && rule.remote_group_id.is_some() {
            return Err(ApiError::invalid(
                field("remote_group_id"),
                "give remote_cidr or remote_group_id, not both",
            ));
        }
        if rule.remote_address_group_id.is_some()
            && (rule.remote_cidr.is_some() || rule.remote_group_id.is_some())
        {
            return Err(ApiError::invalid(
                field("remote_address_group_id"),
                "give one of remote_cidr, remote_group_id and remote_address_group_id",
            ));
        }
        if rule.port_set_id.is_some() {
            if !ports {
                return Err(ApiError::invalid(
                    field("port_set_id"),
                    "ports only apply to tcp and udp",
                ));
            }
            if rule.port_range_min.is_some() || rule.port_range_max.is_some() {
                return Err(ApiError::invalid(
                    field("port_set_id"),
                    "give port_range_min/port_range_max or port_set_id, not both",
                ));
            }
        }
        if let Some(cidr) = &rule.remote_cidr {
            let net: IpNet = cidr.parse().map_err(|_| {
                ApiError::invalid(field("remote_cidr"), format!("{cidr:?} is not a CIDR"))
            })?;
            if net.trunc() != net {
                return Err(ApiError::invalid(
                    field("remote_cidr"),
                    format!("host bits set: did you mean {}?", net.trunc()),
                ));
            }
        }
    }
    for (i, rule) in rules.iter().enumerate() {
        if rules[..i].contains(rule) {
            return Err(ApiError::invalid(format!("rules[{i}]"), "duplicate rule"));
        }
        // The data plane refuses such a pair: say so here, precisely.
        if let Some(j) = rules[..i].iter().position(|o| {
            o.priority == rule.priority && o.action != rule.action && o.same_match(rule)
        }) {
            return Err(ApiError::invalid(
                format!("rules[{i}]"),
                format!("conflicts with rules[{j}]: same match and priority, opposite actions"),
            ));
        }
    }
    Ok(())
}

/// Remote groups, address groups and port sets must be of the same VDC.
async fn check_remote_groups(
    conn: &mut DbConnection,
    vdc_id: &str,
    rules: &[Rule],
) -> Result<(), ApiError> {
    for (i, rule) in rules.iter().enumerate() {
        let references = [
            (
                "remote_group_id",
                KIND,
                "security group",
                &rule.remote_group_id,
            ),
            (
                "remote_address_group_id",
                super::address_groups::KIND,
                "address group",
                &rule.remote_address_group_id,
            ),
            (
                "port_set_id",
                super::port_sets::KIND,
                "port set",
                &rule.port_set_id,
            ),
        ];
        for (field, kind, noun, id) in references {
            let Some(id) = id else {
                continue;
            };
            match records::get(conn, kind, id).await? {
                Some(g) if g.meta.vdc_id.as_deref() == Some(vdc_id) => {}
                _ => {
                    return Err(ApiError::invalid(
                        format!("rules[{i}].{field}"),
                        format!("no {noun} {id} in this VDC"),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// The first security group of `vdc_id` with a rule `uses` holds (for the
/// 409 of deleting something rules name).
pub async fn rule_user(
    conn: &mut DbConnection,
    vdc_id: &str,
    uses: impl Fn(&Rule) -> bool,
) -> Result<Option<String>, ApiError> {
    for group in records::in_vdc(conn, KIND, vdc_id).await? {
        let spec: SgSpec = group.spec()?;
        if spec.rules.iter().any(&uses) {
            return Ok(Some(group.meta.id));
        }
    }
    Ok(None)
}

impl Resource for SecurityGroup {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Network;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        let reason = not_realized(&record.meta.status);
        let spec: SgSpec = record.spec()?;
        Ok(SecurityGroup {
            meta: record.meta,
            description: spec.description,
            rules: spec.rules,
            status_reason: reason,
        })
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_sg, list_sgs))
        .routes(routes!(get_sg, update_sg, delete_sg))
}

#[utoipa::path(post, path = "/security-groups", tag = "networks", request_body = SecurityGroupCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Stored; PENDING until a data plane enforces it", body = SecurityGroup),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_sg(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<SecurityGroupCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Network, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    validate_rules(&body.rules)?;
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let mut tx = state.store.begin_write().await?;
    referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    check_remote_groups(&mut tx, &vdc_id, &body.rules).await?;
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: KIND,
            vdc_id: Some(&vdc_id),
            parent_id: Some(&vdc_id),
            name: &body.name,
            spec: to_json(&SgSpec {
                description: body.description,
                rules: body.rules,
            })?,
            status: PENDING,
        },
    )
    .await?;
    tx.commit().await?;
    let location = format!("/api/v1/security-groups/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(
        &location,
        revision,
        &SecurityGroup::from_record(record)?,
    ))
}

#[utoipa::path(get, path = "/security-groups", tag = "networks", params(ListQuery),
    responses((status = 200, description = "One page", body = SecurityGroupPage)), security(("bearer" = [])))]
async fn list_sgs(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<SecurityGroupPage>, ApiError> {
    let Page { items, next_cursor } =
        list_page::<SecurityGroup>(&state, &principal, &query).await?;
    Ok(Json(SecurityGroupPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/security-groups/{id}", tag = "networks", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The security group", body = SecurityGroup),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_sg(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<SecurityGroup>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/security-groups/{id}", tag = "networks", request_body = SecurityGroupUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated", body = SecurityGroup),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_sg(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<SecurityGroupUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<SecurityGroup>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: SgSpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(d) = body.description {
        check_description(&d)?;
        spec.description = d;
    }
    if let Some(rules) = body.rules {
        validate_rules(&rules)?;
        let vdc_id = record.meta.vdc_id.clone().unwrap_or_default();
        check_remote_groups(&mut tx, &vdc_id, &rules).await?;
        spec.rules = rules;
    }
    let updated = records::update(&mut tx, &record, KIND, &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<SecurityGroup>(updated)
}

#[utoipa::path(delete, path = "/security-groups/{id}", tag = "networks",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "Still used by a port", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_sg(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<SecurityGroup>(&state, &principal, Action::Delete, &id, &headers).await?;
    if super::ports::group_in_use(&mut tx, &record).await? {
        return Err(ApiError::Conflict(format!(
            "security group {id} is used by a port"
        )));
    }
    let vdc = record.meta.vdc_id.as_deref().unwrap_or("");
    for other in records::in_vdc(&mut tx, KIND, vdc).await? {
        let spec: SgSpec = other.spec()?;
        if other.meta.id != id
            && spec
                .rules
                .iter()
                .any(|r| r.remote_group_id.as_deref() == Some(id.as_str()))
        {
            return Err(ApiError::Conflict(format!(
                "security group {} has rules with it as remote group",
                other.meta.id
            )));
        }
    }
    finish_delete::<SecurityGroup>(tx, &record).await
}
