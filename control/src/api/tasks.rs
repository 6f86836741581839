//! `/tasks`: asynchronous operations. Every call that needs the hypervisor
//! or long I/O (VM actions, volume provisioning) answers `202 Accepted` with
//! `Location: /api/v1/tasks/{id}` and a queued task; the host agent runs it
//! and records progress, the outcome and the hypervisor's message. Tasks of
//! one resource run in the order they were accepted. `GET /tasks/{id}/watch`
//! pushes a task's progress over a WebSocket until it ends.

use std::time::Duration;

use crate::store::DbConnection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::ValidQuery;
use super::problem::{ApiError, Problem};
use super::records::{append_event, now_ms};
use super::AppState;

pub const QUEUED: &str = "QUEUED";
pub const RUNNING: &str = "RUNNING";
pub const SUCCEEDED: &str = "SUCCEEDED";
pub const FAILED: &str = "FAILED";

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub id: String,
    pub vdc_id: Option<String>,
    /// `vm`, `volume`, ...
    pub resource_type: String,
    pub resource_id: String,
    /// `create`, `start`, `stop`, `force-stop`, `delete`, ...
    pub action: String,
    pub params: serde_json::Value,
    /// `QUEUED`, `RUNNING`, `SUCCEEDED` or `FAILED`.
    pub state: String,
    /// Percent done.
    pub progress: i64,
    /// What happened: the failure (with the hypervisor's own message) or a
    /// progress note.
    pub message: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// The host whose agent must run it (a VM's tasks run where the VM
    /// is); null: any host's agent.
    pub host_id: Option<String>,
}

impl Task {
    pub fn finished(&self) -> bool {
        self.state == SUCCEEDED || self.state == FAILED
    }
}

const COLUMNS: &str = "id, vdc_id, resource_type, resource_id, action, params, state, progress, message, created_at, updated_at, host_id";

fn task_from_row(row: &crate::store::DbRow) -> Result<Task, ApiError> {
    let params: String = row.try_get("params")?;
    Ok(Task {
        id: row.try_get("id")?,
        vdc_id: row.try_get("vdc_id")?,
        resource_type: row.try_get("resource_type")?,
        resource_id: row.try_get("resource_id")?,
        action: row.try_get("action")?,
        params: serde_json::from_str(&params)
            .map_err(|e| ApiError::Internal(format!("stored task params: {e}")))?,
        state: row.try_get("state")?,
        progress: row.try_get("progress")?,
        message: row.try_get("message")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        host_id: row.try_get("host_id")?,
    })
}

/// Queues a task; call in the transaction that changed the resource.
pub async fn enqueue(
    conn: &mut DbConnection,
    vdc_id: Option<&str>,
    resource_type: &str,
    resource_id: &str,
    action: &str,
    params: serde_json::Value,
) -> Result<Task, ApiError> {
    let id = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    // A VM's work runs on its host, a volume's where its file is;
    // everything else (and a volume not made yet) on any host's agent.
    let host_id: Option<String> =
        if resource_type == super::vms::KIND || resource_type == super::volumes::KIND {
            let backend = crate::store::backend_of(conn);
            sqlx::query_scalar(&format!(
                "SELECT {} FROM resources WHERE kind = $1 AND id = $2",
                crate::store::json_text(backend, "spec", "host_id")
            ))
            .bind(resource_type)
            .bind(resource_id)
            .fetch_optional(&mut *conn)
            .await?
            .flatten()
        } else {
            None
        };
    let row = sqlx::query(&format!(
        "INSERT INTO tasks ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, '', $8, $9, $10) \
         RETURNING {COLUMNS}"
    ))
    .bind(&id)
    .bind(vdc_id)
    .bind(resource_type)
    .bind(resource_id)
    .bind(action)
    .bind(params.to_string())
    .bind(QUEUED)
    .bind(now)
    .bind(now)
    .bind(host_id)
    .fetch_one(&mut *conn)
    .await?;
    append_event(conn, "task", &id, "created", vdc_id, 1).await?;
    task_from_row(&row)
}

/// Whether `resource_id` has work not finished yet (a second conflicting
/// action is refused instead of queued behind it).
pub async fn pending_for(
    conn: &mut DbConnection,
    resource_id: &str,
) -> Result<Option<Task>, ApiError> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM tasks WHERE resource_id = $1 AND state IN ('QUEUED', 'RUNNING') ORDER BY seq LIMIT 1"
    ))
    .bind(resource_id)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(task_from_row).transpose()
}

/// The oldest task the agent of `host_id` may run, marked RUNNING and
/// claimed by it. Tasks left RUNNING by this agent (it crashed) or by an
/// agent whose heartbeat expired are taken again first: their actions are
/// idempotent by design (start of a running VM succeeds, and so on).
pub async fn claim_next(conn: &mut DbConnection, host_id: &str) -> Result<Option<Task>, ApiError> {
    // Tasks for this host or any host; RUNNING ones first when their agent
    // was this one (it crashed) or has stopped beating; a QUEUED one only
    // when nothing else runs on its resource (per-resource order).
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM tasks t WHERE (t.host_id IS NULL OR t.host_id = $1) AND ( \
           (t.state = 'RUNNING' AND (t.claimed_by IS NULL OR t.claimed_by = $1 OR NOT EXISTS \
              (SELECT 1 FROM heartbeats h WHERE h.host_id = t.claimed_by AND h.at > $2))) \
           OR (t.state = 'QUEUED' AND NOT EXISTS \
              (SELECT 1 FROM tasks r WHERE r.resource_id = t.resource_id AND r.state = 'RUNNING'))) \
         ORDER BY CASE t.state WHEN 'RUNNING' THEN 0 ELSE 1 END, t.seq LIMIT 1"
    ))
    .bind(host_id)
    .bind(now_ms() - super::hosts::HEARTBEAT_EXPIRY_MS)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let mut task = task_from_row(&row)?;
    sqlx::query("UPDATE tasks SET claimed_by = $1 WHERE id = $2")
        .bind(host_id)
        .bind(&task.id)
        .execute(&mut *conn)
        .await?;
    if task.state == QUEUED {
        set_state(conn, &task.id, RUNNING, 0, "").await?;
        task.state = RUNNING.into();
    }
    Ok(Some(task))
}

