//! Response helpers shared by the resource modules: every single-resource
//! answer carries its revision as `ETag`, creates add `Location`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use sqlx::SqliteConnection;

use super::auth::{Action, Family, Principal};
use super::extract::etag;
use super::problem::ApiError;
use super::records::{self, Record};

pub fn with_etag<T: Serialize>(status: StatusCode, revision: i64, body: &T) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&etag(revision)) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

pub fn created<T: Serialize>(location: &str, revision: i64, body: &T) -> Response {
    let mut response = with_etag(StatusCode::CREATED, revision, body);
    if let Ok(v) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

/// Loads a resource and authorizes `action` on it (404 when invisible).
pub async fn load(
    conn: &mut SqliteConnection,
    principal: &Principal,
    family: Family,
    action: Action,
    kind: &str,
    id: &str,
) -> Result<Record, ApiError> {
    let record = records::get(conn, kind, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    principal.authorize(family, action, record.meta.vdc_id.as_deref())?;
    Ok(record)
}

/// Checks `If-Match` against the loaded revision.
pub fn check_revision(record: &Record, expected: i64) -> Result<(), ApiError> {
    if record.meta.revision == expected {
        Ok(())
    } else {
        Err(ApiError::RevisionMismatch {
            current: record.meta.revision,
        })
    }
}

/// Resolves a VDC referenced from a request body: one the caller cannot
/// see is reported exactly like one that does not exist.
pub async fn referenced_vdc(
    conn: &mut SqliteConnection,
    principal: &Principal,
    field: &str,
    id: &str,
) -> Result<Record, ApiError> {
    match records::get(conn, "vdc", id).await? {
        Some(vdc) if principal.sees(vdc.meta.vdc_id.as_deref()) => Ok(vdc),
        _ => Err(ApiError::invalid(field, format!("no VDC {id}"))),
    }
}
