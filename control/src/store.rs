//! The state store: keel's desired and observed state in an embedded SQLite
//! database under the state directory, or, for many hosts, in a shared
//! PostgreSQL database (`keel up --database postgres://…`).
//!
//! The schema moves forward only, through the numbered migrations in
//! `control/migrations/` (SQLite) and their twins in
//! `control/migrations/postgres/`. A database written by a newer keel (a
//! migration this binary does not know) is refused rather than touched:
//! running old code on a newer schema would silently drop what the newer code
//! relies on.
//!
//! # One SQL for both
//!
//! Queries go through sqlx's `Any` driver and are written once: `$1, $2 …`
//! placeholders (SQLite reads `$N` as the N-th argument too), `IS NOT
//! DISTINCT FROM` for null-safe equality, `ON CONFLICT … DO NOTHING`,
//! integers and text only. Builders that append conditions write `?` and
//! pass the finished text through [`numbered`]. The few places where the two
//! differ (JSON fields, catalog queries, write locking) ask [`Store::backend`].
//!
//! # Writers
//!
//! Every write transaction starts with [`Store::begin_write`], which
//! serializes writers: SQLite takes its write lock up front; PostgreSQL takes
//! one transaction-scoped advisory lock. Serialized writers are what keeps
//! read-check-write sequences (name uniqueness, quotas, revisions) correct
//! and makes the change feed's `seq` order equal its commit order, so a
//! client reading events after `seq` N never misses one committed later
//! with a smaller number.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor, Row};
use uuid::Uuid;

/// The database family queries run on (sqlx's `Any`: SQLite or PostgreSQL).
pub type Db = sqlx::Any;
/// One connection of the store.
pub type DbConnection = sqlx::AnyConnection;
/// One result row.
pub type DbRow = sqlx::any::AnyRow;
/// The store's connection pool.
pub type DbPool = sqlx::AnyPool;
/// A transaction (from [`Store::begin_write`]).
pub type DbTransaction = sqlx::Transaction<'static, Db>;

/// Every SQLite migration this binary knows, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");
/// The PostgreSQL twins of [`MIGRATOR`] (same numbers, same tables).
pub static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// File name of the SQLite database inside the state directory.
pub const DB_FILE: &str = "keel.db";

/// Waiting this long for a lock held by another connection covers a
/// checkpoint of a large WAL; longer means something is stuck.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Key of the PostgreSQL advisory lock every write transaction holds
/// ("keel" in ASCII): one writer at a time across all keel processes.
const WRITE_LOCK_KEY: i64 = 0x6b65_656c;

/// Where the state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Cannot open state database {location}")]
    Open {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("State database {location} is not a keel database")]
    NotKeel {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "State database {location} has schema version {found}, newer than this keel knows ({known}); \
         run a keel of that version or newer, or point KEEL_STATE_DIR / KEEL_DATABASE elsewhere"
    )]
    SchemaTooNew {
        location: String,
        found: i64,
        known: i64,
    },
    #[error("Cannot migrate state database {location}")]
    Migrate {
        location: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error(
        "Database URL {0:?} is not supported: use postgres://user:password@host:port/database"
    )]
    UnsupportedUrl(String),
    #[error("State database query failed")]
    Query(#[from] sqlx::Error),
    #[error("Stored instance id {0:?} is not a UUID")]
    BadInstanceId(String),
}

/// What a start found about the run before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStart {
    pub id: i64,
    /// Start time (unix ms) of the previous run if it never recorded a clean stop.
    pub previous_unclean_start: Option<i64>,
}

/// Handle to the state database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: DbPool,
    backend: Backend,
    /// The file, or the URL without its password: for messages only.
    location: String,
}

