//! The repository: a directory holding content-addressed chunks and one
//! index per backup point.
//!
//! Layout: `chunks/<first 2 hex>/<64 hex>` (256 shard directories),
//! `points/<id>.idx`, `tmp/` (files being written), `locks/`.
//!
//! Durability: every file is written to `tmp/`, fsynced and renamed into
//! place; a job fsyncs the shard directories it touched before it
//! publishes its index (a hard link, so an existing point is never
//! replaced), then fsyncs `points/`. A crash at any moment leaves either
//! no point or a complete one; chunks of an unpublished point are garbage
//! that [`Repository::gc`] removes.
//!
//! Concurrency: `locks/repo` is a `flock`. Jobs that add or read points
//! (backup, restore, verify) hold it shared; GC and prune hold it
//! exclusive, so GC never sweeps chunks of a backup still in flight (a
//! lock, not a grace period). `locks/disk-<name>` is taken exclusively
//! (non-blocking) by a backup of that disk: a second job on the same disk
//! is refused.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::backup::chunk::{self, ChunkError, Digest};
use crate::backup::index::{BackupIndex, IndexError};
use crate::backup::key::ChunkKey;

const VERSION_FILE: &str = "keel-backup-repo";
const VERSION: &str = "1\n";

/// Errors of repository operations.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The directory is not a repository.
    #[error("{0} is not a keel backup repository")]
    NotARepository(PathBuf),
    /// Filesystem operation failed.
    #[error("Cannot {op} {path}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A point id or disk name has characters we do not put in file names.
    #[error("Invalid name {0:?} (use letters, digits, '-', '_', '.')")]
    Name(String),
    /// No such point.
    #[error("No backup point {0:?}")]
    NoPoint(String),
    /// The index file of a point is corrupt.
    #[error("Index of point {id} is corrupt")]
    Index {
        /// Point id.
        id: String,
        /// What is wrong.
        #[source]
        source: IndexError,
    },
    /// A stored chunk is missing or corrupt.
    #[error("Chunk {digest} is unreadable")]
    Chunk {
        /// The chunk.
        digest: Digest,
        /// What is wrong.
        #[source]
        source: ChunkError,
    },
    /// Another job holds the disk.
    #[error("Another backup job of disk {0:?} is running")]
    Busy(String),
    /// The point's encryption and the given key differ.
    #[error("Point {point} {}, {}", needs.as_ref().map_or("is not encrypted".to_owned(), |k| format!("is encrypted with key {k}")), given.as_ref().map_or("and no key was given".to_owned(), |k| format!("the key given is {k}")))]
    Key {
        /// The point.
        point: String,
        /// Fingerprint of the key it needs (none: plain).
        needs: Option<String>,
        /// Fingerprint of the key given.
        given: Option<String>,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RepoError + 'a {
    move |source| RepoError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Checks a disk name / point id for use in a file name.
pub fn check_name(name: &str) -> Result<(), RepoError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RepoError::Name(name.to_owned()))
    }
}

