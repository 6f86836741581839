//! `/hosts`: compute hosts. A host agent registers its host (inventory
//! from sysfs) when it starts; operators enable, disable or put a host in
//! maintenance, and only `ENABLED` hosts of the right CPU architecture with
//! room for the VM's memory take new VMs. System admins only.

use crate::store::DbConnection;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::ValidQuery;
use super::listing::{ListQuery, Page};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record};
use super::respond::{list_page, load, with_etag, Resource};
use super::AppState;

pub const KIND: &str = "host";
pub const ENABLED: &str = "ENABLED";
pub const DISABLED: &str = "DISABLED";
pub const MAINTENANCE: &str = "MAINTENANCE";

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NumaNode {
    pub id: u32,
    pub memory_bytes: u64,
    pub cpus: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Nic {
    pub name: String,
    pub mac: String,
    pub driver: String,
    /// Absent when the link is down or the driver does not say.
    pub speed_mbps: Option<i64>,
    pub pci: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Disk {
    pub name: String,
    pub size_bytes: u64,
    pub rotational: bool,
    pub model: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Gpu {
    pub pci: String,
    pub vendor_id: String,
    pub device_id: String,
    pub driver: String,
    /// Present when the IOMMU isolates it: a VFIO passthrough candidate.
    pub iommu_group: Option<String>,
}

/// What an agent reports about its host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostInventory {
    pub hostname: String,
    pub cpu_arch: String,
    pub cpu_vendor: String,
    pub cpu_model: String,
    pub cores: u32,
    pub sockets: u32,
    pub memory_bytes: u64,
    pub numa_nodes: Vec<NumaNode>,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
    pub gpus: Vec<Gpu>,
    pub kvm: bool,
    pub agent_version: String,
    /// The host's interface per physical network (`keel up --uplink`):
    /// external networks on other physical networks are not reachable
    /// from VMs on this host.
    #[serde(default)]
    pub uplinks: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostSpec {
    #[serde(flatten)]
    pub inventory: HostInventory,
    /// Unix ms of the agent's last registration.
    pub registered_at: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Host {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: HostSpec,
    /// Unix ms of the agent's last heartbeat (none yet: null).
    pub heartbeat_at: Option<i64>,
    /// Whether the agent beat within the last `HEARTBEAT_EXPIRY_MS`
    /// (20 s); a host that is not responding takes no new VMs and its
    /// running tasks may be taken over by another host's agent.
    pub responding: bool,
}

/// A host agent refreshes its heartbeat this often (from its own task, so a
/// long-running task does not stop it).
pub const HEARTBEAT_EVERY_MS: i64 = 3_000;
/// A heartbeat older than this means the host is not responding.
pub const HEARTBEAT_EXPIRY_MS: i64 = 20_000;

/// Records that the agent of `host_id` is alive (no event: liveness is read
/// on demand, not pushed).
pub async fn heartbeat(conn: &mut DbConnection, host_id: &str) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO heartbeats (host_id, at) VALUES ($1, $2) \
         ON CONFLICT (host_id) DO UPDATE SET at = excluded.at",
    )
    .bind(host_id)
    .bind(records::now_ms())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Last heartbeat of `host_id`, if any.
async fn last_heartbeat(conn: &mut DbConnection, host_id: &str) -> Result<Option<i64>, ApiError> {
    Ok(
        sqlx::query_scalar("SELECT at FROM heartbeats WHERE host_id = $1")
            .bind(host_id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

impl Host {
    async fn with_liveness(mut self, conn: &mut DbConnection) -> Result<Host, ApiError> {
        self.heartbeat_at = last_heartbeat(conn, &self.meta.id).await?;
        self.responding = self
            .heartbeat_at
            .is_some_and(|at| records::now_ms() - at < HEARTBEAT_EXPIRY_MS);
        Ok(self)
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HostPage {
    pub items: Vec<Host>,
    pub next_cursor: Option<String>,
}

impl Resource for Host {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Host;
    const SYSTEM_WIDE: bool = true;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        Ok(Host {
            spec: record.spec()?,
            meta: record.meta,
            heartbeat_at: None,
            responding: false,
        })
    }
}

/// Inserts or refreshes the host `id` (the agent's machine id). A new host
/// starts `ENABLED`; a known one keeps the state an operator gave it.
pub async fn register(
    conn: &mut DbConnection,
    id: &str,
    inventory: HostInventory,
) -> Result<Record, ApiError> {
    let spec = HostSpec {
        registered_at: records::now_ms(),
        inventory,
    };
    match records::get(conn, KIND, id).await? {
        Some(existing) => {
            let status = existing.meta.status.clone();
            records::observe(conn, KIND, id, &status, Some(to_json(&spec)?))
                .await?
                .ok_or(ApiError::NotFound)
        }
        None => {
            let name = spec.inventory.hostname.clone();
            records::insert_with_id(
                conn,
                id,
                NewRecord {
                    kind: KIND,
                    vdc_id: None,
                    parent_id: None,
                    name: if name.is_empty() { id } else { &name },
                    spec: to_json(&spec)?,
                    status: ENABLED,
                },
            )
            .await
        }
    }
}

/// The first `ENABLED`, responding host that fits a VM, or why none does;
/// only `pinned` when the VM's disks already live on a host.
pub async fn place(
    conn: &mut DbConnection,
    cpu_arch: &str,
    memory_mib: u32,
    pinned: Option<&str>,
) -> Result<Record, ApiError> {
    let mut hosts = records::all(conn, KIND).await?;
    if let Some(pin) = pinned {
        hosts.retain(|h| h.meta.id == pin);
        if hosts.is_empty() {
            return Err(ApiError::Conflict(format!(
                "the VM's volumes live on host {pin}, which is not registered"
            )));
        }
    }
    if hosts.is_empty() {
        return Err(ApiError::Conflict(
            "no host is registered yet (is the host agent running?)".into(),
        ));
    }
    let need = u64::from(memory_mib) << 20;
    let mut why = Vec::new();
    for host in hosts {
        let spec: HostSpec = host.spec()?;
        let beat = last_heartbeat(conn, &host.meta.id).await?;
        let silent_ms = beat.map(|at| records::now_ms() - at);
        if host.meta.status != ENABLED {
            why.push(format!("{} is {}", host.meta.name, host.meta.status));
        } else if silent_ms.is_none_or(|ms| ms >= HEARTBEAT_EXPIRY_MS) {
            why.push(format!(
                "{} is not responding (no agent heartbeat for {} s)",
                host.meta.name,
                silent_ms.map_or_else(|| "ever".to_owned(), |ms| (ms / 1000).to_string())
            ));
        } else if spec.inventory.cpu_arch != cpu_arch {
            why.push(format!(
                "{} is {}, the image needs {cpu_arch}",
                host.meta.name, spec.inventory.cpu_arch
            ));
        } else if spec.inventory.memory_bytes < need {
            why.push(format!(
                "{} has {} MiB of memory, the VM needs {memory_mib} MiB",
                host.meta.name,
                spec.inventory.memory_bytes >> 20
            ));
        } else {
            return Ok(host);
        }
    }
    Err(ApiError::Conflict(format!(
        "no host fits the VM: {}",
        why.join("; ")
    )))
}

/// What a host that joins with an API token is told (`keel up --join`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostEnrollment {
    /// The shared PostgreSQL database the host's agent and API run on (it
    /// holds the password: hand the token only to hosts you trust).
    pub database_url: String,
    /// The control plane's instance id: the host checks it joined the cloud
    /// it meant to.
    pub instance_id: String,
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(enroll_host))
        .routes(routes!(list_hosts))
        .routes(routes!(get_host))
        .routes(routes!(host_action))
}

/// A new host joins: a system admin's API token (from the host's boot
/// configuration) buys it the shared database, where its agent registers
/// the host with its inventory and heartbeats, as every host agent does.
#[utoipa::path(post, path = "/hosts/enroll", tag = "compute",
    responses(
        (status = 200, description = "Where the host's agent keeps its state", body = HostEnrollment),
        (status = 403, description = "System admins only", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "This control plane keeps its state in an embedded SQLite file, which no other host can share", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn enroll_host(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<HostEnrollment>, ApiError> {
    principal.require(Family::Host, Action::Create)?;
    let Some(url) = &state.host_database else {
        return Err(ApiError::Conflict(
            "this control plane keeps its state in an embedded SQLite file, which no other host \
             can share: start it with --database postgres://… for hosts to join"
                .into(),
        ));
    };
    tracing::info!(by = %principal.name, "a host enrolled");
    Ok(Json(HostEnrollment {
        database_url: url.to_string(),
        instance_id: state.version.instance_id.to_string(),
    }))
}

#[utoipa::path(get, path = "/hosts", tag = "compute", params(ListQuery),
    responses(
        (status = 200, description = "One page", body = HostPage),
        (status = 403, description = "System admins only", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn list_hosts(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<HostPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<Host>(&state, &principal, &query).await?;
    let mut conn = state.store.pool().acquire().await?;
    let mut live = Vec::with_capacity(items.len());
    for host in items {
        live.push(host.with_liveness(&mut conn).await?);
    }
    Ok(Json(HostPage {
        items: live,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/hosts/{id}", tag = "compute", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The host with its inventory", body = Host),
        (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_host(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    principal.require(Family::Host, Action::Read)?;
    let mut conn = state.store.pool().acquire().await?;
    let record = load(&mut conn, &principal, Family::Host, Action::Read, KIND, &id).await?;
    let revision = record.meta.revision;
    let host = Host::from_record(record)?.with_liveness(&mut conn).await?;
    Ok(with_etag(axum::http::StatusCode::OK, revision, &host))
}

#[utoipa::path(post, path = "/hosts/{id}/actions/{action}", tag = "compute",
    params(("id" = String, Path), ("action" = String, Path, description = "enable, disable or maintenance")),
    responses(
        (status = 200, description = "The host in its new state; VMs already on it keep running", body = Host),
        (status = 404, description = "No such host or action", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn host_action(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let status = match action.as_str() {
        "enable" => ENABLED,
        "disable" => DISABLED,
        "maintenance" => MAINTENANCE,
        _ => return Err(ApiError::NotFound),
    };
    principal.require(Family::Host, Action::Update)?;
    let mut tx = state.store.begin_write().await?;
    load(&mut tx, &principal, Family::Host, Action::Update, KIND, &id).await?;
    let updated = records::observe(&mut tx, KIND, &id, status, None)
        .await?
        .ok_or(ApiError::NotFound)?;
    let revision = updated.meta.revision;
    let host = Host::from_record(updated)?.with_liveness(&mut tx).await?;
    tx.commit().await?;
    Ok(with_etag(axum::http::StatusCode::OK, revision, &host))
}
