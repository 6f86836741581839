//! `/users`: local users. Passwords are argon2id hashes and never leave
//! the store. A VDC admin manages the users of its own VDC and cannot make
//! system admins.

use crate::store::DbConnection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{check_password_policy, hash_password, Action, Family, Principal, Role};
use super::extract::{check_name, if_match, ValidJson, ValidQuery};
use super::problem::{ApiError, Problem};
use super::records::{append_event, now_ms};
use super::respond::{created, referenced_vdc, with_etag};
use super::AppState;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// The custom role (`/roles`) of a `custom` user.
    pub role_id: Option<String>,
    pub vdc_id: Option<String>,
    /// Locked after too many failed logins.
    pub locked: bool,
    /// Whether login needs a TOTP code too.
    pub totp_enabled: bool,
    pub revision: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserCreate {
    pub name: String,
    pub password: String,
    pub role: Role,
    /// The custom role, required with `role: custom` (and only then).
    pub role_id: Option<String>,
    /// Required for VDC roles, absent for system admins.
    pub vdc_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserUpdate {
    pub password: Option<String>,
    pub role: Option<Role>,
    /// The custom role, with `role: custom`.
    pub role_id: Option<String>,
    /// Clears a login lockout.
    pub unlock: Option<bool>,
    /// Turns the user's TOTP second factor off (a lost authenticator); the
    /// user can set up a new one after logging in with the password.
    pub reset_totp: Option<bool>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UserQuery {
    /// Page size, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u16>,
    /// `next_cursor` of the previous page (pages are ordered by name).
    pub cursor: Option<String>,
    /// Case-insensitive substring of the name.
    pub q: Option<String>,
    pub vdc_id: Option<String>,
    pub role: Option<Role>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserPage {
    pub items: Vec<User>,
    pub next_cursor: Option<String>,
}

const COLUMNS: &str = "id, name, role, role_id, vdc_id, locked_until, totp_secret, revision, \
                       created_at, updated_at";

fn to_user(row: &crate::store::DbRow) -> Result<User, ApiError> {
    let role: String = row.try_get("role")?;
    let locked_until: i64 = row.try_get("locked_until")?;
    Ok(User {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: Role::parse(&role).ok_or_else(|| ApiError::Internal(format!("role {role}")))?,
        role_id: row.try_get("role_id")?,
        vdc_id: row.try_get("vdc_id")?,
        locked: locked_until > now_ms(),
        totp_enabled: row.try_get::<Option<String>, _>("totp_secret")?.is_some(),
        revision: row.try_get("revision")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

async fn load(
    conn: &mut DbConnection,
    principal: &Principal,
    action: Action,
    id: &str,
) -> Result<User, ApiError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(ApiError::NotFound)?;
    let user = to_user(&row)?;
    principal.authorize(Family::User, action, user.vdc_id.as_deref())?;
    Ok(user)
}

/// `role_id` goes with `role: custom` only, and must name a custom role.
async fn check_custom(
    conn: &mut DbConnection,
    role: Role,
    role_id: Option<&str>,
) -> Result<(), ApiError> {
    match (role, role_id) {
        (Role::Custom, None) => Err(ApiError::invalid("role_id", "required with role custom")),
        (Role::Custom, Some(id)) => {
            if super::roles::exists(conn, id).await? {
                Ok(())
            } else {
                Err(ApiError::invalid("role_id", format!("no custom role {id}")))
            }
        }
        (_, Some(_)) => Err(ApiError::invalid("role_id", "only with role custom")),
        (_, None) => Ok(()),
    }
}

/// A VDC admin may only hand out VDC roles.
fn check_grant(principal: &Principal, role: Role) -> Result<(), ApiError> {
    if role == Role::SystemAdmin && principal.role != Role::SystemAdmin {
        return Err(ApiError::Forbidden);
    }
    Ok(())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_user, list_users))
        .routes(routes!(get_user, update_user, delete_user))
}

#[utoipa::path(post, path = "/users", tag = "tenancy", request_body = UserCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Created", body = User),
        (status = 409, description = "Name taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field (password policy, role/VDC mismatch)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_user(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<UserCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::User, Action::Create)?;
    check_grant(&principal, body.role)?;
    check_name("name", &body.name)?;
    check_password_policy(&body.name, &body.password)?;
    let vdc_id = match (body.role, body.vdc_id) {
        (Role::SystemAdmin, None) => None,
        (Role::SystemAdmin, Some(_)) => {
            return Err(ApiError::invalid(
                "vdc_id",
                "a system admin belongs to no VDC",
            ))
        }
        (_, Some(vdc)) => Some(vdc),
        (_, None) => match &principal.vdc_id {
            Some(own) => Some(own.clone()),
            None => return Err(ApiError::invalid("vdc_id", "required for VDC roles")),
        },
    };
    let hash = hash_password(body.password).await?;
    let mut tx = state.store.begin_write().await?;
    check_custom(&mut tx, body.role, body.role_id.as_deref()).await?;
    if let Some(vdc) = &vdc_id {
        referenced_vdc(&mut tx, &principal, "vdc_id", vdc).await?;
    }
    let taken: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE name = $1")
        .bind(&body.name)
        .fetch_one(&mut *tx)
        .await?;
    if taken > 0 {
        return Err(ApiError::Conflict(format!(
            "user name {:?} is taken",
            body.name
        )));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    let row = sqlx::query(&format!(
        "INSERT INTO users (id, name, password_hash, role, role_id, vdc_id, revision, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $8) RETURNING {COLUMNS}"
    ))
    .bind(&id)
    .bind(&body.name)
    .bind(hash)
    .bind(body.role.as_str())
    .bind(&body.role_id)
    .bind(&vdc_id)
    .bind(now)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    let user = to_user(&row)?;
    append_event(&mut tx, "user", &id, "created", vdc_id.as_deref(), 1).await?;
    tx.commit().await?;
    Ok(created(&format!("/api/v1/users/{id}"), 1, &user))
}

#[utoipa::path(get, path = "/users", tag = "tenancy", params(UserQuery),
    responses((status = 200, description = "One page, ordered by name", body = UserPage)), security(("bearer" = [])))]
async fn list_users(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<UserQuery>,
) -> Result<Json<UserPage>, ApiError> {
    principal.require(Family::User, Action::Read)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::InvalidQuery("limit must be 1..=1000".into()));
    }
    let mut sql = format!("SELECT {COLUMNS} FROM users WHERE name > ?");
    let mut binds: Vec<String> = vec![query.cursor.clone().unwrap_or_default()];
    for (column, value) in [
        ("vdc_id", principal.list_scope().map(str::to_owned)),
        ("vdc_id", query.vdc_id.clone()),
        ("role", query.role.map(|r| r.as_str().to_owned())),
    ] {
        if let Some(v) = value {
            sql.push_str(&format!(" AND {column} = ?"));
            binds.push(v);
        }
    }
    if let Some(q) = &query.q {
        sql.push_str(" AND LOWER(name) LIKE ?");
        binds.push(format!("%{}%", q.to_lowercase().replace(['%', '_'], "")));
    }
    sql.push_str(" ORDER BY name LIMIT ?");
    let sql = crate::store::numbered(&sql);
    let mut q = sqlx::query(&sql);
    for b in binds {
        q = q.bind(b);
    }
    let rows = q
        .bind(i64::from(limit) + 1)
        .fetch_all(state.store.pool())
        .await?;
    let mut items = rows.iter().map(to_user).collect::<Result<Vec<_>, _>>()?;
    let more = items.len() > usize::from(limit);
    items.truncate(usize::from(limit));
    // Names are unique, so the last name is a stable cursor.
    let next_cursor = items.last().filter(|_| more).map(|u| u.name.clone());
    Ok(Json(UserPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/users/{id}", tag = "tenancy", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The user", body = User),
        (status = 404, description = "No such user (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_user(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut conn = state.store.pool().acquire().await?;
    let user = load(&mut conn, &principal, Action::Read, &id).await?;
    Ok(with_etag(StatusCode::OK, user.revision, &user))
}

#[utoipa::path(patch, path = "/users/{id}", tag = "tenancy", request_body = UserUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated", body = User),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_user(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<UserUpdate>,
) -> Result<Response, ApiError> {
    let expected = if_match(&headers)?;
    let hash = match &body.password {
        Some(p) => {
            // Checked against the stored name below; hash first, off the tx.
            Some((p.clone(), hash_password(p.clone()).await?))
        }
        None => None,
    };
    let mut tx = state.store.begin_write().await?;
    let user = load(&mut tx, &principal, Action::Update, &id).await?;
    if user.revision != expected {
        return Err(ApiError::RevisionMismatch {
            current: user.revision,
        });
    }
    if user.role == Role::SystemAdmin {
        check_grant(&principal, user.role)?;
    }
    let role = body.role.unwrap_or(user.role);
    check_grant(&principal, role)?;
    let role_id = match (body.role, body.role_id) {
        (_, Some(id)) => Some(id),
        (Some(_), None) => None,
        (None, None) => user.role_id.clone(),
    };
    check_custom(&mut tx, role, role_id.as_deref()).await?;
    if (role == Role::SystemAdmin) != user.vdc_id.is_none() {
        return Err(ApiError::invalid(
            "role",
            "a system admin belongs to no VDC and a VDC role needs one",
        ));
    }
    if let Some((password, _)) = &hash {
        check_password_policy(&user.name, password)?;
    }
    let mut sql = String::from(
        "UPDATE users SET role = ?, role_id = ?, revision = revision + 1, updated_at = ?",
    );
    if hash.is_some() {
        sql.push_str(", password_hash = ?");
    }
    if body.unlock == Some(true) {
        sql.push_str(", failed_logins = 0, locked_until = 0");
    }
    if body.reset_totp == Some(true) {
        sql.push_str(", totp_secret = NULL, totp_pending = NULL, totp_last_step = 0");
    }
    sql.push_str(&format!(
        " WHERE id = ? AND revision = ? RETURNING {COLUMNS}"
    ));
    let sql = crate::store::numbered(&sql);
    let mut q = sqlx::query(&sql)
        .bind(role.as_str())
        .bind(role_id)
        .bind(now_ms());
    if let Some((_, h)) = hash {
        q = q.bind(h);
    }
    let row = q
        .bind(&id)
        .bind(expected)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(ApiError::RevisionMismatch {
            current: user.revision,
        })?;
    let updated = to_user(&row)?;
    if body.password.is_some() {
        // A new password ends every session of the old one.
        sqlx::query("DELETE FROM tokens WHERE user_id = $1 AND kind != 'api'")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
    }
    append_event(
        &mut tx,
        "user",
        &id,
        "updated",
        updated.vdc_id.as_deref(),
        updated.revision,
    )
    .await?;
    tx.commit().await?;
    Ok(with_etag(StatusCode::OK, updated.revision, &updated))
}

#[utoipa::path(delete, path = "/users/{id}", tag = "tenancy",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted, with its tokens"),
        (status = 409, description = "Deleting yourself", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_user(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let expected = if_match(&headers)?;
    let mut tx = state.store.begin_write().await?;
    let user = load(&mut tx, &principal, Action::Delete, &id).await?;
    check_grant(&principal, user.role)?;
    if user.id == principal.user_id {
        return Err(ApiError::Conflict("you cannot delete yourself".into()));
    }
    let done = sqlx::query("DELETE FROM users WHERE id = $1 AND revision = $2")
        .bind(&id)
        .bind(expected)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::RevisionMismatch {
            current: user.revision,
        });
    }
    append_event(
        &mut tx,
        "user",
        &id,
        "deleted",
        user.vdc_id.as_deref(),
        user.revision + 1,
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
