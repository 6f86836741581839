//! `/mirror-sessions`: traffic mirroring inside a VDC (Neutron's
//! tap-as-a-service): copies of what the source ports send and/or receive,
//! optionally only one protocol or address range, go unchanged out of a
//! target port (a monitoring VM's NIC). The original forwarding is not
//! affected. A host's data plane mirrors the sources it serves when it also
//! serves the target; ACTIVE while one does.

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
use super::networks::not_realized;
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, Record, PENDING};
use super::respond::{
    begin_change, create_in_vdc, finish_delete, get_one, list_page, ok, referenced_vdc, target_vdc,
    Resource,
};
use super::AppState;
use crate::store::DbConnection;

pub const KIND: &str = "mirror_session";
/// A data plane holds 64 sessions; a session at most this many sources.
const MAX_SOURCES: usize = 64;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MirrorDirection {
    /// What the source ports receive.
    In,
    /// What they send.
    Out,
    #[default]
    Both,
}

/// Only frames matching every given field are mirrored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MirrorFilter {
    /// `tcp`, `udp`, `icmp` or an IP protocol number.
    #[serde(default)]
    pub protocol: Option<String>,
    /// IPv4: the source or the destination is inside.
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub cidr: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct MirrorSessionSpec {
    pub description: String,
    pub source_port_ids: Vec<String>,
    pub direction: MirrorDirection,
    pub filter: Option<MirrorFilter>,
    pub target_port_id: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MirrorSession {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: MirrorSessionSpec,
    pub status_reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MirrorSessionCreate {
    pub name: String,
    pub vdc_id: Option<String>,
    #[serde(default)]
    pub description: String,
    pub source_port_ids: Vec<String>,
    #[serde(default)]
    pub direction: MirrorDirection,
    pub filter: Option<MirrorFilter>,
    pub target_port_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MirrorSessionUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub source_port_ids: Option<Vec<String>>,
    pub direction: Option<MirrorDirection>,
    #[serde(default, deserialize_with = "super::networks::present")]
    pub filter: Option<Option<MirrorFilter>>,
    pub target_port_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MirrorSessionPage {
    pub items: Vec<MirrorSession>,
    pub next_cursor: Option<String>,
}

impl Resource for MirrorSession {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Network;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        Ok(MirrorSession {
            status_reason: not_realized(&record.meta.status),
            spec: record.spec()?,
            meta: record.meta,
        })
    }
}

/// Checks a session against the ports of its VDC.
async fn validate(
    conn: &mut DbConnection,
    vdc_id: &str,
    spec: &MirrorSessionSpec,
) -> Result<(), ApiError> {
    check_description(&spec.description)?;
    if spec.source_port_ids.is_empty() || spec.source_port_ids.len() > MAX_SOURCES {
        return Err(ApiError::invalid(
            "source_port_ids",
            format!("1..={MAX_SOURCES} ports"),
        ));
    }
    let mut ports = spec
        .source_port_ids
        .iter()
        .map(|p| ("source_port_ids", p))
        .collect::<Vec<_>>();
    ports.push(("target_port_id", &spec.target_port_id));
    for (i, (field, id)) in ports.iter().enumerate() {
        let field = if *field == "source_port_ids" {
            format!("source_port_ids[{i}]")
        } else {
            (*field).to_owned()
        };
        match records::get(conn, "port", id).await? {
            Some(p) if p.meta.vdc_id.as_deref() == Some(vdc_id) => {}
            _ => {
                return Err(ApiError::invalid(
                    field,
                    format!("no port {id} in this VDC"),
                ))
            }
        }
        if ports[..i].iter().any(|(_, other)| other == id) {
            let message = if field == "target_port_id" {
                "the target is also a source (copies would loop)"
            } else {
                "listed twice"
            };
            return Err(ApiError::invalid(field, message));
        }
    }
    if let Some(f) = &spec.filter {
        if let Some(proto) = &f.protocol {
            let named = matches!(proto.as_str(), "tcp" | "udp" | "icmp");
            if !named && proto.parse::<u8>().is_err() {
                return Err(ApiError::invalid(
                    "filter.protocol",
                    "tcp, udp, icmp or an IP protocol number 0..=255",
                ));
            }
        }
        if let Some(c) = &f.cidr {
            let ok = c
                .parse::<IpNet>()
                .is_ok_and(|n| n.addr().is_ipv4() && n.trunc() == n);
            if !ok {
                return Err(ApiError::invalid(
                    "filter.cidr",
                    format!("{c:?} is not an IPv4 CIDR without host bits"),
                ));
            }
        }
    }
    Ok(())
}

/// Whether a session mirrors or targets `port_id` (blocks its deletion).
pub async fn port_in_use(
    conn: &mut DbConnection,
    vdc_id: &str,
    port_id: &str,
) -> Result<Option<String>, ApiError> {
    for s in records::in_vdc(conn, KIND, vdc_id).await? {
        let spec: MirrorSessionSpec = s.spec()?;
        if spec.target_port_id == port_id || spec.source_port_ids.iter().any(|p| p == port_id) {
            return Ok(Some(s.meta.id));
        }
    }
    Ok(None)
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_mirror_session, list_mirror_sessions))
        .routes(routes!(
            get_mirror_session,
            update_mirror_session,
            delete_mirror_session
        ))
}

