#![allow(clippy::unwrap_used)]
//! The PostgreSQL fixture and keel's PostgreSQL schema against a real
//! server: the cluster starts as `postgres` on loopback, keel's PostgreSQL
//! migrations (control/migrations/postgres) apply in order and create the
//! same tables, with the same numbering, as the SQLite set, and the server
//! and its directory are gone after drop.

use std::path::PathBuf;

use keel_testkit::PostgresServer;

fn migration_names(dir: &str) -> Vec<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../control")
        .join(dir);
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    names.sort();
    names
}

#[test]
fn postgres_cluster_applies_keel_schema() {
    let sqlite = migration_names("migrations");
    let postgres = migration_names("migrations/postgres");
    assert_eq!(
        sqlite, postgres,
        "every SQLite migration needs its PostgreSQL twin"
    );

    let server = PostgresServer::start().unwrap();
    let port = server.port();
    assert!(server.url().ends_with(&format!(":{port}/postgres")));
    for name in &postgres {
        let sql = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../control/migrations/postgres")
                .join(name),
        )
        .unwrap();
        server
            .psql(&format!("BEGIN; {sql} COMMIT;"))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", server.log_tail()));
    }
    let tables = server
        .psql(
            "SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables \
             WHERE table_schema = 'public'",
        )
        .unwrap();
    assert_eq!(
        tables.trim(),
        "audit_log,events,heartbeats,idempotency,keel_meta,resources,runs,tasks,tokens,users"
    );
    // Unix-ms times and identity sequence numbers are 64-bit.
    server
        .psql("INSERT INTO runs (version, started_at) VALUES ('t', 1800000000000)")
        .unwrap();
    let seqs = server
        .psql(
            "INSERT INTO events (at, resource_type, resource_id, action, revision) VALUES \
             (1, 'port', 'a', 'created', 1), (2, 'port', 'b', 'created', 1) RETURNING seq",
        )
        .unwrap();
    assert_eq!(seqs.split_whitespace().collect::<Vec<_>>(), ["1", "2"]);

    let dir_glob = format!("keelt-pg-{}-", std::process::id());
    drop(server);
    let left = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with(&dir_glob));
    assert!(!left, "cluster directory left behind");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "server still listening after drop"
    );
}
