//! `/images`: VM images with a chunked, resumable upload. An image is
//! created with its declared format, size and SHA-256, then its bytes are
//! sent in order with `PUT /images/{id}/file` and `Content-Range`; a client
//! that lost its connection reads `uploaded_bytes` and continues there. The
//! last chunk checks the digest and that the content really is the declared
//! format (a QCOW2 file declared RAW would let a guest read host files
//! through a backing-file name), and only then is the image ACTIVE.
//! Chunks are at most the API's 1 MiB body limit.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path as FsPath, PathBuf};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::listing::{ListQuery, Page};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record};
use super::respond::{
    begin_change, created, list_page, load, ok, referenced_vdc, target_vdc, Resource,
};
use super::AppState;

const KIND: &str = "image";
pub const QUEUED: &str = "QUEUED";
pub const ACTIVE: &str = "ACTIVE";
const MAX_IMAGE_BYTES: u64 = 1 << 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Iso,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    Bios,
    Uefi,
    UefiSecure,
}

impl Firmware {
    /// The name keel-firmware parses.
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
            Firmware::UefiSecure => "uefi-secure",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageSpec {
    pub format: ImageFormat,
    pub firmware: Firmware,
    /// `x86_64` or `aarch64`; VMs from the image only go to hosts of it.
    pub cpu_arch: String,
    pub os_type: String,
    pub size_bytes: u64,
    /// Lowercase hex SHA-256 the uploaded content must have.
    pub sha256: String,
    pub uploaded_bytes: u64,
    /// `private` (the VDC's) or `public` (every VDC).
    pub visibility: String,
    pub description: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Image {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: ImageSpec,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageCreate {
    pub name: String,
    /// Owning VDC; defaults to the caller's.
    pub vdc_id: Option<String>,
    pub format: ImageFormat,
    #[serde(default = "default_firmware")]
    pub firmware: Firmware,
    #[serde(default = "default_arch")]
    pub cpu_arch: String,
    #[serde(default)]
    pub os_type: String,
    pub size_bytes: u64,
    pub sha256: String,
    #[serde(default = "default_visibility")]
    pub visibility: String,
    #[serde(default)]
    pub description: String,
}

fn default_firmware() -> Firmware {
    Firmware::Bios
}
fn default_arch() -> String {
    "x86_64".into()
}
fn default_visibility() -> String {
    "private".into()
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImagePage {
    pub items: Vec<Image>,
    pub next_cursor: Option<String>,
}

impl Resource for Image {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Compute;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        Ok(Image {
            spec: record.spec()?,
            meta: record.meta,
        })
    }
}

/// Where image files live: `<state dir>/images/`.
pub fn images_dir(state: &AppState) -> PathBuf {
    state.state_dir.as_path().join("images")
}

/// The file of an ACTIVE image.
pub fn image_path(dir: &FsPath, id: &str) -> PathBuf {
    dir.join(id)
}

fn partial_path(dir: &FsPath, id: &str) -> PathBuf {
    dir.join(format!("{id}.part"))
}

fn io_error(what: &str) -> impl Fn(std::io::Error) -> ApiError + '_ {
    move |e| ApiError::Internal(format!("{what}: {e}"))
}

/// Parses `bytes START-END/TOTAL`.
fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    Some((start.parse().ok()?, end.parse().ok()?, total.parse().ok()?))
}

/// What the content says it is; `None` when it matches the declared format.
pub fn format_mismatch(path: &FsPath, declared: ImageFormat) -> std::io::Result<Option<String>> {
    let mut file = std::fs::File::open(path)?;
    let mut head = [0u8; 4];
    let qcow2 = file.read(&mut head)? == 4 && head == *b"QFI\xfb";
    let mut cd = [0u8; 5];
    let iso = file.read_exact_at(&mut cd, 0x8001).is_ok() && cd == *b"CD001";
    Ok(match declared {
        ImageFormat::Qcow2 if !qcow2 => Some("content is not QCOW2 (no QFI\\xfb magic)".into()),
        ImageFormat::Iso if !iso => Some("content is not an ISO 9660 image (no CD001)".into()),
        ImageFormat::Raw if qcow2 => Some("content is QCOW2, declared raw".into()),
        _ => None,
    })
}

fn sha256_file(path: &FsPath) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_image, list_images))
        .routes(routes!(get_image, delete_image))
        .routes(routes!(upload_image))
}