/// A held repository or disk lock (released on drop).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// An open repository, with the key its new points are encrypted with
/// and its encrypted points are read with, if any.
#[derive(Debug, Clone)]
pub struct Repository {
    root: PathBuf,
    key: Option<Arc<ChunkKey>>,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Repository {
    /// Creates the layout at `root` (idempotent) and opens it.
    pub fn create(root: &Path) -> Result<Self, RepoError> {
        let repo = Self {
            root: root.to_owned(),
            key: None,
        };
        for d in ["chunks", "points", "tmp", "locks"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        for i in 0..=255u8 {
            let p = root.join("chunks").join(hex::encode([i]));
            std::fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        let marker = root.join(VERSION_FILE);
        if !marker.exists() {
            repo.write_atomic(&marker, VERSION.as_bytes())?;
        }
        sync_dir(&root.join("chunks"))?;
        sync_dir(root)?;
        Ok(repo)
    }

    /// Opens an existing repository.
    pub fn open(root: &Path) -> Result<Self, RepoError> {
        match std::fs::read_to_string(root.join(VERSION_FILE)) {
            Ok(v) if v == VERSION => Ok(Self {
                root: root.to_owned(),
                key: None,
            }),
            _ => Err(RepoError::NotARepository(root.to_owned())),
        }
    }

    /// Repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The same repository, writing and reading points encrypted with `key`.
    pub fn with_key(mut self, key: ChunkKey) -> Self {
        self.key = Some(Arc::new(key));
        self
    }

    /// The key new points are encrypted with.
    pub fn key(&self) -> Option<&ChunkKey> {
        self.key.as_deref()
    }

    /// The name of a chunk with this plaintext (keyed when encrypting).
    pub fn digest(&self, data: &[u8]) -> Digest {
        match self.key() {
            Some(key) => key.digest(data),
            None => Digest::of(data),
        }
    }

    /// The key fingerprint a point taken now records.
    pub fn encryption(&self) -> Option<String> {
        self.key().map(|k| k.fingerprint().to_owned())
    }

    /// Refuses a point whose encryption differs from this handle's: an
    /// encrypted point needs its key, a plain one is read without one.
    pub fn check_key(&self, index: &BackupIndex) -> Result<(), RepoError> {
        if index.encryption == self.encryption() {
            return Ok(());
        }
        Err(RepoError::Key {
            point: index.id.clone(),
            needs: index.encryption.clone(),
            given: self.encryption(),
        })
    }

    /// Lock for jobs that add or read points (blocks while GC/prune run).
    pub fn lock_shared(&self) -> Result<Lock, RepoError> {
        let f = self.lock_file("repo")?;
        f.lock_shared().map_err(io("lock", &self.root))?;
        Ok(Lock { _file: f })
    }

    /// Lock for GC and prune (waits for running jobs).
    pub fn lock_exclusive(&self) -> Result<Lock, RepoError> {
        let f = self.lock_file("repo")?;
        f.lock().map_err(io("lock", &self.root))?;
        Ok(Lock { _file: f })
    }

    /// The per-disk job lock; refused when another job holds it.
    pub fn lock_disk(&self, disk: &str) -> Result<Lock, RepoError> {
        check_name(disk)?;
        let f = self.lock_file(&format!("disk-{disk}"))?;
        match f.try_lock() {
            Ok(()) => Ok(Lock { _file: f }),
            Err(std::fs::TryLockError::WouldBlock) => Err(RepoError::Busy(disk.to_owned())),
            Err(std::fs::TryLockError::Error(e)) => Err(io("lock", &self.root)(e)),
        }
    }

    fn lock_file(&self, name: &str) -> Result<File, RepoError> {
        let p = self.root.join("locks").join(name);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io("open", &p))
    }

    /// Where chunk `d` lives.
    pub fn chunk_path(&self, d: &Digest) -> PathBuf {
        let hex = d.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Whether chunk `d` is stored (dedup check).
    pub fn has_chunk(&self, d: &Digest) -> bool {
        self.chunk_path(d).exists()
    }

    /// Stores an encoded chunk under `d` (durable file, directory entry
    /// durable after [`Repository::sync_chunk_dirs`]). Returns the shard
    /// directory to sync.
    pub fn put_chunk(&self, d: &Digest, encoded: &[u8]) -> Result<PathBuf, RepoError> {
        let path = self.chunk_path(d);
        self.write_atomic(&path, encoded)?;
        Ok(path.parent().map(Path::to_owned).unwrap_or_default())
    }

    /// fsyncs shard directories new chunks were renamed into.
    pub fn sync_chunk_dirs<'a>(
        &self,
        dirs: impl IntoIterator<Item = &'a PathBuf>,
    ) -> Result<(), RepoError> {
        for d in dirs {
            sync_dir(d)?;
        }
        Ok(())
    }

    /// Reads, decodes and checks chunk `d`.
    pub fn get_chunk(&self, d: &Digest) -> Result<Vec<u8>, RepoError> {
        let p = self.chunk_path(d);
        let stored = std::fs::read(&p).map_err(io("read chunk", &p))?;
        chunk::decode(&stored, d, self.key())
            .map_err(|source| RepoError::Chunk { digest: *d, source })
    }

    /// tmp + write + fsync + rename (the directory is synced by the caller).
    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), RepoError> {
        let tmp = self.tmp_path();
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(data).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io("rename into", path))
    }

