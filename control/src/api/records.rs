//! The generic resource row and the change feed, shared by every resource
//! family: one `resources` table, a revision per row, and an `events` row
//! appended in the same transaction as every change.
//!
//! SQL here stays portable (no SQLite-only syntax) so a PostgreSQL backend
//! can run the same statements; only the connection type is SQLite today.

use crate::store::DbConnection;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use super::listing::{ListQuery, Page};
use super::problem::ApiError;

/// Status of a resource that a data plane must realize while none has.
pub const PENDING: &str = "PENDING";
/// Status of a resource that lives only in the store (VDCs, users).
pub const READY: &str = "READY";

/// Columns every resource carries.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Meta {
    pub id: String,
    /// Owning VDC.
    pub vdc_id: Option<String>,
    pub name: String,
    /// `READY` for store-only resources; `PENDING` for resources a data plane
    /// must realize until the host agent reports them served (`ACTIVE`).
    pub status: String,
    /// Bumped on every change; sent as the `ETag` and checked with `If-Match`.
    pub revision: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone)]
pub struct Record {
    pub meta: Meta,
    pub parent_id: Option<String>,
    pub spec: serde_json::Value,
}

/// A spec or status as the JSON stored in a record.
pub fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError::Internal(e.to_string()))
}

impl Record {
    pub fn spec<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_value(self.spec.clone())
            .map_err(|e| ApiError::Internal(format!("stored spec of {}: {e}", self.meta.id)))
    }
}

fn record_from_row(row: &crate::store::DbRow) -> Result<Record, ApiError> {
    let spec: String = row.try_get("spec")?;
    Ok(Record {
        meta: Meta {
            id: row.try_get("id")?,
            vdc_id: row.try_get("vdc_id")?,
            name: row.try_get("name")?,
            status: row.try_get("status")?,
            revision: row.try_get("revision")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        },
        parent_id: row.try_get("parent_id")?,
        spec: serde_json::from_str(&spec)
            .map_err(|e| ApiError::Internal(format!("stored spec: {e}")))?,
    })
}

const COLUMNS: &str =
    "id, kind, vdc_id, parent_id, name, spec, status, revision, created_at, updated_at";

pub fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Appends one change to the feed; call inside the transaction of the change.
pub async fn append_event(
    conn: &mut DbConnection,
    resource_type: &str,
    resource_id: &str,
    action: &str,
    vdc_id: Option<&str>,
    revision: i64,
) -> Result<i64, ApiError> {
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO events (at, resource_type, resource_id, action, vdc_id, revision) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq",
    )
    .bind(now_ms())
    .bind(resource_type)
    .bind(resource_id)
    .bind(action)
    .bind(vdc_id)
    .bind(revision)
    .fetch_one(&mut *conn)
    .await?;
    if crate::store::backend_of(conn) == crate::store::Backend::Postgres {
        // Delivered at commit to every keel process sharing the database:
        // their event streams and task watchers look for news at once.
        sqlx::query("SELECT pg_notify('keel_changes', '')")
            .execute(&mut *conn)
            .await?;
    }
    Ok(seq)
}

pub struct NewRecord<'a> {
    pub kind: &'a str,
    pub vdc_id: Option<&'a str>,
    pub parent_id: Option<&'a str>,
    pub name: &'a str,
    pub spec: serde_json::Value,
    pub status: &'a str,
}

pub async fn insert(conn: &mut DbConnection, new: NewRecord<'_>) -> Result<Record, ApiError> {
    let id = uuid::Uuid::new_v4().to_string();
    insert_with_id(conn, &id, new).await
}

/// As [`insert`], with an id the caller chose (a host's machine id).
pub async fn insert_with_id(
    conn: &mut DbConnection,
    id: &str,
    new: NewRecord<'_>,
) -> Result<Record, ApiError> {
    let id = id.to_owned();
    // A VDC owns itself, so tenant visibility is one column compare.
    let vdc_id = if new.kind == "vdc" {
        Some(id.as_str())
    } else {
        new.vdc_id
    };
    let now = now_ms();
    let row = sqlx::query(&format!(
        "INSERT INTO resources ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $9) RETURNING {COLUMNS}"
    ))
    .bind(&id)
    .bind(new.kind)
    .bind(vdc_id)
    .bind(new.parent_id)
    .bind(new.name)
    .bind(new.spec.to_string())
    .bind(new.status)
    .bind(now)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    let record = record_from_row(&row)?;
    append_event(
        conn,
        new.kind,
        &id,
        "created",
        record.meta.vdc_id.as_deref(),
        1,
    )
    .await?;
    Ok(record)
}

