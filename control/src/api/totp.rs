//! Optional TOTP second factor (RFC 6238: HMAC-SHA-1, 6 digits, 30 s
//! steps, one step of clock skew either way), self-service: a user asks
//! for a secret, proves an authenticator has it with one code, and from
//! then on logs in with password and code. A code is accepted once (the
//! last accepted step is kept), so an observed code cannot be replayed.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use totp_rs::{Algorithm, Secret, TOTP};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Principal;
use super::extract::ValidJson;
use super::problem::{ApiError, Problem};
use super::AppState;

const STEP: u64 = 30;
const DIGITS: usize = 6;
/// 160 bits, as RFC 4226 recommends.
const SECRET_BYTES: usize = 20;
const ISSUER: &str = "keel";

#[derive(Debug, Serialize, ToSchema)]
pub struct TotpSetup {
    /// Base32 secret for the authenticator.
    pub secret: String,
    /// The same as an `otpauth://` URI (QR code content).
    pub otpauth_uri: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TotpCode {
    /// The authenticator's current 6-digit code.
    pub code: String,
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(setup))
        .routes(routes!(confirm))
        .routes(routes!(disable))
}

fn totp(secret_b32: &str) -> Result<TOTP, ApiError> {
    let bytes = Secret::Encoded(secret_b32.to_owned())
        .to_bytes()
        .map_err(|e| ApiError::Internal(format!("stored TOTP secret: {e}")))?;
    // Skew 0: `step_of` tries the neighbouring steps itself, to learn which
    // one matched.
    TOTP::new(Algorithm::SHA1, DIGITS, 0, STEP, bytes)
        .map_err(|e| ApiError::Internal(format!("stored TOTP secret: {e}")))
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The time step `code` is valid for (now, or one step either side), if
/// it is later than `after`.
pub fn step_of(secret_b32: &str, code: &str, after: i64) -> Result<Option<i64>, ApiError> {
    let t = totp(secret_b32)?;
    let now = now_s() / STEP;
    for step in [now.saturating_sub(1), now, now + 1] {
        let Ok(s) = i64::try_from(step) else { continue };
        if s > after && t.check(code, step * STEP) {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// Whether the user must give a code at login: their confirmed secret and
/// the last accepted step.
pub async fn second_factor(
    conn: &mut crate::store::DbConnection,
    user_id: &str,
) -> Result<Option<(String, i64)>, ApiError> {
    let row = sqlx::query("SELECT totp_secret, totp_last_step FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let secret: Option<String> = row.try_get("totp_secret")?;
    let last: i64 = row.try_get("totp_last_step")?;
    Ok(secret.map(|s| (s, last)))
}

/// Records that `step` was used, unless another login used it first.
pub async fn consume_step(
    conn: &mut crate::store::DbConnection,
    user_id: &str,
    step: i64,
) -> Result<bool, ApiError> {
    let done =
        sqlx::query("UPDATE users SET totp_last_step = $1 WHERE id = $2 AND totp_last_step < $3")
            .bind(step)
            .bind(user_id)
            .bind(step)
            .execute(&mut *conn)
            .await?;
    Ok(done.rows_affected() == 1)
}

#[utoipa::path(post, path = "/auth/totp", tag = "auth",
    responses(
        (status = 200, description = "A new secret, pending until confirmed with a code", body = TotpSetup),
        (status = 409, description = "TOTP is already on (disable it first)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn setup(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<TotpSetup>, ApiError> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| ApiError::Internal(format!("no randomness: {e}")))?;
    let secret = Secret::Raw(bytes.to_vec()).to_encoded().to_string();
    let mut tx = state.store.begin_write().await?;
    if second_factor(&mut tx, &principal.user_id).await?.is_some() {
        return Err(ApiError::Conflict(
            "TOTP is already on for this user; disable it first".into(),
        ));
    }
    sqlx::query("UPDATE users SET totp_pending = $1 WHERE id = $2")
        .bind(&secret)
        .bind(&principal.user_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let account: String = principal
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok(Json(TotpSetup {
        otpauth_uri: format!(
            "otpauth://totp/{ISSUER}:{account}?secret={secret}&issuer={ISSUER}&algorithm=SHA1&digits={DIGITS}&period={STEP}"
        ),
        secret,
    }))
}

#[utoipa::path(post, path = "/auth/totp/confirm", tag = "auth", request_body = TotpCode,
    responses(
        (status = 204, description = "TOTP is on: logins need a code from now on"),
        (status = 409, description = "No pending secret (ask for one first)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The code does not match the pending secret", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn confirm(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<TotpCode>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.store.begin_write().await?;
    let pending: Option<String> =
        sqlx::query_scalar("SELECT totp_pending FROM users WHERE id = $1")
            .bind(&principal.user_id)
            .fetch_optional(&mut *tx)
            .await?
            .flatten();
    let pending = pending.ok_or_else(|| {
        ApiError::Conflict("no pending TOTP secret; POST /auth/totp first".into())
    })?;
    let step = step_of(&pending, body.code.trim(), 0)?
        .ok_or_else(|| ApiError::invalid("code", "does not match the pending secret"))?;
    sqlx::query(
        "UPDATE users SET totp_secret = totp_pending, totp_pending = NULL, totp_last_step = $1 \
         WHERE id = $2",
    )
    .bind(step)
    .bind(&principal.user_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/auth/totp/disable", tag = "auth", request_body = TotpCode,
    responses(
        (status = 204, description = "TOTP is off"),
        (status = 409, description = "TOTP is not on", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Wrong or already used code", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn disable(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<TotpCode>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.store.begin_write().await?;
    let (secret, last) = second_factor(&mut tx, &principal.user_id)
        .await?
        .ok_or_else(|| ApiError::Conflict("TOTP is not on for this user".into()))?;
    if step_of(&secret, body.code.trim(), last)?.is_none() {
        return Err(ApiError::invalid("code", "wrong or already used code"));
    }
    sqlx::query(
        "UPDATE users SET totp_secret = NULL, totp_pending = NULL, totp_last_step = 0 WHERE id = $1",
    )
    .bind(&principal.user_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