    fn tmp_path(&self) -> PathBuf {
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}.{seq}", std::process::id()))
    }

    fn point_path(&self, id: &str) -> PathBuf {
        self.root.join("points").join(format!("{id}.idx"))
    }

    /// Publishes a point: durable, atomic, never replacing an existing one
    /// (bumps `created_ms` and the id until the name is free).
    pub fn publish(&self, index: &mut BackupIndex) -> Result<(), RepoError> {
        check_name(&index.disk)?;
        loop {
            index.id = format!("{}-{:015}", index.disk, index.created_ms);
            let bytes = index.to_bytes().map_err(|source| RepoError::Index {
                id: index.id.clone(),
                source,
            })?;
            let tmp = self.tmp_path();
            let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
            f.write_all(&bytes).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("fsync", &tmp))?;
            drop(f);
            let dst = self.point_path(&index.id);
            let linked = std::fs::hard_link(&tmp, &dst);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => return sync_dir(&self.root.join("points")),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    index.created_ms += 1;
                }
                Err(e) => return Err(io("publish", &dst)(e)),
            }
        }
    }

    /// Loads one point.
    pub fn load(&self, id: &str) -> Result<BackupIndex, RepoError> {
        check_name(id)?;
        let p = self.point_path(id);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RepoError::NoPoint(id.to_owned()))
            }
            Err(e) => return Err(io("read", &p)(e)),
        };
        BackupIndex::from_bytes(&bytes).map_err(|source| RepoError::Index {
            id: id.to_owned(),
            source,
        })
    }

    /// Ids of all points, sorted.
    pub fn point_ids(&self) -> Result<Vec<String>, RepoError> {
        let dir = self.root.join("points");
        let mut ids = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io("list", &dir))? {
            let e = e.map_err(io("list", &dir))?;
            let name = e.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".idx")) {
                ids.push(id.to_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// All points, oldest first. Fails on the first corrupt index.
    pub fn points(&self) -> Result<Vec<BackupIndex>, RepoError> {
        let mut v = self
            .point_ids()?
            .iter()
            .map(|id| self.load(id))
            .collect::<Result<Vec<_>, _>>()?;
        v.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(v)
    }

    /// Removes a point's index (its chunks go at the next GC).
    pub fn remove_point(&self, id: &str) -> Result<(), RepoError> {
        check_name(id)?;
        let p = self.point_path(id);
        std::fs::remove_file(&p).map_err(io("remove", &p))?;
        sync_dir(&self.root.join("points"))
    }

    /// Mark and sweep: removes every chunk no index references, and
    /// leftovers in `tmp/`. Holds the exclusive lock. Refuses to run when
    /// an index is unreadable (its chunks would look unreferenced).
    pub fn gc(&self) -> Result<GcReport, RepoError> {
        let _lock = self.lock_exclusive()?;
        let mut live = HashSet::new();
        for p in self.points()? {
            live.extend(p.chunks.into_iter().flatten());
        }
        let mut report = GcReport {
            live_chunks: live.len() as u64,
            ..GcReport::default()
        };
        let tmp = self.root.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(io("list", &tmp))? {
            let e = e.map_err(io("list", &tmp))?;
            let _ = std::fs::remove_file(e.path());
        }
        for i in 0..=255u8 {
            let shard = self.root.join("chunks").join(hex::encode([i]));
            let mut removed_here = false;
            for e in std::fs::read_dir(&shard).map_err(io("list", &shard))? {
                let e = e.map_err(io("list", &shard))?;
                let keep = e
                    .file_name()
                    .to_str()
                    .and_then(Digest::from_hex)
                    .is_some_and(|d| live.contains(&d));
                if keep {
                    continue;
                }
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(e.path()).map_err(io("remove", &e.path()))?;
                report.removed_chunks += 1;
                report.freed_bytes += size;
                removed_here = true;
            }
            if removed_here {
                sync_dir(&shard)?;
            }
        }
        Ok(report)
    }

    /// Re-reads and re-hashes every chunk of the given points (each
    /// distinct chunk once); reports every bad chunk with each point and
    /// offset that uses it.
    pub fn verify(&self, points: &[BackupIndex]) -> Result<VerifyReport, RepoError> {
        let _lock = self.lock_shared()?;
        let mut users: BTreeMap<Digest, Vec<(String, u64)>> = BTreeMap::new();
        for p in points {
            self.check_key(p)?;
            for (i, d) in p.chunks.iter().enumerate() {
                if let Some(d) = d {
                    users
                        .entry(*d)
                        .or_default()
                        .push((p.id.clone(), p.offset(i)));
                }
            }
        }
        let mut report = VerifyReport::default();
        for (d, used_by) in users {
            report.chunks_checked += 1;
            match self.get_chunk(&d) {
                Ok(plain) => report.bytes_checked += plain.len() as u64,
                Err(e) => {
                    let problem = match &e {
                        RepoError::Io { source, .. } => source.to_string(),
                        other => std::error::Error::source(other)
                            .map_or_else(|| other.to_string(), ToString::to_string),
                    };
                    for (point, offset) in used_by {
                        report.bad.push(BadChunk {
                            point,
                            offset,
                            digest: d,
                            problem: problem.clone(),
                        });
                    }
                }
            }
        }
        Ok(report)
    }
}

/// fsync of a directory (makes renames and unlinks in it durable).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), RepoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))
}

/// What GC did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Chunks still referenced.
    pub live_chunks: u64,
    /// Chunks deleted.
    pub removed_chunks: u64,
    /// Stored bytes freed.
    pub freed_bytes: u64,
}

/// A chunk verify or restore found bad, where it is used.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BadChunk {
    /// Point id.
    pub point: String,
    /// Disk offset in that point.
    pub offset: u64,
    /// Chunk digest.
    pub digest: Digest,
    /// What is wrong.
    pub problem: String,
}

/// Result of [`Repository::verify`].
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// Distinct chunks read.
    pub chunks_checked: u64,
    /// Plaintext bytes hashed.
    pub bytes_checked: u64,
    /// Every bad chunk use.
    pub bad: Vec<BadChunk>,
}

impl VerifyReport {
    /// True when nothing is bad.
    pub fn ok(&self) -> bool {
        self.bad.is_empty()
    }
}
