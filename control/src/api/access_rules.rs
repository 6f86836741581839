//! `/access-rules`: which client addresses may use the API at all (system
//! admins only). A request from an address a `deny` rule covers is refused;
//! once any `allow` rule exists, only addresses an allow rule covers get in.
//! Checked before authentication, on every `/api/` request, against the
//! stored rules (so a change applies at once, on every keel process sharing
//! the store). A change that would shut out the address of the admin making
//! it is refused, so the API cannot be locked from the inside.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::{check_description, ValidJson, ValidQuery};
use super::listing::{ListQuery, Page};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record};
use super::respond::{begin_change, created, finish_delete, get_one, list_page, ok, Resource};
use super::AppState;
use crate::store::DbConnection;

pub const KIND: &str = "access_rule";
const ACTIVE: &str = "ACTIVE";
const MAX_RULES: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleSpec {
    pub cidr: String,
    pub action: Verdict,
    pub description: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccessRule {
    #[serde(flatten)]
    pub meta: Meta,
    /// Client addresses this rule covers (IPv4 or IPv6 CIDR).
    pub cidr: String,
    pub action: Verdict,
    pub description: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessRuleCreate {
    pub name: String,
    pub cidr: String,
    pub action: Verdict,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessRuleUpdate {
    pub name: Option<String>,
    pub cidr: Option<String>,
    pub action: Option<Verdict>,
    pub description: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccessRulePage {
    pub items: Vec<AccessRule>,
    pub next_cursor: Option<String>,
}

impl Resource for AccessRule {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Access;
    const SYSTEM_WIDE: bool = true;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        let spec: RuleSpec = record.spec()?;
        Ok(AccessRule {
            meta: record.meta,
            cidr: spec.cidr,
            action: spec.action,
            description: spec.description,
        })
    }
}

fn parse_cidr(cidr: &str) -> Result<IpNet, ApiError> {
    let net: IpNet = cidr
        .parse()
        .or_else(|_| cidr.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| ApiError::invalid("cidr", format!("{cidr:?} is not an address or CIDR")))?;
    if net.trunc() != net {
        return Err(ApiError::invalid(
            "cidr",
            format!("host bits set: did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

/// Whether `rules` let `client` in.
fn admits(rules: &[(IpNet, Verdict)], client: Option<IpAddr>) -> bool {
    let covers = |net: &IpNet| client.is_some_and(|ip| net.contains(&canonical(ip)));
    if rules
        .iter()
        .any(|(net, v)| *v == Verdict::Deny && covers(net))
    {
        return false;
    }
    let allows: Vec<_> = rules.iter().filter(|(_, v)| *v == Verdict::Allow).collect();
    allows.is_empty() || allows.iter().any(|(net, _)| covers(net))
}

/// IPv4 clients of a dual-stack listener arrive as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

async fn rules(conn: &mut DbConnection) -> Result<Vec<(IpNet, Verdict)>, ApiError> {
    rules_except(conn, "").await
}

/// Every stored rule but `id` (the one being changed).
async fn rules_except(
    conn: &mut DbConnection,
    id: &str,
) -> Result<Vec<(IpNet, Verdict)>, ApiError> {
    records::all(conn, KIND)
        .await?
        .iter()
        .filter(|r| r.meta.id != id)
        .map(|r| {
            let spec: RuleSpec = r.spec()?;
            let net = spec
                .cidr
                .parse()
                .map_err(|_| ApiError::Internal(format!("stored access rule {}", r.meta.id)))?;
            Ok((net, spec.action))
        })
        .collect()
}

fn client_of(req: &Request) -> Option<IpAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Middleware: refuses `/api/` requests from addresses the rules shut out
/// (a request without a peer address, which only in-process callers make,
/// counts as an address no rule covers).
pub async fn enforce(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/api/") {
        return next.run(req).await;
    }
    let client = client_of(&req);
    let checked = async {
        let mut conn = state.store.pool().acquire().await?;
        rules(&mut conn).await
    };
    match checked.await {
        Ok(rules) if admits(&rules, client) => next.run(req).await,
        Ok(_) => {
            ApiError::AddressDenied(client.map_or_else(|| "unknown".into(), |ip| ip.to_string()))
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Refuses a rule set that would shut out the admin changing it.
fn keep_caller_in(rules: &[(IpNet, Verdict)], caller: Option<IpAddr>) -> Result<(), ApiError> {
    if admits(rules, caller) {
        return Ok(());
    }
    Err(ApiError::Conflict(format!(
        "this change would shut out your own address {}; allow it first",
        caller.map_or_else(|| "(unknown)".into(), |ip| ip.to_string())
    )))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_rule, list_rules))
        .routes(routes!(get_rule, update_rule, delete_rule))
}

/// The client address of a request, if it came over the network.
struct Caller(Option<IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Caller(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

#[utoipa::path(post, path = "/access-rules", tag = "tenancy", request_body = AccessRuleCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Created; applies to the next request", body = AccessRule),
        (status = 409, description = "Would shut out the caller's own address", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_rule(
    State(state): State<AppState>,
    principal: Principal,
    caller: Caller,
    ValidJson(body): ValidJson<AccessRuleCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Access, Action::Create)?;
    super::extract::check_name("name", &body.name)?;
    check_description(&body.description)?;
    let net = parse_cidr(&body.cidr)?;
    let mut tx = state.store.begin_write().await?;
    let mut all = rules(&mut tx).await?;
    if all.len() >= MAX_RULES {
        return Err(ApiError::Conflict(format!(
            "at most {MAX_RULES} access rules"
        )));
    }
    all.push((net, body.action));
    keep_caller_in(&all, caller.0)?;
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: KIND,
            vdc_id: None,
            parent_id: None,
            name: &body.name,
            spec: to_json(&RuleSpec {
                cidr: net.to_string(),
                action: body.action,
                description: body.description,
            })?,
            status: ACTIVE,
        },
    )
    .await?;
    tx.commit().await?;
    let location = format!("/api/v1/access-rules/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(
        &location,
        revision,
        &AccessRule::from_record(record)?,
    ))
}

#[utoipa::path(get, path = "/access-rules", tag = "tenancy", params(ListQuery),
    responses((status = 200, description = "One page", body = AccessRulePage)), security(("bearer" = [])))]
async fn list_rules(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<AccessRulePage>, ApiError> {
    let Page { items, next_cursor } = list_page::<AccessRule>(&state, &principal, &query).await?;
    Ok(Json(AccessRulePage { items, next_cursor }))
}

#[utoipa::path(get, path = "/access-rules/{id}", tag = "tenancy", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The rule", body = AccessRule),
        (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_rule(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<AccessRule>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/access-rules/{id}", tag = "tenancy", request_body = AccessRuleUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated", body = AccessRule),
        (status = 409, description = "Would shut out the caller's own address", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_rule(
    State(state): State<AppState>,
    principal: Principal,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<AccessRuleUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<AccessRule>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: RuleSpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    super::extract::check_name("name", &name)?;
    if let Some(d) = body.description {
        check_description(&d)?;
        spec.description = d;
    }
    if let Some(cidr) = body.cidr {
        spec.cidr = parse_cidr(&cidr)?.to_string();
    }
    if let Some(action) = body.action {
        spec.action = action;
    }
    let mut others = rules_except(&mut tx, &id).await?;
    others.push((parse_cidr(&spec.cidr)?, spec.action));
    keep_caller_in(&others, caller.0)?;
    let updated = records::update(&mut tx, &record, KIND, &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<AccessRule>(updated)
}

#[utoipa::path(delete, path = "/access-rules/{id}", tag = "tenancy",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "Would shut out the caller's own address", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_rule(
    State(state): State<AppState>,
    principal: Principal,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<AccessRule>(&state, &principal, Action::Delete, &id, &headers).await?;
    let rest = rules_except(&mut tx, &id).await?;
    keep_caller_in(&rest, caller.0)?;
    finish_delete::<AccessRule>(tx, &record).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn deny_wins_and_allows_close_everything_else() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(admits(&[], ip("192.0.2.1")), "no rules: open");
        assert!(admits(&[], None));
        let rules = [
            (net("10.0.0.0/8"), Verdict::Allow),
            (net("10.2.0.0/16"), Verdict::Deny),
        ];
        assert!(admits(&rules, ip("10.1.1.1")));
        assert!(!admits(&rules, ip("10.2.2.2")), "deny wins");
        assert!(!admits(&rules, ip("192.0.2.1")), "not allowed");
        assert!(admits(&rules, ip("::ffff:10.1.1.1")), "IPv4-mapped");
        assert!(!admits(&rules, None));
        let deny_only = [(net("198.51.100.0/24"), Verdict::Deny)];
        assert!(admits(&deny_only, ip("192.0.2.1")));
        assert!(!admits(&deny_only, ip("198.51.100.7")));
    }
}