#[utoipa::path(post, path = "/images", tag = "compute", request_body = ImageCreate,
    responses(
        (status = 201, description = "QUEUED: upload the content with PUT /images/{id}/file", body = Image),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_image(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<ImageCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Compute, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    if body.size_bytes == 0 || body.size_bytes > MAX_IMAGE_BYTES {
        return Err(ApiError::invalid("size_bytes", "must be 1 byte .. 1 TiB"));
    }
    if body.sha256.len() != 64 || !body.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::invalid("sha256", "must be 64 hex digits"));
    }
    if !matches!(body.cpu_arch.as_str(), "x86_64" | "aarch64") {
        return Err(ApiError::invalid("cpu_arch", "must be x86_64 or aarch64"));
    }
    if !matches!(body.visibility.as_str(), "private" | "public") {
        return Err(ApiError::invalid("visibility", "must be private or public"));
    }
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let mut tx = state.store.begin_write().await?;
    referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    let spec = ImageSpec {
        format: body.format,
        firmware: body.firmware,
        cpu_arch: body.cpu_arch,
        os_type: body.os_type,
        size_bytes: body.size_bytes,
        sha256: body.sha256.to_lowercase(),
        uploaded_bytes: 0,
        visibility: body.visibility,
        description: body.description,
    };
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: KIND,
            vdc_id: Some(&vdc_id),
            parent_id: None,
            name: &body.name,
            spec: to_json(&spec)?,
            status: QUEUED,
        },
    )
    .await?;
    tx.commit().await?;
    let location = format!("/api/v1/images/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(&location, revision, &Image::from_record(record)?))
}

#[utoipa::path(put, path = "/images/{id}/file", tag = "compute",
    params(("id" = String, Path), ("Content-Range" = Option<String>, Header, description = "bytes START-END/TOTAL; absent when the body is the whole image")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Chunk stored; ACTIVE after the last one", body = Image),
        (status = 409, description = "Chunk does not start at uploaded_bytes, or the image is already ACTIVE", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Bad range, or the complete content failed its checksum or format check (upload starts over)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn upload_image(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Image>, ApiError> {
    let mut tx = state.store.begin_write().await?;
    let record = load(
        &mut tx,
        &principal,
        Family::Compute,
        Action::Update,
        KIND,
        &id,
    )
    .await?;
    let mut spec: ImageSpec = record.spec()?;
    if record.meta.status == ACTIVE {
        return Err(ApiError::Conflict("the image is already uploaded".into()));
    }
    let len = u64::try_from(body.len()).unwrap_or(u64::MAX);
    let (start, end, total) = match headers.get("content-range") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(parse_content_range)
            .ok_or_else(|| ApiError::invalid("Content-Range", "expected bytes START-END/TOTAL"))?,
        None if len > 0 => (0, len - 1, len),
        None => return Err(ApiError::invalid("body", "empty")),
    };
    if total != spec.size_bytes {
        return Err(ApiError::invalid(
            "Content-Range",
            format!("total {total} differs from size_bytes {}", spec.size_bytes),
        ));
    }
    if end < start || end >= total || end - start + 1 != len {
        return Err(ApiError::invalid(
            "Content-Range",
            format!("range {start}-{end} does not match a body of {len} bytes"),
        ));
    }
    if start != spec.uploaded_bytes {
        return Err(ApiError::Conflict(format!(
            "the upload continues at byte {}",
            spec.uploaded_bytes
        )));
    }
    let dir = images_dir(&state);
    std::fs::create_dir_all(&dir).map_err(io_error("create the image directory"))?;
    let part = partial_path(&dir, &id);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(start == 0)
        .open(&part)
        .map_err(io_error("open the upload file"))?;
    file.write_all_at(&body, start)
        .map_err(io_error("write the upload file"))?;
    // `uploaded_bytes` is only recorded for bytes that are on disk.
    file.sync_data().map_err(io_error("sync the upload file"))?;
    drop(file);
    spec.uploaded_bytes = end + 1;
    let mut status = record.meta.status.clone();
    let mut rejected = None;
    if spec.uploaded_bytes == spec.size_bytes {
        let digest = sha256_file(&part).map_err(io_error("hash the upload"))?;
        let mismatch = format_mismatch(&part, spec.format).map_err(io_error("read the upload"))?;
        if digest != spec.sha256 {
            rejected = Some(format!(
                "content has SHA-256 {digest}, expected {}; upload again from byte 0",
                spec.sha256
            ));
        } else if let Some(why) = mismatch {
            rejected = Some(format!("{why}; upload again from byte 0"));
        }
        if rejected.is_some() {
            let _ = std::fs::remove_file(&part);
            spec.uploaded_bytes = 0;
        } else {
            std::fs::rename(&part, image_path(&dir, &id)).map_err(io_error("publish the image"))?;
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error("sync the image directory"))?;
            status = ACTIVE.into();
        }
    }
    let updated = records::observe(&mut tx, KIND, &id, &status, Some(to_json(&spec)?))
        .await?
        .ok_or(ApiError::NotFound)?;
    tx.commit().await?;
    state.changes.notify_waiters();
    if let Some(why) = rejected {
        return Err(ApiError::invalid("body", why));
    }
    Ok(Json(Image::from_record(updated)?))
}

#[utoipa::path(get, path = "/images", tag = "compute", params(ListQuery),
    responses((status = 200, description = "One page", body = ImagePage)), security(("bearer" = [])))]
