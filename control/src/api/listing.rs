//! List conventions shared by every collection: cursor pagination
//! (`limit`, `cursor`), exact filters, `?q=` name search and `sort`.
//!
//! The cursor is opaque to clients: hex of `[sort value, id]` of the last
//! item, so a page boundary is stable while rows are inserted or deleted.
//! (Hex is hand-written below: ten lines did not justify a crate.)

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::problem::ApiError;
use super::records::Meta;

pub const DEFAULT_LIMIT: u16 = 100;
pub const MAX_LIMIT: u16 = 1000;

/// Query parameters of every list endpoint.
#[derive(Debug, Default, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u16>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// `name`, `-name`, `created_at` (default) or `-created_at`.
    pub sort: Option<String>,
    /// Case-insensitive substring search on the name.
    pub q: Option<String>,
    /// Exact name.
    pub name: Option<String>,
    /// Exact status.
    pub status: Option<String>,
    /// Owning VDC.
    pub vdc_id: Option<String>,
    /// Containing resource (the VPC of a subnet, the parent of a VDC).
    pub parent_id: Option<String>,
}

/// One page of a collection.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next_cursor: self.next_cursor,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SortValue {
    Int(i64),
    Text(String),
}

pub struct Plan {
    pub column: &'static str,
    pub descending: bool,
    pub limit: u16,
    pub after: Option<(SortValue, String)>,
}

impl Plan {
    pub fn cursor_after(&self, meta: &Meta) -> String {
        let value = match self.column {
            "name" => SortValue::Text(meta.name.clone()),
            _ => SortValue::Int(meta.created_at),
        };
        let json = serde_json::to_string(&(value, &meta.id)).unwrap_or_default();
        json.bytes().map(|b| format!("{b:02x}")).collect()
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

impl ListQuery {
    pub fn plan(&self) -> Result<Plan, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(ApiError::InvalidQuery(format!(
                "limit must be 1..={MAX_LIMIT}"
            )));
        }
        let (column, descending) = match self.sort.as_deref().unwrap_or("created_at") {
            "created_at" => ("created_at", false),
            "-created_at" => ("created_at", true),
            "name" => ("name", false),
            "-name" => ("name", true),
            other => {
                return Err(ApiError::InvalidQuery(format!(
                    "sort {other:?} is not one of name, -name, created_at, -created_at"
                )))
            }
        };
        let after = match &self.cursor {
            None => None,
            Some(c) => {
                let bad = || ApiError::InvalidQuery("cursor is not one this API issued".into());
                let bytes = unhex(c).ok_or_else(bad)?;
                let (value, id): (SortValue, String) =
                    serde_json::from_slice(&bytes).map_err(|_| bad())?;
                let matches = matches!(
                    (&value, column),
                    (SortValue::Text(_), "name") | (SortValue::Int(_), "created_at")
                );
                if !matches {
                    return Err(ApiError::InvalidQuery(
                        "cursor belongs to a different sort".into(),
                    ));
                }
                Some((value, id))
            }
        };
        Ok(Plan {
            column,
            descending,
            limit,
            after,
        })
    }
}
