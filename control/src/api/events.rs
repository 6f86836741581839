//! The change feed: `GET /events?after=SEQ` pages through it,
//! `GET /events/stream` pushes it as Server-Sent Events, resumable with
//! `Last-Event-ID` (the sequence number), and `GET /events/watch` pushes it
//! over a WebSocket (one JSON text message per event, resumable with
//! `?after=`). Rows are written in the same
//! transaction as the change they describe, so a watcher that resumes from
//! its last sequence number misses nothing. Tenants see their VDC's events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::Response;
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::ValidQuery;
use super::problem::{ApiError, Problem};
use super::AppState;

/// A stream with no new events re-checks the table this often, covering a
/// wake-up missed between its query and its wait.
const STREAM_POLL: Duration = Duration::from_secs(1);
const PAGE: i64 = 500;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Sequence number, increasing; resume after it.
    pub seq: i64,
    pub at: i64,
    pub resource_type: String,
    pub resource_id: String,
    /// `created`, `updated` or `deleted`.
    pub action: String,
    pub vdc_id: Option<String>,
    /// Revision of the resource after the change.
    pub revision: i64,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only events with a greater sequence number.
    pub after: Option<i64>,
    /// At most this many (1..=500, default 500).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

pub async fn fetch(
    state: &AppState,
    principal: &Principal,
    after: i64,
    limit: i64,
) -> Result<Vec<Event>, ApiError> {
    let scope = principal.list_scope();
    let sql = if scope.is_some() {
        "SELECT seq, at, resource_type, resource_id, action, vdc_id, revision FROM events \
         WHERE seq > $1 AND vdc_id = $2 ORDER BY seq LIMIT $3"
    } else {
        "SELECT seq, at, resource_type, resource_id, action, vdc_id, revision FROM events \
         WHERE seq > $1 ORDER BY seq LIMIT $2"
    };
    let mut query = sqlx::query(sql).bind(after);
    if let Some(vdc) = scope {
        query = query.bind(vdc.to_owned());
    }
    let rows = query.bind(limit).fetch_all(state.store.pool()).await?;
    rows.iter()
        .map(|r| {
            Ok(Event {
                seq: r.try_get("seq")?,
                at: r.try_get("at")?,
                resource_type: r.try_get("resource_type")?,
                resource_id: r.try_get("resource_id")?,
                action: r.try_get("action")?,
                vdc_id: r.try_get("vdc_id")?,
                revision: r.try_get("revision")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(ApiError::from)
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_events))
        .routes(routes!(stream_events))
        .routes(routes!(watch_events))
}

/// The change feed over a WebSocket, from `after` on.
#[utoipa::path(get, path = "/events/watch", tag = "events", params(EventQuery),
    responses(
        (status = 101, description = "WebSocket: every change after `after` as a JSON text message (an Event), oldest first, then live"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn watch_events(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<EventQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    principal.require(Family::Event, Action::Read)?;
    let after = query.after.unwrap_or(0);
    Ok(upgrade.on_upgrade(move |ws| push_events(state, principal, after, ws)))
}

async fn push_events(state: AppState, principal: Principal, mut after: i64, mut ws: WebSocket) {
    loop {
        let wake = state.changes.notified();
        let batch = match fetch(&state, &principal, after, PAGE).await {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(?error, "event watch query failed; closing it");
                return;
            }
        };
        for event in &batch {
            let Ok(text) = serde_json::to_string(event) else {
                return;
            };
            if ws.send(Message::Text(text.into())).await.is_err() {
                return;
            }
            after = event.seq;
        }
        if !batch.is_empty() {
            continue;
        }
        tokio::select! {
            _ = tokio::time::timeout(STREAM_POLL, wake) => {}
            incoming = ws.recv() => {
                if matches!(incoming, None | Some(Err(_)) | Some(Ok(Message::Close(_)))) {
                    return;
                }
            }
        }
    }
}

/// Changes after a sequence number, oldest first.
#[utoipa::path(get, path = "/events", tag = "events", params(EventQuery),
    responses(
        (status = 200, description = "Events", body = Vec<Event>),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn list_events(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<EventQuery>,
) -> Result<Json<Vec<Event>>, ApiError> {
    principal.require(Family::Event, Action::Read)?;
    let limit = query.limit.unwrap_or(PAGE);
    if !(1..=PAGE).contains(&limit) {
        return Err(ApiError::InvalidQuery(format!("limit must be 1..={PAGE}")));
    }
    Ok(Json(
        fetch(&state, &principal, query.after.unwrap_or(0), limit).await?,
    ))
}

/// Server-Sent Events of every change after `after` or `Last-Event-ID`;
/// each event's `id` is its sequence number and `data` the JSON event.
#[utoipa::path(get, path = "/events/stream", tag = "events", params(EventQuery),
    responses(
        (status = 200, description = "text/event-stream of Event", content_type = "text/event-stream", body = Event),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn stream_events(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    ValidQuery(query): ValidQuery<EventQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    principal.require(Family::Event, Action::Read)?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim()
                .parse::<i64>()
                .map_err(|_| ApiError::invalid("Last-Event-ID", "must be a sequence number"))
        })
        .transpose()?;
    let after = resume.or(query.after).unwrap_or(0);
    let init = (state, principal, after, VecDeque::<Event>::new());
    let events = stream::unfold(
        init,
        |(state, principal, mut after, mut queue)| async move {
            loop {
                if let Some(event) = queue.pop_front() {
                    let sse = SseEvent::default()
                        .id(event.seq.to_string())
                        .event("change")
                        .json_data(&event)
                        .unwrap_or_default();
                    return Some((Ok(sse), (state, principal, after, queue)));
                }
                let wake = state.changes.notified();
                match fetch(&state, &principal, after, PAGE).await {
                    Ok(batch) if !batch.is_empty() => {
                        after = batch.last().map_or(after, |e| e.seq);
                        queue.extend(batch);
                    }
                    Ok(_) => {
                        let _ = tokio::time::timeout(STREAM_POLL, wake).await;
                    }
                    Err(error) => {
                        tracing::warn!(?error, "event stream query failed; ending the stream");
                        return None;
                    }
                }
            }
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
