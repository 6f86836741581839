//! Response helpers shared by the resource modules: every single-resource
//! answer carries its revision as `ETag`, creates add `Location`.

use crate::store::{DbConnection, DbTransaction};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::auth::{Action, Family, Principal};
use super::extract::{etag, if_match};
use super::listing::{ListQuery, Page};
use super::problem::ApiError;
use super::records::{self, Record};
use super::AppState;

/// A stored resource kind and its API representation: what the shared
/// read, list and delete shells below need to know about it.
pub trait Resource: Serialize + Sized {
    /// The `kind` column of its records.
    const KIND: &'static str;
    /// The permission family that guards it.
    const FAMILY: Family;
    /// Owned by the cloud, not a VDC (hosts): callers need the family's
    /// permission before anything else, and lists are never VDC-scoped.
    const SYSTEM_WIDE: bool = false;

    fn from_record(record: Record) -> Result<Self, ApiError>;
}

/// `GET /{kind}/{id}`: the resource with its revision as `ETag`.
pub async fn get_one<R: Resource>(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<Response, ApiError> {
    let mut conn = state.store.pool().acquire().await?;
    let record = load_resource::<R>(&mut conn, principal, Action::Read, id).await?;
    ok::<R>(record)
}

/// `GET /{kind}`: one page of the resources the caller may see.
pub async fn list_page<R: Resource>(
    state: &AppState,
    principal: &Principal,
    query: &ListQuery,
) -> Result<Page<R>, ApiError> {
    principal.require(R::FAMILY, Action::Read)?;
    let scope = if R::SYSTEM_WIDE {
        None
    } else {
        principal.list_scope()
    };
    let mut conn = state.store.pool().acquire().await?;
    let Page { items, next_cursor } = records::list(&mut conn, R::KIND, scope, query).await?;
    Ok(Page {
        items: items
            .into_iter()
            .map(R::from_record)
            .collect::<Result<_, _>>()?,
        next_cursor,
    })
}

/// 200 with the resource and its revision as `ETag`.
pub fn ok<R: Resource>(record: Record) -> Result<Response, ApiError> {
    let revision = record.meta.revision;
    Ok(with_etag(
        StatusCode::OK,
        revision,
        &R::from_record(record)?,
    ))
}

/// Starts an update or delete guarded by `If-Match`: a write transaction
/// holding the authorized record at the revision the caller read.
pub async fn begin_change<R: Resource>(
    state: &AppState,
    principal: &Principal,
    action: Action,
    id: &str,
    headers: &HeaderMap,
) -> Result<(DbTransaction, Record), ApiError> {
    let expected = if_match(headers)?;
    let mut tx = state.store.begin_write().await?;
    let record = load_resource::<R>(&mut tx, principal, action, id).await?;
    check_revision(&record, expected)?;
    Ok((tx, record))
}

/// Deletes the record loaded by [`begin_change`] and commits.
pub async fn finish_delete<R: Resource>(
    mut tx: DbTransaction,
    record: &Record,
) -> Result<StatusCode, ApiError> {
    records::delete(&mut tx, record, R::KIND).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

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

/// Loads an `R` and authorizes `action` on it: a system-wide resource
/// needs only the family's permission (everyone permitted sees it), a VDC's
/// resource also visibility (404 when invisible).
async fn load_resource<R: Resource>(
    conn: &mut DbConnection,
    principal: &Principal,
    action: Action,
    id: &str,
) -> Result<Record, ApiError> {
    if !R::SYSTEM_WIDE {
        return load(conn, principal, R::FAMILY, action, R::KIND, id).await;
    }
    principal.require(R::FAMILY, action)?;
    records::get(conn, R::KIND, id)
        .await?
        .ok_or(ApiError::NotFound)
}

/// Loads a resource and authorizes `action` on it (404 when invisible).
pub async fn load(
    conn: &mut DbConnection,
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

/// Loads a resource for a task-queuing action: visible and updatable by
/// the caller, no task still running on it, and in one of `allowed`
/// (`noun` names the kind in the refusals).
pub async fn load_for_action<R: Resource>(
    conn: &mut DbConnection,
    principal: &Principal,
    noun: &str,
    id: &str,
    what: &str,
    allowed: &[&str],
) -> Result<Record, ApiError> {
    let record = load(conn, principal, R::FAMILY, Action::Update, R::KIND, id).await?;
    if let Some(task) = super::tasks::pending_for(conn, id).await? {
        return Err(ApiError::Conflict(format!(
            "task {} ({}) is still {} on this {noun}",
            task.id, task.action, task.state
        )));
    }
    if !allowed.contains(&record.meta.status.as_str()) {
        return Err(ApiError::Conflict(format!(
            "cannot {what} a {noun} that is {}; allowed when {}",
            record.meta.status,
            allowed.join(" or ")
        )));
    }
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

/// Stores a new `R` of VDC `vdc_id` (its parent too) in `status`, commits,
/// and answers 201 with its location in `collection` (`/api/v1/port-sets`).
pub async fn create_in_vdc<R: Resource>(
    mut tx: DbTransaction,
    collection: &str,
    vdc_id: &str,
    name: &str,
    spec: serde_json::Value,
    status: &str,
) -> Result<Response, ApiError> {
    let record = records::insert(
        &mut tx,
        records::NewRecord {
            kind: R::KIND,
            vdc_id: Some(vdc_id),
            parent_id: Some(vdc_id),
            name,
            spec,
            status,
        },
    )
    .await?;
    tx.commit().await?;
    let location = format!("{collection}/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(&location, revision, &R::from_record(record)?))
}

/// The VDC a new resource goes in: the one the body names, else the
/// caller's own (a system admin has none and must name one).
pub fn target_vdc(principal: &Principal, named: Option<String>) -> Result<String, ApiError> {
    named
        .or_else(|| principal.vdc_id.clone())
        .ok_or_else(|| ApiError::invalid("vdc_id", "required"))
}

/// Resolves a VDC referenced from a request body: one the caller cannot
/// see is reported exactly like one that does not exist.
pub async fn referenced_vdc(
    conn: &mut DbConnection,
    principal: &Principal,
    field: &str,
    id: &str,
) -> Result<Record, ApiError> {
    match records::get(conn, "vdc", id).await? {
        Some(vdc) if principal.sees(vdc.meta.vdc_id.as_deref()) => Ok(vdc),
        _ => Err(ApiError::invalid(field, format!("no VDC {id}"))),
    }
}