#[utoipa::path(post, path = "/mirror-sessions", tag = "networks", request_body = MirrorSessionCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Stored; PENDING until a data plane mirrors", body = MirrorSession),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_mirror_session(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<MirrorSessionCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Network, Action::Create)?;
    check_name("name", &body.name)?;
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let spec = MirrorSessionSpec {
        description: body.description,
        source_port_ids: body.source_port_ids,
        direction: body.direction,
        filter: body.filter,
        target_port_id: body.target_port_id,
    };
    let mut tx = state.store.begin_write().await?;
    referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    validate(&mut tx, &vdc_id, &spec).await?;
    create_in_vdc::<MirrorSession>(
        tx,
        "/api/v1/mirror-sessions",
        &vdc_id,
        &body.name,
        to_json(&spec)?,
        PENDING,
    )
    .await
}

#[utoipa::path(get, path = "/mirror-sessions", tag = "networks", params(ListQuery),
    responses((status = 200, description = "One page", body = MirrorSessionPage)), security(("bearer" = [])))]
async fn list_mirror_sessions(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<MirrorSessionPage>, ApiError> {
    let Page { items, next_cursor } =
        list_page::<MirrorSession>(&state, &principal, &query).await?;
    Ok(Json(MirrorSessionPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/mirror-sessions/{id}", tag = "networks", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The session", body = MirrorSession),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_mirror_session(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<MirrorSession>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/mirror-sessions/{id}", tag = "networks", request_body = MirrorSessionUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated; applied in place", body = MirrorSession),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_mirror_session(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<MirrorSessionUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<MirrorSession>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: MirrorSessionSpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(d) = body.description {
        spec.description = d;
    }
    if let Some(s) = body.source_port_ids {
        spec.source_port_ids = s;
    }
    if let Some(d) = body.direction {
        spec.direction = d;
    }
    if let Some(f) = body.filter {
        spec.filter = f;
    }
    if let Some(t) = body.target_port_id {
        spec.target_port_id = t;
    }
    let vdc_id = record.meta.vdc_id.clone().unwrap_or_default();
    validate(&mut tx, &vdc_id, &spec).await?;
    let updated = records::update(&mut tx, &record, KIND, &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<MirrorSession>(updated)
}

#[utoipa::path(delete, path = "/mirror-sessions/{id}", tag = "networks",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted; mirroring stops"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_mirror_session(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (tx, record) =
        begin_change::<MirrorSession>(&state, &principal, Action::Delete, &id, &headers).await?;
    finish_delete::<MirrorSession>(tx, &record).await
}