pub async fn get(
    conn: &mut DbConnection,
    kind: &str,
    id: &str,
) -> Result<Option<Record>, ApiError> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM resources WHERE kind = $1 AND id = $2"
    ))
    .bind(kind)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(record_from_row).transpose()
}

/// Writes a new name/spec if the stored revision is still `expected`.
pub async fn update(
    conn: &mut DbConnection,
    record: &Record,
    kind: &str,
    name: &str,
    spec: serde_json::Value,
) -> Result<Record, ApiError> {
    let row = sqlx::query(&format!(
        "UPDATE resources SET name = $1, spec = $2, revision = revision + 1, updated_at = $3 \
         WHERE kind = $4 AND id = $5 AND revision = $6 RETURNING {COLUMNS}"
    ))
    .bind(name)
    .bind(spec.to_string())
    .bind(now_ms())
    .bind(kind)
    .bind(&record.meta.id)
    .bind(record.meta.revision)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Err(ApiError::RevisionMismatch {
            current: record.meta.revision,
        });
    };
    let updated = record_from_row(&row)?;
    append_event(
        conn,
        kind,
        &updated.meta.id,
        "updated",
        updated.meta.vdc_id.as_deref(),
        updated.meta.revision,
    )
    .await?;
    Ok(updated)
}

/// Records what a host agent observed: the status (and optionally a new
/// spec) without a client's revision check, bumping the revision so caches
/// and `If-Match` holders see the change. `None` when the row is gone.
pub async fn observe(
    conn: &mut DbConnection,
    kind: &str,
    id: &str,
    status: &str,
    spec: Option<serde_json::Value>,
) -> Result<Option<Record>, ApiError> {
    let Some(current) = get(conn, kind, id).await? else {
        return Ok(None);
    };
    let spec = spec.unwrap_or_else(|| current.spec.clone());
    if current.meta.status == status && current.spec == spec {
        return Ok(Some(current));
    }
    let row = sqlx::query(&format!(
        "UPDATE resources SET status = $1, spec = $2, revision = revision + 1, updated_at = $3 \
         WHERE kind = $4 AND id = $5 RETURNING {COLUMNS}"
    ))
    .bind(status)
    .bind(spec.to_string())
    .bind(now_ms())
    .bind(kind)
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    let updated = record_from_row(&row)?;
    append_event(
        conn,
        kind,
        id,
        "updated",
        updated.meta.vdc_id.as_deref(),
        updated.meta.revision,
    )
    .await?;
    Ok(Some(updated))
}

/// What a host agent observed about a resource whose spec it shares with
/// API callers: re-reads the record inside the write so a concurrent
/// action or replace is never overwritten (only `update`'s fields change),
/// and moves the status only from one of `from` (so a reconcile pass cannot
/// undo an action queued meanwhile). `None` keeps the status.
pub async fn observe_spec<S: serde::de::DeserializeOwned + serde::Serialize>(
    conn: &mut DbConnection,
    kind: &str,
    id: &str,
    status: Option<(&[&str], &str)>,
    update: impl FnOnce(&mut S),
) -> Result<(), ApiError> {
    let Some(record) = get(conn, kind, id).await? else {
        return Ok(());
    };
    let mut spec: S = record.spec()?;
    let status = match status {
        Some((from, to)) if from.contains(&record.meta.status.as_str()) => to,
        Some(_) => return Ok(()),
        None => record.meta.status.as_str(),
    };
    update(&mut spec);
    observe(conn, kind, id, status, Some(to_json(&spec)?)).await?;
    Ok(())
}

/// Every resource of `kind`, oldest first (host agents reconcile all).
pub async fn all(conn: &mut DbConnection, kind: &str) -> Result<Vec<Record>, ApiError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM resources WHERE kind = $1 ORDER BY created_at, id"
    ))
    .bind(kind)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(record_from_row).collect()
}

/// Kinds that outlive their parent: a backup is there to restore a volume
/// or VM that was deleted, so deleting the parent only unlinks them.
const OUTLIVE_PARENT: [&str; 2] = ["backup", "vm_backup"];

