//! RFC 9457 problem details: the one error body of the management API.
//!
//! Handlers return [`ApiError`]; anything else that ends in a bare 4xx/5xx
//! (unmatched route, wrong method, body limit, panic) is rewritten into the
//! same shape by [`problem_for_bare_errors`], so a client parses exactly one
//! error format.

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem details object (RFC 9457).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Problem {
    /// URI reference naming the problem type; `about:blank` when the HTTP
    /// status says it all.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The request path the problem occurred on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

impl Problem {
    /// A problem that is just its HTTP status.
    pub fn from_status(status: StatusCode, instance: Option<String>) -> Problem {
        Problem {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: None,
            instance,
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON))],
            body,
        )
            .into_response()
    }
}

/// Errors a handler can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("The state store is unavailable")]
    StoreUnavailable(#[source] crate::store::StoreError),
}

impl ApiError {
    /// The one mapping from error to wire: status and problem type.
    fn status_and_type(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::StoreUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "urn:keel:problem:store-unavailable",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_type();
        if status.is_server_error() {
            // The cause chain is for the operator's log, not for clients.
            tracing::error!(error = ?self, "request failed");
        }
        Problem {
            kind: kind.into(),
            title: self.to_string(),
            status: status.as_u16(),
            detail: None,
            instance: None,
        }
        .into_response()
    }
}

/// Middleware: gives every bare error response a problem body and fills in
/// `instance` with the request path.
pub async fn problem_for_bare_errors(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    if is_problem {
        return with_instance(response, path).await;
    }
    let (parts, _) = response.into_parts();
    let mut rewritten = Problem::from_status(status, Some(path)).into_response();
    for (name, value) in &parts.headers {
        // Keep what the client needs to act (e.g. `Allow` on 405).
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rewritten
}

/// Problem bodies from handlers are small; this bound only guards against a
/// bug producing a huge one.
const MAX_PROBLEM_BODY: usize = 64 * 1024;

async fn with_instance(response: Response, path: String) -> Response {
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_PROBLEM_BODY).await else {
        return Problem::from_status(parts.status, Some(path)).into_response();
    };
    match serde_json::from_slice::<Problem>(&bytes) {
        Ok(mut problem) if problem.instance.is_none() => {
            problem.instance = Some(path);
            let mut response = problem.into_response();
            for (name, value) in &parts.headers {
                if name != header::CONTENT_LENGTH {
                    response.headers_mut().insert(name.clone(), value.clone());
                }
            }
            response
        }
        _ => Response::from_parts(parts, axum::body::Body::from(bytes)),
    }
}
