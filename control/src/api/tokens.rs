//! `/tokens`: API tokens for automation. The secret is shown once at
//! create; only its SHA-256 is stored. Every caller manages its own tokens.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{hash_token, new_secret, Action, Family, Principal};
use super::extract::{check_name, ValidJson};
use super::problem::{ApiError, Problem};
use super::records::now_ms;
use super::respond::created;
use super::AppState;

const MAX_DAYS: u32 = 3650;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub name: String,
    /// Lifetime in days (1..=3650); absent: until deleted.
    pub expires_in_days: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiToken {
    pub id: String,
    pub name: String,
    pub expires_at: Option<i64>,
    pub created_at: i64,
    /// The bearer secret; only in the create response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_token, list_tokens))
        .routes(routes!(delete_token))
}

#[utoipa::path(post, path = "/tokens", tag = "auth", request_body = TokenCreate,
    responses(
        (status = 201, description = "Created; the secret is in `token`, shown only now", body = ApiToken),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_token(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<TokenCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Token, Action::Create)?;
    check_name("name", &body.name)?;
    let now = now_ms();
    let expires_at = match body.expires_in_days {
        None => None,
        Some(d) if (1..=MAX_DAYS).contains(&d) => Some(now + i64::from(d) * 86_400_000),
        Some(_) => {
            return Err(ApiError::invalid(
                "expires_in_days",
                format!("must be 1..={MAX_DAYS}"),
            ))
        }
    };
    let secret = new_secret("keelt");
    let id = uuid::Uuid::new_v4().to_string();
    sqlx::query(
        "INSERT INTO tokens (id, user_id, kind, name, hash, expires_at, created_at) VALUES ($1, $2, 'api', $3, $4, $5, $6)",
    )
    .bind(&id)
    .bind(&principal.user_id)
    .bind(&body.name)
    .bind(hash_token(&secret))
    .bind(expires_at)
    .bind(now)
    .execute(state.store.pool())
    .await?;
    let token = ApiToken {
        id: id.clone(),
        name: body.name,
        expires_at,
        created_at: now,
        token: Some(secret),
    };
    Ok(created(&format!("/api/v1/tokens/{id}"), 1, &token))
}

#[utoipa::path(get, path = "/tokens", tag = "auth",
    responses((status = 200, description = "The caller's API tokens (no secrets)", body = Vec<ApiToken>)),
    security(("bearer" = [])))]
async fn list_tokens(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Vec<ApiToken>>, ApiError> {
    principal.require(Family::Token, Action::Read)?;
    let rows = sqlx::query(
        "SELECT id, name, expires_at, created_at FROM tokens WHERE user_id = $1 AND kind = 'api' ORDER BY created_at, id",
    )
    .bind(&principal.user_id)
    .fetch_all(state.store.pool())
    .await?;
    let tokens = rows
        .iter()
        .map(|r| {
            Ok(ApiToken {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                expires_at: r.try_get("expires_at")?,
                created_at: r.try_get("created_at")?,
                token: None,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Json(tokens))
}

#[utoipa::path(delete, path = "/tokens/{id}", tag = "auth", params(("id" = String, Path)),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such token of the caller", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_token(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Family::Token, Action::Delete)?;
    let done = sqlx::query("DELETE FROM tokens WHERE id = $1 AND user_id = $2 AND kind = 'api'")
        .bind(&id)
        .bind(&principal.user_id)
        .execute(state.store.pool())
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT)
}