impl Store {
    /// Opens (creating if missing) the SQLite database at `path`, refuses one
    /// from a newer schema, and migrates an older one forward.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with(path, &MIGRATOR).await
    }

    /// As [`Store::open`], with an explicit migration set (tests use a prefix
    /// of [`MIGRATOR`] to build databases of older schemas).
    pub async fn open_with(path: &Path, migrator: &Migrator) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let location = path.display().to_string();
        let url = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .to_url_lossy();
        let options = AnyConnectOptions::from_url(&url).map_err(|source| StoreError::Open {
            location: location.clone(),
            source,
        })?;
        // One connection first, so a file that is not a database is
        // reported as such instead of as a pool that never filled.
        let mut probe = sqlx::AnyConnection::connect_with(&options)
            .await
            .map_err(|source| classify_open_error(&location, source))?;
        sqlite_session(&mut probe)
            .await
            .map_err(|source| classify_open_error(&location, source))?;
        probe.close().await?;
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .after_connect(|conn, _| Box::pin(sqlite_session(conn)))
            .connect_with(options)
            .await
            .map_err(|source| classify_open_error(&location, source))?;
        Self::migrated(pool, Backend::Sqlite, location, migrator).await
    }

    /// Connects to the shared PostgreSQL database at `url`
    /// (`postgres://user:password@host:port/database`), refuses a newer
    /// schema and migrates an older one forward. Several keel processes
    /// (hosts, API nodes) may share it.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Self::connect_with(url, &POSTGRES_MIGRATOR).await
    }

    /// As [`Store::connect`], with an explicit migration set.
    pub async fn connect_with(url: &str, migrator: &Migrator) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let parsed = url::Url::parse(url).map_err(|_| StoreError::UnsupportedUrl(redact(url)))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(StoreError::UnsupportedUrl(redact(url)));
        }
        let location = redact(url);
        let options = AnyConnectOptions::from_url(&parsed).map_err(|source| StoreError::Open {
            location: location.clone(),
            source,
        })?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(BUSY_TIMEOUT * 2)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                location: location.clone(),
                source,
            })?;
        Self::migrated(pool, Backend::Postgres, location, migrator).await
    }

    async fn migrated(
        pool: DbPool,
        backend: Backend,
        location: String,
        migrator: &Migrator,
    ) -> Result<Store, StoreError> {
        let store = Store {
            pool,
            backend,
            location,
        };
        store.check_schema_not_newer(migrator).await?;
        if backend == Backend::Postgres {
            // Two keel processes starting at once must not both migrate.
            let mut conn = store.pool.acquire().await?;
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(WRITE_LOCK_KEY + 1)
                .execute(&mut *conn)
                .await?;
            let migrated = migrator.run(&mut *conn).await;
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(WRITE_LOCK_KEY + 1)
                .execute(&mut *conn)
                .await?;
            migrated.map_err(|source| StoreError::Migrate {
                location: store.location.clone(),
                source,
            })?;
        } else {
            migrator
                .run(&store.pool)
                .await
                .map_err(|source| StoreError::Migrate {
                    location: store.location.clone(),
                    source,
                })?;
        }
        Ok(store)
    }

    async fn check_schema_not_newer(&self, migrator: &Migrator) -> Result<(), StoreError> {
        let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        let found = self.schema_version().await.map_err(|source| match source {
            StoreError::Query(source) => classify_open_error(&self.location, source),
            other => other,
        })?;
        if found > known {
            return Err(StoreError::SchemaTooNew {
                location: self.location.clone(),
                found,
                known,
            });
        }
        Ok(())
    }

    /// Newest applied migration, 0 for a fresh database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let catalog = match self.backend {
            Backend::Sqlite => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
            }
            Backend::Postgres => {
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'"
            }
        };
        let has_table: i64 = sqlx::query_scalar(catalog).fetch_one(&self.pool).await?;
        if has_table == 0 {
            return Ok(0);
        }
        let version: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await?;
        Ok(version.unwrap_or(0))
    }

    /// Starts a write transaction that holds the store's one write lock
    /// until it ends (see the module doc): SQLite's `BEGIN IMMEDIATE` (a
    /// deferred one that reads first and then writes fails with SQLITE_BUSY
    /// when another writer committed in between, instead of waiting its
    /// turn), PostgreSQL's transaction-scoped advisory lock.
    pub async fn begin_write(&self) -> Result<DbTransaction, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(WRITE_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }

    /// The connection pool, for the API's resource queries.
    pub fn pool(&self) -> &DbPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The database file, or the URL without its password.
    pub fn location(&self) -> &str {
        &self.location
    }

    pub async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT value FROM keel_meta WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Durably sets one fact (one transaction, fsynced before it returns).
    pub async fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO keel_meta (key, value) VALUES ($1, $2) \
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Sets many facts in one transaction: one fsync for the batch.
    pub async fn put_meta_batch(&self, entries: &[(String, String)]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for (key, value) in entries {
            sqlx::query(
                "INSERT INTO keel_meta (key, value) VALUES ($1, $2) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The identity of this keel instance, made on first use and kept.
    pub async fn instance_id(&self) -> Result<Uuid, StoreError> {
        let fresh = Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO keel_meta (key, value) VALUES ('instance_id', $1) ON CONFLICT (key) DO NOTHING",
        )
            .bind(&fresh)
            .execute(&self.pool)
            .await?;
        let stored = self.get_meta("instance_id").await?.unwrap_or(fresh);
        Uuid::parse_str(&stored).map_err(|_| StoreError::BadInstanceId(stored))
    }

    /// Records the start of a run of `node` and reports whether that node's
    /// last run crashed.
    pub async fn begin_run(&self, version: &str, node: &str) -> Result<RunStart, StoreError> {
        let mut tx = self.begin_write().await?;
        let previous_unclean_start: Option<i64> = sqlx::query_scalar(
            "SELECT started_at FROM runs WHERE stopped_at IS NULL AND node = $1 \
             ORDER BY id DESC LIMIT 1",
        )
        .bind(node)
        .fetch_optional(&mut *tx)
        .await?;
        // A crashed run can never be stopped cleanly any more: close it out so
        // it is reported once, not at every later start.
        sqlx::query("UPDATE runs SET stopped_at = -1 WHERE stopped_at IS NULL AND node = $1")
            .bind(node)
            .execute(&mut *tx)
            .await?;
        let id = sqlx::query(
            "INSERT INTO runs (version, started_at, node) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(version)
        .bind(now_ms())
        .bind(node)
        .fetch_one(&mut *tx)
        .await?
        .try_get::<i64, _>("id")?;
        tx.commit().await?;
        Ok(RunStart {
            id,
            previous_unclean_start,
        })
    }

    /// Marks a run as cleanly stopped.
    pub async fn end_run(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE runs SET stopped_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// `(started_at, stopped_at)` of the newest run, if any.
    pub async fn last_run(&self) -> Result<Option<(i64, Option<i64>)>, StoreError> {
        let row = sqlx::query("SELECT started_at, stopped_at FROM runs ORDER BY id DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("started_at")?, r.try_get("stopped_at")?)))
            .transpose()
    }

    /// Checkpoints the WAL into the main file and closes every connection,
    /// so a clean stop leaves one self-contained database file.
    pub async fn close(self) -> Result<(), StoreError> {
        if self.backend == Backend::Sqlite {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await?;
        }
        self.pool.close().await;
        Ok(())
    }
}

/// Settings of every SQLite connection (sqlx's `Any` options carry only a URL).
async fn sqlite_session(conn: &mut DbConnection) -> Result<(), sqlx::Error> {
    conn.execute("PRAGMA journal_mode = WAL").await?;
    // An acknowledged API write must survive a power cut.
    conn.execute("PRAGMA synchronous = FULL").await?;
    conn.execute("PRAGMA foreign_keys = ON").await?;
    let busy = format!("PRAGMA busy_timeout = {}", BUSY_TIMEOUT.as_millis());
    conn.execute(busy.as_str()).await?;
    Ok(())
}

fn classify_open_error(location: &str, source: sqlx::Error) -> StoreError {
    let not_a_db =
        matches!(&source, sqlx::Error::Database(e) if e.message().contains("not a database"));
    if not_a_db {
        StoreError::NotKeel {
            location: location.to_owned(),
            source,
        }
    } else {
        StoreError::Open {
            location: location.to_owned(),
            source,
        }
    }
}

/// `url` without its password, for messages and logs.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

/// Numbers the `?` placeholders of a query built piece by piece as `$1,
/// $2 …` (see the module doc). Query text never holds a literal `?`.
pub fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// Which database `conn` talks to.
pub fn backend_of(conn: &DbConnection) -> Backend {
    if conn.backend_name() == "PostgreSQL" {
        Backend::Postgres
    } else {
        Backend::Sqlite
    }
}

/// SQL for the text value of the top-level field `field` of the JSON text
/// column `column` (a fixed identifier, never user input).
pub fn json_text(backend: Backend, column: &str, field: &str) -> String {
    match backend {
        Backend::Sqlite => format!("({column} ->> '{field}')"),
        Backend::Postgres => format!("(CAST({column} AS jsonb) ->> '{field}')"),
    }
}

fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(dir: &tempfile::TempDir) -> std::path::PathBuf {
        dir.path().join(DB_FILE)
    }

    #[tokio::test]
    async fn fresh_database_is_migrated_to_latest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&db(&dir)).await.unwrap();
        let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap();
        assert_eq!(store.schema_version().await.unwrap(), latest);
    }

    fn latest() -> i64 {
        MIGRATOR.migrations.last().unwrap().version
    }

    #[tokio::test]
    async fn older_schema_is_migrated_forward_and_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = db(&dir);
        let first_only = Migrator {
            migrations: MIGRATOR.migrations[..1].to_vec().into(),
            ..Migrator::DEFAULT
        };
        let old = Store::open_with(&path, &first_only).await.unwrap();
        assert_eq!(old.schema_version().await.unwrap(), 1);
        let id = old.instance_id().await.unwrap();
        old.close().await.unwrap();

        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.schema_version().await.unwrap(), latest());
        assert_eq!(
            store.instance_id().await.unwrap(),
            id,
            "data survives the migration"
        );
        // The table the newer migration added is usable.
        store.begin_run("test", "n").await.unwrap();
    }

    #[tokio::test]
    async fn newer_schema_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = db(&dir);
        let store = Store::open(&path).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (9999, 'from the future', TRUE, x'00', 0)",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        store.close().await.unwrap();

        let err = Store::open(&path).await.unwrap_err();
        match err {
            StoreError::SchemaTooNew { found, known, .. } => {
                assert_eq!(found, 9999);
                assert_eq!(known, latest());
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn garbage_file_is_reported_as_not_keel() {
        let dir = tempfile::tempdir().unwrap();
        let path = db(&dir);
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = Store::open(&path).await.unwrap_err();
        assert!(matches!(err, StoreError::NotKeel { .. }), "got {err:?}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![0x5a; 8192],
            "file untouched"
        );
    }

    #[tokio::test]
    async fn unclean_run_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&db(&dir)).await.unwrap();
        let first = store.begin_run("v", "n").await.unwrap();
        assert_eq!(first.previous_unclean_start, None);
        // No end_run: the first run "crashed".
        let second = store.begin_run("v", "n").await.unwrap();
        assert!(second.previous_unclean_start.is_some());
        store.end_run(second.id).await.unwrap();
        let third = store.begin_run("v", "n").await.unwrap();
        assert_eq!(third.previous_unclean_start, None);
    }

    #[tokio::test]
    async fn meta_batch_is_durable_and_visible() {
        let dir = tempfile::tempdir().unwrap();
        let path = db(&dir);
        let store = Store::open(&path).await.unwrap();
        let batch: Vec<_> = (0..10)
            .map(|i| (format!("k{i}"), format!("v{i}")))
            .collect();
        store.put_meta_batch(&batch).await.unwrap();
        store.put_meta("k3", "changed").await.unwrap();
        store.close().await.unwrap();
        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.get_meta("k9").await.unwrap().as_deref(), Some("v9"));
        assert_eq!(
            store.get_meta("k3").await.unwrap().as_deref(),
            Some("changed")
        );
        assert_eq!(store.get_meta("missing").await.unwrap(), None);
    }
}
