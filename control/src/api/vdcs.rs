//! `/vdcs`: virtual data centers, the unit of tenancy, nested (a VDC may
//! have a parent) and with quotas. A child's quota may not exceed its
//! parent's. Quotas are checked when a counted resource is created (today:
//! `networks` counts VPCs; the other counters wait for VMs, volumes,
//! floating IPs and LBs).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::listing::{ListQuery, Page};
use super::problem::{ApiError, Problem};
use super::records::{self, Meta, NewRecord, Record, READY};
use super::respond::{begin_change, created, finish_delete, get_one, list_page, ok, Resource};
use super::AppState;

pub const KIND: &str = "vdc";

/// Limits per VDC; absent means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub vcpus: Option<u64>,
    pub memory_mib: Option<u64>,
    pub volumes: Option<u64>,
    pub volume_gb: Option<u64>,
    pub floating_ips: Option<u64>,
    /// Counts VPCs.
    pub networks: Option<u64>,
    pub load_balancers: Option<u64>,
}

impl Quota {
    fn fields(&self) -> [(&'static str, Option<u64>); 7] {
        [
            ("vcpus", self.vcpus),
            ("memory_mib", self.memory_mib),
            ("volumes", self.volumes),
            ("volume_gb", self.volume_gb),
            ("floating_ips", self.floating_ips),
            ("networks", self.networks),
            ("load_balancers", self.load_balancers),
        ]
    }

    /// Every limit of `self` fits inside `parent`'s.
    fn within(&self, parent: &Quota) -> Result<(), ApiError> {
        for ((name, mine), (_, theirs)) in self.fields().into_iter().zip(parent.fields()) {
            if let Some(limit) = theirs {
                if mine.is_none_or(|m| m > limit) {
                    return Err(ApiError::invalid(
                        format!("quota.{name}"),
                        format!("must be at most the parent VDC's {limit}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct VdcSpec {
    description: String,
    quota: Quota,
    #[serde(default)]
    recycle_bin_hours: u32,
    #[serde(default)]
    backup_encryption: bool,
    /// The VDC's backup key (hex secret), made the first time encryption is
    /// turned on and kept after it is turned off: older points need it.
    /// Never shown by the API.
    #[serde(default)]
    backup_key: Option<String>,
}

impl VdcSpec {
    fn set_backup_encryption(&mut self, on: bool) -> Result<(), ApiError> {
        if on && self.backup_key.is_none() {
            let mut secret = [0u8; 32];
            getrandom::getrandom(&mut secret)
                .map_err(|e| ApiError::Internal(format!("random key: {e}")))?;
            self.backup_key = Some(secret.iter().map(|b| format!("{b:02x}")).collect());
        }
        self.backup_encryption = on;
        Ok(())
    }
}

/// A year: the longest a deleted volume may wait in the recycle bin.
const MAX_RECYCLE_BIN_HOURS: u32 = 8760;

fn check_recycle_bin_hours(hours: u32) -> Result<(), ApiError> {
    if hours > MAX_RECYCLE_BIN_HOURS {
        return Err(ApiError::invalid(
            "recycle_bin_hours",
            format!("at most {MAX_RECYCLE_BIN_HOURS} (a year)"),
        ));
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Vdc {
    #[serde(flatten)]
    pub meta: Meta,
    pub parent_id: Option<String>,
    pub description: String,
    pub quota: Quota,
    /// Hours a deleted volume of this VDC stays in the recycle bin (status
    /// `DELETED`, restorable) before it is purged; 0: deleted at once.
    pub recycle_bin_hours: u32,
    /// New backups of the VDC's volumes and VMs are encrypted with the
    /// VDC's key (AES-256-GCM; the key stays with the control plane).
    pub backup_encryption: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VdcCreate {
    pub name: String,
    /// Parent VDC for nesting.
    pub parent_id: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub quota: Quota,
    /// 0..=8760 (default 0: no recycle bin).
    #[serde(default)]
    pub recycle_bin_hours: u32,
    /// Encrypt backups with a key of the VDC's own (default false).
    #[serde(default)]
    pub backup_encryption: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VdcUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub quota: Option<Quota>,
    /// Applies to volumes deleted from now on.
    pub recycle_bin_hours: Option<u32>,
    /// Applies to backups taken from now on; turned off, the key is kept
    /// for the encrypted backups already taken.
    pub backup_encryption: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VdcPage {
    pub items: Vec<Vdc>,
    pub next_cursor: Option<String>,
}

impl Resource for Vdc {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Vdc;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        let spec: VdcSpec = record.spec()?;
        Ok(Vdc {
            meta: record.meta,
            parent_id: record.parent_id,
            description: spec.description,
            quota: spec.quota,
            recycle_bin_hours: spec.recycle_bin_hours,
            backup_encryption: spec.backup_encryption,
        })
    }
}

/// The quota of a VDC, for checks by other resource families.
pub fn quota_of(record: &Record) -> Result<Quota, ApiError> {
    Ok(record.spec::<VdcSpec>()?.quota)
}

/// The VDC's backup key (hex secret), if it has one, and whether new
/// backups are encrypted with it (for the host agent).
pub fn backup_key_of(record: &Record) -> Result<(bool, Option<String>), ApiError> {
    let spec: VdcSpec = record.spec()?;
    Ok((spec.backup_encryption, spec.backup_key))
}

/// How long a deleted volume of the VDC stays restorable (0: not at all).
pub fn recycle_bin_hours_of(record: &Record) -> Result<u32, ApiError> {
    Ok(record.spec::<VdcSpec>()?.recycle_bin_hours)
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_vdc, list_vdcs))
        .routes(routes!(get_vdc, update_vdc, delete_vdc))
}

/// Creates a VDC (system admins).
#[utoipa::path(post, path = "/vdcs", tag = "tenancy", request_body = VdcCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Created", body = Vdc),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not allowed", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_vdc(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<VdcCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Vdc, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    check_recycle_bin_hours(body.recycle_bin_hours)?;
    let mut tx = state.store.begin_write().await?;
    if let Some(parent) = &body.parent_id {
        let parent =
            super::respond::referenced_vdc(&mut tx, &principal, "parent_id", parent).await?;
        body.quota.within(&quota_of(&parent)?)?;
    }
    let mut spec = VdcSpec {
        description: body.description,
        quota: body.quota,
        recycle_bin_hours: body.recycle_bin_hours,
        ..VdcSpec::default()
    };
    spec.set_backup_encryption(body.backup_encryption)?;
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: KIND,
            vdc_id: None,
            parent_id: body.parent_id.as_deref(),
            name: &body.name,
            spec: serde_json::to_value(&spec).map_err(|e| ApiError::Internal(e.to_string()))?,
            status: READY,
        },
    )
    .await?;
    tx.commit().await?;
    let location = format!("/api/v1/vdcs/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(&location, revision, &Vdc::from_record(record)?))
}

/// Lists the VDCs the caller can see.
#[utoipa::path(get, path = "/vdcs", tag = "tenancy", params(ListQuery),
    responses((status = 200, description = "One page", body = VdcPage)), security(("bearer" = [])))]
async fn list_vdcs(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<VdcPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<Vdc>(&state, &principal, &query).await?;
    Ok(Json(VdcPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/vdcs/{id}", tag = "tenancy", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The VDC; ETag is its revision", body = Vdc),
        (status = 404, description = "No such VDC (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_vdc(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<Vdc>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/vdcs/{id}", tag = "tenancy", request_body = VdcUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated", body = Vdc),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_vdc(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<VdcUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<Vdc>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: VdcSpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(description) = body.description {
        check_description(&description)?;
        spec.description = description;
    }
    if let Some(quota) = body.quota {
        if let Some(parent) = &record.parent_id {
            if let Some(parent) = records::get(&mut tx, KIND, parent).await? {
                quota.within(&quota_of(&parent)?)?;
            }
        }
        let used = records::count(&mut tx, "vpc", &record.meta.id).await?;
        if let Some(limit) = quota.networks {
            if used > limit {
                return Err(ApiError::invalid(
                    "quota.networks",
                    format!("{used} networks exist, more than {limit}"),
                ));
            }
        }
        spec.quota = quota;
    }
    if let Some(hours) = body.recycle_bin_hours {
        check_recycle_bin_hours(hours)?;
        spec.recycle_bin_hours = hours;
    }
    if let Some(on) = body.backup_encryption {
        spec.set_backup_encryption(on)?;
    }
    let spec = serde_json::to_value(&spec).map_err(|e| ApiError::Internal(e.to_string()))?;
    let updated = records::update(&mut tx, &record, KIND, &name, spec).await?;
    tx.commit().await?;
    ok::<Vdc>(updated)
}

#[utoipa::path(delete, path = "/vdcs/{id}", tag = "tenancy",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "Still contains resources or users", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_vdc(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<Vdc>(&state, &principal, Action::Delete, &id, &headers).await?;
    let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE vdc_id = $1")
        .bind(&id)
        .fetch_one(&mut *tx)
        .await?;
    if users > 0 {
        return Err(ApiError::Conflict(format!(
            "VDC {id} still has {users} user(s)"
        )));
    }
    finish_delete::<Vdc>(tx, &record).await
}
