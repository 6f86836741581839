//! `store`: durable write throughput of the state store (SQLite, WAL,
//! synchronous=FULL) against the cheapest durable peer: appending the same
//! records to a plain file and calling `fdatasync`.
//!
//! Both run in one process, on one file system (a scratch directory under the
//! current directory, or `KEEL_BENCH_DIR`), alternating so that noise hits
//! both alike. The ratio says what the database's transactions cost over the
//! bare disk flush every durable write pays anyway.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use keel_control::store::{Store, DB_FILE};

use crate::{BenchError, Measurement, Scale, Suite};

pub const SUITE: Suite = Suite {
    name: "store",
    about: "state-store durable writes vs. file append + fdatasync",
    run,
};

const PEER: &str = "file append + fdatasync";
/// Records per transaction in the batched case: a typical reconcile pass
/// writes tens of rows at once.
const BATCH: usize = 100;

fn run(scale: Scale) -> Result<Vec<Measurement>, BenchError> {
    let (singles, batches) = match scale {
        Scale::Quick => (100, 10),
        Scale::Full => (2000, 200),
    };
    let base = std::env::var_os("KEEL_BENCH_DIR").map_or_else(|| PathBuf::from("."), PathBuf::from);
    let scratch = tempfile::Builder::new()
        .prefix(".keel-bench-")
        .tempdir_in(base)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = runtime.block_on(Store::open(&scratch.path().join(DB_FILE)))?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(scratch.path().join("peer.log"))?;
    let record = |i: usize| {
        (
            format!("bench/{i}"),
            format!("{{\"seq\":{i},\"pad\":\"{}\"}}", "x".repeat(64)),
        )
    };

    // Single durable writes, alternating rounds of 10 between keel and peer.
    let (mut keel_time, mut peer_time) = (0.0, 0.0);
    for round in 0..singles / 10 {
        let t = Instant::now();
        for i in round * 10..round * 10 + 10 {
            let (k, v) = record(i);
            runtime.block_on(store.put_meta(&k, &v))?;
        }
        keel_time += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in round * 10..round * 10 + 10 {
            let (k, v) = record(i);
            writeln!(log, "{k} {v}")?;
            log.sync_data()?;
        }
        peer_time += t.elapsed().as_secs_f64();
    }
    let single = Measurement::new(
        "durable single writes",
        "writes/s",
        true,
        per_sec(singles, keel_time),
    )
    .with_peer(PEER, per_sec(singles, peer_time));

    // Batched: one transaction (keel) / one fdatasync (peer) per BATCH records.
    let (mut keel_time, mut peer_time) = (0.0, 0.0);
    for b in 0..batches {
        let batch: Vec<_> = (b * BATCH..(b + 1) * BATCH).map(record).collect();
        let t = Instant::now();
        runtime.block_on(store.put_meta_batch(&batch))?;
        keel_time += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for (k, v) in &batch {
            writeln!(log, "{k} {v}")?;
        }
        log.sync_data()?;
        peer_time += t.elapsed().as_secs_f64();
    }
    let records = batches * BATCH;
    let batched = Measurement::new(
        &format!("durable writes in batches of {BATCH}"),
        "writes/s",
        true,
        per_sec(records, keel_time),
    )
    .with_peer(PEER, per_sec(records, peer_time));

    runtime.block_on(store.close())?;
    Ok(vec![single, batched])
}

fn per_sec(count: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}
