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
    /// Stable machine-readable error code (`not-found`, `invalid-field`, ...).
    #[serde(default)]
    pub code: String,
    /// The request field the problem is about, as a dotted path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
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
            code: code_for_status(status).into(),
            field: None,
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

/// The code of a problem that is only its HTTP status (answered by a layer).
fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad-request",
        401 => "unauthenticated",
        403 => "forbidden",
        404 => "not-found",
        405 => "method-not-allowed",
        408 => "timeout",
        413 => "body-too-large",
        415 => "unsupported-media-type",
        500 => "internal",
        503 => "unavailable",
        _ => "http-error",
    }
}

/// Errors a handler can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("The state store is unavailable")]
    StoreUnavailable(#[source] crate::store::StoreError),
    #[error("The request body is not valid JSON for this operation")]
    BadJson(String),
    #[error("A field is invalid")]
    InvalidField { field: String, message: String },
    #[error("A query parameter is invalid")]
    InvalidQuery(String),
    #[error("Authentication required")]
    Unauthenticated,
    #[error("Invalid user name or password")]
    BadCredentials,
    #[error("The account is locked after too many failed logins")]
    AccountLocked,
    #[error("This account needs a TOTP code (field totp)")]
    TotpRequired,
    #[error("Not allowed for this role")]
    Forbidden,
    #[error("The API does not accept requests from this address")]
    AddressDenied(String),
    #[error("Resource not found")]
    NotFound,
    #[error("Conflicts with existing state")]
    Conflict(String),
    #[error("Quota exceeded")]
    QuotaExceeded { resource: &'static str, limit: u64 },
    #[error("If-Match header required")]
    IfMatchRequired,
    #[error("The resource changed since it was read")]
    RevisionMismatch { current: i64 },
    #[error("Idempotency-Key reused with a different request")]
    IdempotencyKeyReused,
    #[error("Internal error")]
    Internal(String),
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::StoreUnavailable(e)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::StoreUnavailable(crate::store::StoreError::Query(e))
    }
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The one mapping from error to wire: status and stable code. The
    /// problem `type` is `urn:keel:problem:<code>`.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            ApiError::StoreUnavailable(_) => (S::SERVICE_UNAVAILABLE, "store-unavailable"),
            ApiError::BadJson(_) => (S::BAD_REQUEST, "bad-json"),
            ApiError::InvalidField { .. } => (S::UNPROCESSABLE_ENTITY, "invalid-field"),
            ApiError::InvalidQuery(_) => (S::BAD_REQUEST, "invalid-query"),
            ApiError::Unauthenticated => (S::UNAUTHORIZED, "unauthenticated"),
            ApiError::BadCredentials => (S::UNAUTHORIZED, "bad-credentials"),
            ApiError::AccountLocked => (S::TOO_MANY_REQUESTS, "account-locked"),
            ApiError::TotpRequired => (S::UNAUTHORIZED, "totp-required"),
            ApiError::Forbidden => (S::FORBIDDEN, "forbidden"),
            ApiError::AddressDenied(_) => (S::FORBIDDEN, "address-denied"),
            ApiError::NotFound => (S::NOT_FOUND, "not-found"),
            ApiError::Conflict(_) => (S::CONFLICT, "conflict"),
            ApiError::QuotaExceeded { .. } => (S::CONFLICT, "quota-exceeded"),
            ApiError::IfMatchRequired => (S::PRECONDITION_REQUIRED, "if-match-required"),
            ApiError::RevisionMismatch { .. } => (S::PRECONDITION_FAILED, "revision-mismatch"),
            ApiError::IdempotencyKeyReused => (S::UNPROCESSABLE_ENTITY, "idempotency-key-reused"),
            ApiError::Internal(_) => (S::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    fn detail_and_field(&self) -> (Option<String>, Option<String>) {
        match self {
            ApiError::AddressDenied(ip) => (
                Some(format!("{ip} is not admitted by the access rules")),
                None,
            ),
            ApiError::BadJson(m) | ApiError::InvalidQuery(m) | ApiError::Conflict(m) => {
                (Some(m.clone()), None)
            }
            ApiError::InvalidField { field, message } => {
                (Some(message.clone()), Some(field.clone()))
            }
            ApiError::QuotaExceeded { resource, limit } => (
                Some(format!("The VDC quota for {resource} is {limit}")),
                Some(format!("quota.{resource}")),
            ),
            ApiError::RevisionMismatch { current } => {
                (Some(format!("Current revision is {current}")), None)
            }
            _ => (None, None),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            // The cause chain is for the operator's log, not for clients.
            tracing::error!(error = ?self, "request failed");
        }
        let (detail, field) = self.detail_and_field();
        Problem {
            kind: format!("urn:keel:problem:{code}"),
            title: self.to_string(),
            status: status.as_u16(),
            detail,
            instance: None,
            code: code.into(),
            field,
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
