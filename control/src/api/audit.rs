//! The operation (audit) log: every mutating call, who made it, from
//! where, and its result status, written after the response is known.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::ValidQuery;
use super::problem::{ApiError, Problem};
use super::records::now_ms;
use super::AppState;

pub async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !mutating {
        return next.run(req).await;
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "local".into());
    let who = req
        .extensions()
        .get::<Principal>()
        .map(|p| p.name.clone())
        .unwrap_or_else(|| "anonymous".into());
    let response = next.run(req).await;
    let written = sqlx::query(
        "INSERT INTO audit_log (at, principal, method, path, remote, status) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(now_ms())
    .bind(&who)
    .bind(&method)
    .bind(&path)
    .bind(&remote)
    .bind(i64::from(response.status().as_u16()))
    .execute(state.store.pool())
    .await;
    state.changes.notify_waiters();
    if let Err(error) = written {
        tracing::error!(%error, %who, %method, %path, "audit record lost");
    }
    response
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub principal: String,
    pub method: String,
    pub path: String,
    pub remote: String,
    pub status: i64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Entries with an id greater than this.
    pub after: Option<i64>,
    /// At most this many (default and maximum 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u16>,
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_audit))
}

/// The operation log, oldest first (system admins only).
#[utoipa::path(get, path = "/audit", tag = "events", params(AuditQuery),
    responses(
        (status = 200, description = "Audit entries", body = Vec<AuditEntry>),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn list_audit(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    principal.require(Family::Audit, Action::Read)?;
    let limit = query.limit.unwrap_or(1000).clamp(1, 1000);
    let rows = sqlx::query(
        "SELECT id, at, principal, method, path, remote, status FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(query.after.unwrap_or(0))
    .bind(i64::from(limit))
    .fetch_all(state.store.pool())
    .await?;
    let entries = rows
        .iter()
        .map(|r| {
            Ok(AuditEntry {
                id: r.try_get("id")?,
                at: r.try_get("at")?,
                principal: r.try_get("principal")?,
                method: r.try_get("method")?,
                path: r.try_get("path")?,
                remote: r.try_get("remote")?,
                status: r.try_get("status")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(entries))
}
