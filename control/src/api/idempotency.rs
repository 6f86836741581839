//! `Idempotency-Key` on POST: the first response (status, Location, ETag,
//! body) is kept per caller and key; a retry with the same request gets it
//! again without a second create, a different request with the same key
//! is refused with 422 `idempotency-key-reused`.
//!
//! Simplification: two *concurrent* first attempts with one key both run;
//! the second to finish does not overwrite the first record.

use std::collections::BTreeMap;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::auth::Principal;
use super::problem::ApiError;
use super::records::now_ms;
use super::AppState;

const MAX_BODY: usize = 1024 * 1024;
const KEPT: [HeaderName; 3] = [header::LOCATION, header::ETAG, header::CONTENT_TYPE];

pub async fn replay_or_record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match handle(state, req, next).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(state: AppState, req: Request, next: Next) -> Result<Response, ApiError> {
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (Some(key), true) = (key, req.method() == Method::POST) else {
        return Ok(next.run(req).await);
    };
    if key.is_empty() || key.len() > 255 {
        return Err(ApiError::invalid(
            "Idempotency-Key",
            "must be 1-255 characters",
        ));
    }
    let Some(principal) = req
        .extensions()
        .get::<Principal>()
        .map(|p| p.user_id.clone())
    else {
        return Ok(next.run(req).await);
    };
    let (parts, body) = req.into_parts();
    let bytes = to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::BadJson("body too large or unreadable".into()))?;
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let fingerprint = format!("{} {} {digest}", parts.method, parts.uri.path());
    let stored = sqlx::query(
        "SELECT request, status, headers, body FROM idempotency WHERE principal = $1 AND key = $2",
    )
    .bind(&principal)
    .bind(&key)
    .fetch_optional(state.store.pool())
    .await?;
    if let Some(row) = stored {
        let request: String = row.try_get("request")?;
        if request != fingerprint {
            return Err(ApiError::IdempotencyKeyReused);
        }
        let status: i64 = row.try_get("status")?;
        let headers: String = row.try_get("headers")?;
        let body: String = row.try_get("body")?;
        let headers: BTreeMap<String, String> = serde_json::from_str(&headers).unwrap_or_default();
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = u16::try_from(status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK);
        for (name, value) in headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::try_from(name.as_str()),
                HeaderValue::from_str(&value),
            ) {
                response.headers_mut().insert(n, v);
            }
        }
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        return Ok(response);
    }
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    // Server errors may be transient: let the client retry them for real.
    if response.status().is_server_error() {
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let body = to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| ApiError::Internal(format!("response body: {e}")))?;
    let headers: BTreeMap<String, String> = KEPT
        .iter()
        .filter_map(|n| {
            let v = parts.headers.get(n)?.to_str().ok()?;
            Some((n.to_string(), v.to_owned()))
        })
        .collect();
    sqlx::query(
        "INSERT INTO idempotency (principal, key, request, status, headers, body, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (principal, key) DO NOTHING",
    )
    .bind(&principal)
    .bind(&key)
    .bind(&fingerprint)
    .bind(i64::from(parts.status.as_u16()))
    .bind(serde_json::to_string(&headers).unwrap_or_default())
    .bind(String::from_utf8_lossy(&body).into_owned())
    .bind(now_ms())
    .execute(state.store.pool())
    .await?;
    Ok(Response::from_parts(parts, Body::from(body)))
}