/// Records progress or the outcome of a task.
pub async fn set_state(
    conn: &mut DbConnection,
    id: &str,
    state: &str,
    progress: i64,
    message: &str,
) -> Result<(), ApiError> {
    let row = sqlx::query(
        "UPDATE tasks SET state = $1, progress = $2, message = $3, updated_at = $4 WHERE id = $5 RETURNING vdc_id",
    )
    .bind(state)
    .bind(progress)
    .bind(message)
    .bind(now_ms())
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = row {
        let vdc_id: Option<String> = row.try_get("vdc_id")?;
        append_event(conn, "task", id, "updated", vdc_id.as_deref(), progress).await?;
    }
    Ok(())
}

/// `202 Accepted` pointing at the task.
pub fn accepted(task: &Task) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(task)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/tasks/{}", task.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TaskQuery {
    /// Only tasks of this resource.
    pub resource_id: Option<String>,
    /// Only tasks in this state.
    pub state: Option<String>,
    /// At most this many, newest first (1..=500, default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TaskPage {
    pub items: Vec<Task>,
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tasks))
        .routes(routes!(get_task))
        .routes(routes!(watch_task))
}

/// How often a watch re-reads its task when no change woke it (the host
/// agent may write from another process).
const WATCH_POLL: Duration = Duration::from_millis(500);

#[utoipa::path(get, path = "/tasks", tag = "compute", params(TaskQuery),
    responses(
        (status = 200, description = "Newest first", body = TaskPage),
        (status = 400, description = "Bad query", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn list_tasks(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<TaskQuery>,
) -> Result<Json<TaskPage>, ApiError> {
    principal.require(Family::Compute, Action::Read)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::InvalidQuery("limit must be 1..=500".into()));
    }
    let mut sql = format!("SELECT {COLUMNS} FROM tasks WHERE 1 = 1");
    let scope = principal.list_scope().map(str::to_owned);
    if scope.is_some() {
        sql.push_str(" AND vdc_id = ?");
    }
    if query.resource_id.is_some() {
        sql.push_str(" AND resource_id = ?");
    }
    if query.state.is_some() {
        sql.push_str(" AND state = ?");
    }
    sql.push_str(" ORDER BY seq DESC LIMIT ?");
    let sql = crate::store::numbered(&sql);
    let mut q = sqlx::query(&sql);
    for v in [scope, query.resource_id, query.state]
        .into_iter()
        .flatten()
    {
        q = q.bind(v);
    }
    let rows = q.bind(limit).fetch_all(state.store.pool()).await?;
    Ok(Json(TaskPage {
        items: rows.iter().map(task_from_row).collect::<Result<_, _>>()?,
    }))
}

#[utoipa::path(get, path = "/tasks/{id}", tag = "compute", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The task", body = Task),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_task(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Task>, ApiError> {
    Ok(Json(visible_task(&state, &principal, &id).await?))
}

async fn visible_task(state: &AppState, principal: &Principal, id: &str) -> Result<Task, ApiError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM tasks WHERE id = $1"))
        .bind(id)
        .fetch_optional(state.store.pool())
        .await?
        .ok_or(ApiError::NotFound)?;
    let task = task_from_row(&row)?;
    principal.authorize(Family::Compute, Action::Read, task.vdc_id.as_deref())?;
    Ok(task)
}

#[utoipa::path(get, path = "/tasks/{id}/watch", tag = "compute", params(("id" = String, Path)),
    responses(
        (status = 101, description = "WebSocket: the task as a JSON text message now and after every change of its state, progress or message; closed (code 1000) once it SUCCEEDED or FAILED"),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn watch_task(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // Refuse before upgrading, so a bad id is a plain 404.
    visible_task(&state, &principal, &id).await?;
    Ok(upgrade.on_upgrade(move |ws| push_task(state, principal, id, ws)))
}

/// Sends the task whenever it changed, until it ends or the client leaves.
async fn push_task(state: AppState, principal: Principal, id: String, mut ws: WebSocket) {
    let mut sent: Option<(String, i64, String)> = None;
    loop {
        let wake = state.changes.notified();
        let task = match visible_task(&state, &principal, &id).await {
            Ok(t) => t,
            Err(error) => {
                tracing::warn!(task = %id, ?error, "task watch ends: task unreadable");
                return;
            }
        };
        let seen = (task.state.clone(), task.progress, task.message.clone());
        if sent.as_ref() != Some(&seen) {
            let Ok(text) = serde_json::to_string(&task) else {
                return;
            };
            if ws.send(Message::Text(text.into())).await.is_err() {
                return;
            }
            sent = Some(seen);
        }
        if task.state == SUCCEEDED || task.state == FAILED {
            let close = CloseFrame {
                code: 1000,
                reason: task.state.into(),
            };
            let _ = ws.send(Message::Close(Some(close))).await;
            return;
        }
        tokio::select! {
            _ = tokio::time::timeout(WATCH_POLL, wake) => {}
            incoming = ws.recv() => {
                // The client closed or went away; anything else it sends is ignored.
                if matches!(incoming, None | Some(Err(_)) | Some(Ok(Message::Close(_)))) {
                    return;
                }
            }
        }
    }
}
