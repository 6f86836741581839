//! The state store: keel's desired and observed state in an embedded SQLite
//! database under the state directory.
//!
//! The schema moves forward only, through the numbered migrations in
//! `control/migrations/`. A database written by a newer keel (a migration
//! this binary does not know) is refused rather than touched: running old
//! code on a newer schema would silently drop what the newer code relies on.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;
use uuid::Uuid;

/// Every migration this binary knows, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// File name of the SQLite database inside the state directory.
pub const DB_FILE: &str = "keel.db";

/// Waiting this long for a lock held by another connection covers a
/// checkpoint of a large WAL; longer means something is stuck.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Cannot open state database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("State database {path} is not a keel database")]
    NotKeel {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "State database {path} has schema version {found}, newer than this keel knows ({known}); \
         run a keel of that version or newer, or point KEEL_STATE_DIR elsewhere"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("Cannot migrate state database {path}")]
    Migrate {
        path: PathBuf,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
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
    pool: SqlitePool,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if missing) the database at `path`, refuses one from a
    /// newer schema, and migrates an older one forward.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with(path, &MIGRATOR).await
    }

    /// As [`Store::open`], with an explicit migration set (tests use a prefix
    /// of [`MIGRATOR`] to build databases of older schemas).
    pub async fn open_with(path: &Path, migrator: &Migrator) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(open_err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // An acknowledged API write must survive a power cut.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| classify_open_error(path, source))?;
        let store = Store {
            pool,
            path: path.to_owned(),
        };
        store.check_schema_not_newer(migrator).await?;
        migrator
            .run(&store.pool)
            .await
            .map_err(|source| StoreError::Migrate {
                path: path.to_owned(),
                source,
            })?;
        Ok(store)
    }

    async fn check_schema_not_newer(&self, migrator: &Migrator) -> Result<(), StoreError> {
        let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        let found = self.schema_version().await.map_err(|source| match source {
            StoreError::Query(source) => classify_open_error(&self.path, source),
            other => other,
        })?;
        if found > known {
            return Err(StoreError::SchemaTooNew {
                path: self.path.clone(),
                found,
                known,
            });
        }
        Ok(())
    }

    /// Newest applied migration, 0 for a fresh database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let has_table: Option<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_optional(&self.pool)
        .await?;
        if has_table.is_none() {
            return Ok(0);
        }
        let version: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await?;
        Ok(version.unwrap_or(0))
    }

    /// Starts a write transaction that takes SQLite's write lock up front
    /// (`BEGIN IMMEDIATE`): a deferred one that reads first and then writes
    /// fails with SQLITE_BUSY when another writer committed in between,
    /// instead of waiting its turn.
    pub async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// The connection pool, for the API's resource queries.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT value FROM keel_meta WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Durably sets one fact (one transaction, fsynced before it returns).
    pub async fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO keel_meta (key, value) VALUES (?, ?) \
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
        let mut tx = self.pool.begin().await?;
        for (key, value) in entries {
            sqlx::query(
                "INSERT INTO keel_meta (key, value) VALUES (?, ?) \
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
        sqlx::query("INSERT OR IGNORE INTO keel_meta (key, value) VALUES ('instance_id', ?)")
            .bind(&fresh)
            .execute(&self.pool)
            .await?;
        let stored = self.get_meta("instance_id").await?.unwrap_or(fresh);
        Uuid::parse_str(&stored).map_err(|_| StoreError::BadInstanceId(stored))
    }

    /// Records the start of a run and reports whether the last one crashed.
    pub async fn begin_run(&self, version: &str) -> Result<RunStart, StoreError> {
        let mut tx = self.pool.begin().await?;
        let previous_unclean_start: Option<i64> = sqlx::query_scalar(
            "SELECT started_at FROM runs WHERE stopped_at IS NULL ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        // A crashed run can never be stopped cleanly any more: close it out so
        // it is reported once, not at every later start.
        sqlx::query("UPDATE runs SET stopped_at = -1 WHERE stopped_at IS NULL")
            .execute(&mut *tx)
            .await?;
        let id = sqlx::query("INSERT INTO runs (version, started_at) VALUES (?, ?) RETURNING id")
            .bind(version)
            .bind(now_ms())
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
        sqlx::query("UPDATE runs SET stopped_at = ? WHERE id = ?")
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
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await?;
        self.pool.close().await;
        Ok(())
    }
}

fn classify_open_error(path: &Path, source: sqlx::Error) -> StoreError {
    let not_a_db =
        matches!(&source, sqlx::Error::Database(e) if e.message().contains("not a database"));
    if not_a_db {
        StoreError::NotKeel {
            path: path.to_owned(),
            source,
        }
    } else {
        StoreError::Open {
            path: path.to_owned(),
            source,
        }
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

    fn db(dir: &tempfile::TempDir) -> PathBuf {
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
        store.begin_run("test").await.unwrap();
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
        let first = store.begin_run("v").await.unwrap();
        assert_eq!(first.previous_unclean_start, None);
        // No end_run: the first run "crashed".
        let second = store.begin_run("v").await.unwrap();
        assert!(second.previous_unclean_start.is_some());
        store.end_run(second.id).await.unwrap();
        let third = store.begin_run("v").await.unwrap();
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
