//! Validating extractors: every bad body or query answers with the same
//! problem body (`bad-json` / `invalid-query`) naming what was wrong.

use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;

use super::problem::ApiError;

/// A JSON body; types use `#[serde(deny_unknown_fields)]`, so unknown
/// fields are refused with the field named in the detail.
pub struct ValidJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| v.starts_with("application/json"));
        if !is_json {
            return Err(ApiError::BadJson(
                "Content-Type must be application/json".into(),
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadJson(e.body_text()))?;
        serde_json::from_slice(&bytes)
            .map(ValidJson)
            .map_err(|e| ApiError::BadJson(e.to_string()))
    }
}

/// Query parameters; unknown parameters are refused.
pub struct ValidQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ValidQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(q)| ValidQuery(q))
            .map_err(|e| ApiError::InvalidQuery(e.body_text()))
    }
}

/// `If-Match: "<revision>"`: required on every update and delete, so a
/// client cannot overwrite a change it has not seen.
pub fn if_match(headers: &HeaderMap) -> Result<i64, ApiError> {
    let value = headers
        .get(header::IF_MATCH)
        .ok_or(ApiError::IfMatchRequired)?
        .to_str()
        .map_err(|_| ApiError::invalid("If-Match", "not ASCII"))?;
    value
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .map_err(|_| ApiError::invalid("If-Match", "must be an ETag this API issued"))
}

pub fn etag(revision: i64) -> String {
    format!("\"{revision}\"")
}

/// Validates a free-text description: at most 255 characters.
pub fn check_description(description: &str) -> Result<(), ApiError> {
    if description.chars().count() > 255 {
        return Err(ApiError::invalid(
            "description",
            "must be at most 255 characters",
        ));
    }
    Ok(())
}

/// Validates a resource name: 1..=63 chars of `[A-Za-z0-9._-]`, starting
/// with a letter or digit.
/// A rule's `port_range_min`/`port_range_max` (`field` names them in
/// refusals): both or neither, 1..=max, and only where ports apply.
pub fn check_port_range(
    field: impl Fn(&str) -> String,
    ports_apply: bool,
    min: Option<u16>,
    max: Option<u16>,
) -> Result<(), ApiError> {
    match (min, max) {
        (None, None) => Ok(()),
        (Some(_), Some(_)) if !ports_apply => Err(ApiError::invalid(
            field("port_range_min"),
            "ports only apply to tcp and udp",
        )),
        (Some(lo), Some(hi)) if lo == 0 || lo > hi => Err(ApiError::invalid(
            field("port_range_min"),
            "must be 1..=port_range_max",
        )),
        (Some(_), Some(_)) => Ok(()),
        _ => Err(ApiError::invalid(
            field("port_range_max"),
            "give both port_range_min and port_range_max, or neither",
        )),
    }
}

pub fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok_len = (1..=63).contains(&name.len());
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok_len && ok_first && ok_chars {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "must be 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
        ))
    }
}