async fn list_images(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<ImagePage>, ApiError> {
    let Page { items, next_cursor } = list_page::<Image>(&state, &principal, &query).await?;
    Ok(Json(ImagePage { items, next_cursor }))
}

#[utoipa::path(get, path = "/images/{id}", tag = "compute", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The image", body = Image),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_image(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut conn = state.store.pool().acquire().await?;
    let record = visible_image(&mut conn, &principal, &id).await?;
    ok::<Image>(record)
}

/// An image the caller may use: its own VDC's, or a public one.
pub async fn visible_image(
    conn: &mut crate::store::DbConnection,
    principal: &Principal,
    id: &str,
) -> Result<Record, ApiError> {
    principal.require(Family::Compute, Action::Read)?;
    let record = records::get(conn, KIND, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let public = record.spec::<ImageSpec>()?.visibility == "public";
    if public || principal.sees(record.meta.vdc_id.as_deref()) {
        Ok(record)
    } else {
        Err(ApiError::NotFound)
    }
}

#[utoipa::path(delete, path = "/images/{id}", tag = "compute",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted with its file (volumes made from it are copies and stay)"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_image(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<Image>(&state, &principal, Action::Delete, &id, &headers).await?;
    records::delete(&mut tx, &record, KIND).await?;
    tx.commit().await?;
    let dir = images_dir(&state);
    for path in [image_path(&dir, &id), partial_path(&dir, &id)] {
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "image file not removed");
            }
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn content_range_parses_and_rejects_garbage() {
        assert_eq!(parse_content_range("bytes 0-9/10"), Some((0, 9, 10)));
        assert_eq!(parse_content_range("bytes 0-9"), None);
        assert_eq!(parse_content_range("items 0-9/10"), None);
    }

    #[test]
    fn format_check_tells_qcow2_from_raw() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"QFI\xfb\0\0\0\x03").unwrap();
        assert!(format_mismatch(&p, ImageFormat::Qcow2).unwrap().is_none());
        assert!(format_mismatch(&p, ImageFormat::Raw).unwrap().is_some());
        assert!(format_mismatch(&p, ImageFormat::Iso).unwrap().is_some());
    }
}