pub async fn delete(conn: &mut DbConnection, record: &Record, kind: &str) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE resources SET parent_id = NULL, revision = revision + 1, updated_at = $2 \
         WHERE parent_id = $1 AND kind IN ($3, $4)",
    )
    .bind(&record.meta.id)
    .bind(now_ms())
    .bind(OUTLIVE_PARENT[0])
    .bind(OUTLIVE_PARENT[1])
    .execute(&mut *conn)
    .await?;
    let children: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM resources WHERE parent_id = $1")
        .bind(&record.meta.id)
        .fetch_one(&mut *conn)
        .await?;
    if children > 0 {
        return Err(ApiError::Conflict(format!(
            "{kind} {} still contains {children} resource(s)",
            record.meta.id
        )));
    }
    let done = sqlx::query("DELETE FROM resources WHERE kind = $1 AND id = $2 AND revision = $3")
        .bind(kind)
        .bind(&record.meta.id)
        .bind(record.meta.revision)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::RevisionMismatch {
            current: record.meta.revision,
        });
    }
    append_event(
        conn,
        kind,
        &record.meta.id,
        "deleted",
        record.meta.vdc_id.as_deref(),
        record.meta.revision + 1,
    )
    .await?;
    Ok(())
}

pub async fn count(conn: &mut DbConnection, kind: &str, vdc_id: &str) -> Result<u64, ApiError> {
    let n: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM resources WHERE kind = $1 AND vdc_id = $2")
            .bind(kind)
            .bind(vdc_id)
            .fetch_one(&mut *conn)
            .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub async fn children(
    conn: &mut DbConnection,
    kind: &str,
    parent_id: &str,
) -> Result<Vec<Record>, ApiError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM resources WHERE kind = $1 AND parent_id = $2"
    ))
    .bind(kind)
    .bind(parent_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(record_from_row).collect()
}

/// One page of `kind`, restricted to `vdc` (tenants) and the query filters.
pub async fn list(
    conn: &mut DbConnection,
    kind: &str,
    vdc: Option<&str>,
    query: &ListQuery,
) -> Result<Page<Record>, ApiError> {
    let plan = query.plan()?;
    let mut sql = format!("SELECT {COLUMNS} FROM resources WHERE kind = ?");
    if vdc.is_some() {
        sql.push_str(" AND vdc_id = ?");
    }
    if query.vdc_id.is_some() {
        sql.push_str(" AND vdc_id = ?");
    }
    if query.parent_id.is_some() {
        sql.push_str(" AND parent_id = ?");
    }
    if query.status.is_some() {
        sql.push_str(" AND status = ?");
    }
    if query.name.is_some() {
        sql.push_str(" AND name = ?");
    }
    if query.q.is_some() {
        sql.push_str(" AND LOWER(name) LIKE ?");
    }
    if plan.after.is_some() {
        let cmp = if plan.descending { "<" } else { ">" };
        let col = plan.column;
        sql.push_str(&format!(
            " AND ({col} {cmp} ? OR ({col} = ? AND id {cmp} ?))"
        ));
    }
    let dir = if plan.descending { "DESC" } else { "ASC" };
    sql.push_str(&format!(
        " ORDER BY {} {dir}, id {dir} LIMIT ?",
        plan.column
    ));
    let sql = crate::store::numbered(&sql);
    let mut q = sqlx::query(&sql).bind(kind);
    for value in [vdc, query.vdc_id.as_deref(), query.parent_id.as_deref()]
        .into_iter()
        .flatten()
    {
        q = q.bind(value.to_owned());
    }
    if let Some(s) = &query.status {
        q = q.bind(s.clone());
    }
    if let Some(n) = &query.name {
        q = q.bind(n.clone());
    }
    if let Some(text) = &query.q {
        let escaped = text.to_lowercase().replace(['%', '_'], "");
        q = q.bind(format!("%{escaped}%"));
    }
    if let Some((value, id)) = &plan.after {
        q = match value {
            super::listing::SortValue::Int(v) => q.bind(*v).bind(*v),
            super::listing::SortValue::Text(v) => q.bind(v.clone()).bind(v.clone()),
        };
        q = q.bind(id.clone());
    }
    let limit = plan.limit;
    let rows = q.bind(i64::from(limit) + 1).fetch_all(&mut *conn).await?;
    let mut items = rows
        .iter()
        .map(record_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let more = items.len() > usize::from(limit);
    items.truncate(usize::from(limit));
    let next_cursor = match items.last() {
        Some(last) if more => Some(plan.cursor_after(&last.meta)),
        _ => None,
    };
    Ok(Page { items, next_cursor })
}

/// Every resource of `kind` owned by `vdc_id`.
pub async fn in_vdc(
    conn: &mut DbConnection,
    kind: &str,
    vdc_id: &str,
) -> Result<Vec<Record>, ApiError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM resources WHERE kind = $1 AND vdc_id = $2"
    ))
    .bind(kind)
    .bind(vdc_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(record_from_row).collect()
}
