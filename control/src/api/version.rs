//! `GET /api/v1/version`: what is running and on which state.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Version {
    /// keel release.
    pub version: String,
    /// Newest API version served.
    pub api_version: String,
    /// Schema version of the state database.
    pub schema_version: i64,
    /// Identity of this keel instance, stable across restarts.
    pub instance_id: Uuid,
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(version))
}

#[utoipa::path(
    get,
    path = "/version",
    tag = "system",
    responses((status = 200, description = "Version of this keel", body = Version))
)]
async fn version(State(state): State<AppState>) -> Json<Version> {
    Json(state.version.as_ref().clone())
}
