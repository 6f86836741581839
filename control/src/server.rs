//! `keel up`: the all-in-one appliance process.
//!
//! Start-up checks run in an order that changes nothing until every check
//! has passed: state directory, then the listening socket, then the
//! database (which may migrate).

use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, version::Version, AppState};
use crate::state_dir::{StateDir, StateDirError};
use crate::store::{Backend, Store, StoreError, DB_FILE};

/// After a shutdown signal, in-flight requests get this long to finish; it
/// matches the per-request timeout, so a request that can finish at all does.
const DRAIN_GRACE: Duration = api::REQUEST_TIMEOUT;

/// Typed configuration of `keel up`, built from flags and environment.
#[derive(Debug, Clone)]
pub struct UpConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// Shared PostgreSQL database (`postgres://…`) instead of the embedded
    /// SQLite file in the state directory.
    pub database: Option<String>,
    /// The database URL hosts that join are told (`POST /hosts/enroll`),
    /// when they reach the database at another address than this process;
    /// default `database`.
    pub host_database: Option<String>,
    /// Password of the bootstrap `admin` (from `KEEL_ADMIN_PASSWORD`); one is
    /// generated into `<state_dir>/admin-password` when absent.
    pub admin_password: Option<String>,
}

/// File (mode 0600) holding a generated bootstrap admin password.
pub const ADMIN_PASSWORD_FILE: &str = "admin-password";

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error("Cannot listen on {addr}: the port is already in use (is another keel or service running? change it with --listen or KEEL_LISTEN)")]
    PortInUse { addr: SocketAddr },
    #[error("Cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Cannot create the bootstrap admin")]
    Bootstrap(#[source] api::problem::ApiError),
    #[error("Cannot write the admin password file {path}")]
    AdminPasswordFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot start the host agent")]
    Services(#[source] io::Error),
    #[error("API server failed")]
    Serve(#[source] io::Error),
}

/// Host-side services (the host agent) started once the store is open,
/// given the store and the state directory. The returned closure stops
/// them; it runs after the API has drained.
pub type HostServices =
    Box<dyn FnOnce(Store, PathBuf) -> io::Result<Box<dyn FnOnce() + Send>> + Send>;

/// Runs the appliance until `shutdown` resolves, then drains and flushes.
pub async fn up(
    config: UpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    services: Option<HostServices>,
) -> Result<(), UpError> {
    let state_dir = StateDir::acquire(&config.state_dir)?;
    let listener = TcpListener::bind(config.listen).await.map_err(|source| {
        if source.kind() == io::ErrorKind::AddrInUse {
            UpError::PortInUse {
                addr: config.listen,
            }
        } else {
            UpError::Bind {
                addr: config.listen,
                source,
            }
        }
    })?;
    let store = match &config.database {
        Some(url) => Store::connect(url).await?,
        None => Store::open(&state_dir.path().join(DB_FILE)).await?,
    };
    let node = format!("{}:{}", hostname(), state_dir.path().display());
    let run = store.begin_run(env!("CARGO_PKG_VERSION"), &node).await?;
    if let Some(started) = run.previous_unclean_start {
        tracing::warn!(
            previous_start_ms = started,
            "the previous run did not shut down cleanly"
        );
    }
    if let Some(password) = api::auth::bootstrap_admin(&store, config.admin_password.clone())
        .await
        .map_err(UpError::Bootstrap)?
    {
        let path = state_dir.path().join(ADMIN_PASSWORD_FILE);
        write_secret(&path, &password).map_err(|source| UpError::AdminPasswordFile {
            path: path.clone(),
            source,
        })?;
        tracing::warn!(path = %path.display(), "created user admin; its generated password is in this file");
    }
    let version = Version {
        version: env!("CARGO_PKG_VERSION").into(),
        api_version: "v1".into(),
        schema_version: store.schema_version().await?,
        instance_id: store.instance_id().await?,
    };
    let addr = listener.local_addr().map_err(UpError::Serve)?;
    tracing::info!(
        %addr,
        state_dir = %state_dir.path().display(),
        database = store.location(),
        instance_id = %version.instance_id,
        schema_version = version.schema_version,
        "keel is up"
    );

    let stop_services = match services {
        Some(start) => {
            Some(start(store.clone(), state_dir.path().to_owned()).map_err(UpError::Services)?)
        }
        None => None,
    };
    let host_database = match store.backend() {
        Backend::Postgres => config.host_database.clone().or(config.database.clone()),
        Backend::Sqlite => None,
    };
    let state = AppState::new(store.clone(), version, state_dir.path().to_owned())
        .with_host_database(host_database);
    if let Some(url) = &config.database {
        tokio::spawn(relay_notifications(url.clone(), state.changes.clone()));
    }
    let app = api::app(state).into_make_service_with_connect_info::<SocketAddr>();
    let (signalled_tx, mut signalled_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight requests");
            let _ = signalled_tx.send(true);
        })
        .into_future();
    let drain_deadline = async move {
        let _ = signalled_rx.wait_for(|signalled| *signalled).await;
        tokio::time::sleep(DRAIN_GRACE).await;
    };
    tokio::select! {
        served = server => served.map_err(UpError::Serve)?,
        () = drain_deadline => tracing::warn!(grace = ?DRAIN_GRACE, "requests still running after the grace period; closing them"),
    }

    if let Some(stop) = stop_services {
        // The agent waits on libvirt and child processes: off the runtime.
        let _ = tokio::task::spawn_blocking(stop).await;
    }
    store.end_run(run.id).await?;
    store.close().await?;
    tracing::info!("state flushed; keel stopped");
    Ok(())
}

/// Wakes this process's event streams when another keel process sharing
/// the PostgreSQL database commits a change (`pg_notify` in
/// `records::append_event`); without it they would notice within their poll
/// interval.
async fn relay_notifications(url: String, changes: std::sync::Arc<tokio::sync::Notify>) {
    loop {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
            listener.listen("keel_changes").await?;
            loop {
                listener.recv().await?;
                changes.notify_waiters();
            }
        };
        let result: Result<(), sqlx::Error> = listener.await;
        if let Err(error) = result {
            tracing::warn!(%error, "change notifications from the database stopped; retrying");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// This machine's name, naming its runs in a database many hosts share.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

/// Writes a secret readable by the owner only (created 0600, never wider).
fn write_secret(path: &std::path::Path, secret: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}
