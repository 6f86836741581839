//! `/roles`: custom roles, named permission sets a user of a VDC can hold
//! instead of a built-in role (`role: custom` with `role_id`). System
//! admins define them; a custom role never grants more than a VDC admin
//! may do, so handing one out never raises a tenant above its ceiling.
//! Permissions are read at every request: a changed role applies at once.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{permitted, Action, Family, Principal, Role};
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::listing::{ListQuery, Page};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record};
use super::respond::{begin_change, created, finish_delete, get_one, list_page, ok, Resource};
use super::AppState;
use crate::store::DbConnection;

pub const KIND: &str = "role";
const ACTIVE: &str = "ACTIVE";

/// The resource families a custom role can grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Grantable {
    Vdc,
    User,
    Token,
    Network,
    #[serde(rename = "external_network")]
    ExternalNetwork,
    Compute,
    Event,
}

impl Grantable {
    fn family(self) -> Family {
        match self {
            Grantable::Vdc => Family::Vdc,
            Grantable::User => Family::User,
            Grantable::Token => Family::Token,
            Grantable::Network => Family::Network,
            Grantable::ExternalNetwork => Family::ExternalNetwork,
            Grantable::Compute => Family::Compute,
            Grantable::Event => Family::Event,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Permission {
    pub family: Grantable,
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoleSpec {
    pub description: String,
    pub permissions: Vec<Permission>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CustomRole {
    #[serde(flatten)]
    pub meta: Meta,
    pub description: String,
    pub permissions: Vec<Permission>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleCreate {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub permissions: Vec<Permission>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Replaces the whole permission set.
    pub permissions: Option<Vec<Permission>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RolePage {
    pub items: Vec<CustomRole>,
    pub next_cursor: Option<String>,
}

impl Resource for CustomRole {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Role;
    const SYSTEM_WIDE: bool = true;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        let spec: RoleSpec = record.spec()?;
        Ok(CustomRole {
            meta: record.meta,
            description: spec.description,
            permissions: spec.permissions,
        })
    }
}

fn validate(permissions: &[Permission]) -> Result<(), ApiError> {
    for (i, p) in permissions.iter().enumerate() {
        if permissions[..i].iter().any(|q| q.family == p.family) {
            return Err(ApiError::invalid(
                format!("permissions[{i}].family"),
                "listed twice; give all its actions in one entry",
            ));
        }
        if p.actions.is_empty() {
            return Err(ApiError::invalid(
                format!("permissions[{i}].actions"),
                "at least one action",
            ));
        }
        for (j, action) in p.actions.iter().enumerate() {
            if !permitted(Role::VdcAdmin, p.family.family(), *action) {
                return Err(ApiError::invalid(
                    format!("permissions[{i}].actions[{j}]"),
                    "beyond what a VDC admin may do (custom roles are VDC roles)",
                ));
            }
        }
    }
    Ok(())
}

/// What a holder of role `id` may do; nothing if the role is gone.
pub async fn grants(conn: &mut DbConnection, id: &str) -> Result<Vec<(Family, Action)>, ApiError> {
    let Some(record) = records::get(conn, KIND, id).await? else {
        return Ok(Vec::new());
    };
    let spec: RoleSpec = record.spec()?;
    Ok(spec
        .permissions
        .iter()
        .flat_map(|p| p.actions.iter().map(move |a| (p.family.family(), *a)))
        .collect())
}

/// Whether `id` names a custom role (for users given one).
pub async fn exists(conn: &mut DbConnection, id: &str) -> Result<bool, ApiError> {
    Ok(records::get(conn, KIND, id).await?.is_some())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_role, list_roles))
        .routes(routes!(get_role, update_role, delete_role))
}

#[utoipa::path(post, path = "/roles", tag = "tenancy", request_body = RoleCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Created", body = CustomRole),
        (status = 422, description = "Invalid field (a permission beyond a VDC admin's)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_role(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<RoleCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Role, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    validate(&body.permissions)?;
    let mut tx = state.store.begin_write().await?;
    let taken = records::all(&mut tx, KIND)
        .await?
        .iter()
        .any(|r| r.meta.name == body.name);
    if taken {
        return Err(ApiError::Conflict(format!(
            "role name {:?} is taken",
            body.name
        )));
    }
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: KIND,
            vdc_id: None,
            parent_id: None,
            name: &body.name,
            spec: to_json(&RoleSpec {
                description: body.description,
                permissions: body.permissions,
            })?,
            status: ACTIVE,
        },
    )
    .await?;
    tx.commit().await?;
    let location = format!("/api/v1/roles/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(
        &location,
        revision,
        &CustomRole::from_record(record)?,
    ))
}

#[utoipa::path(get, path = "/roles", tag = "tenancy", params(ListQuery),
    responses((status = 200, description = "One page", body = RolePage)), security(("bearer" = [])))]
async fn list_roles(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<RolePage>, ApiError> {
    let Page { items, next_cursor } = list_page::<CustomRole>(&state, &principal, &query).await?;
    Ok(Json(RolePage { items, next_cursor }))
}

#[utoipa::path(get, path = "/roles/{id}", tag = "tenancy", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The role", body = CustomRole),
        (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_role(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<CustomRole>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/roles/{id}", tag = "tenancy", request_body = RoleUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated; holders get the new permissions at their next request", body = CustomRole),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_role(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<RoleUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<CustomRole>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: RoleSpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(d) = body.description {
        check_description(&d)?;
        spec.description = d;
    }
    if let Some(permissions) = body.permissions {
        validate(&permissions)?;
        spec.permissions = permissions;
    }
    let updated = records::update(&mut tx, &record, KIND, &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<CustomRole>(updated)
}

#[utoipa::path(delete, path = "/roles/{id}", tag = "tenancy",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "Still held by a user", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_role(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<CustomRole>(&state, &principal, Action::Delete, &id, &headers).await?;
    let holders: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE role_id = $1")
        .bind(&id)
        .fetch_one(&mut *tx)
        .await?;
    if holders > 0 {
        return Err(ApiError::Conflict(format!(
            "role {id} is held by {holders} user(s)"
        )));
    }
    finish_delete::<CustomRole>(tx, &record).await
}
