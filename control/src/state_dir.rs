//! The state directory: where the database and every other piece of host
//! state live. Checked before anything else starts, and held with an
//! exclusive lock so two keels never share one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("State directory {path} cannot be created")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("State directory {path} is not writable")]
    NotWritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("State directory {path} is in use by another keel (lock file {lock} is held)")]
    InUse { path: PathBuf, lock: PathBuf },
}

/// An existing, writable state directory that this process holds exclusively
/// until the value is dropped.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    _lock: File,
}

impl StateDir {
    pub fn acquire(path: &Path) -> Result<StateDir, StateDirError> {
        fs::create_dir_all(path).map_err(|source| StateDirError::Create {
            path: path.to_owned(),
            source,
        })?;
        probe_writable(path).map_err(|source| StateDirError::NotWritable {
            path: path.to_owned(),
            source,
        })?;
        let lock_path = path.join("keel.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StateDirError::NotWritable {
                path: path.to_owned(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateDirError::InUse {
                    path: path.to_owned(),
                    lock: lock_path,
                })
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StateDirError::NotWritable {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        Ok(StateDir {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Root ignores permission bits, so the only honest test is to write,
/// sync and remove a file.
fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".keel-write-probe-{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&probe)?;
        file.write_all(b"probe")?;
        file.sync_all()
    })();
    let _ = fs::remove_file(&probe);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/state");
        let state = StateDir::acquire(&path).unwrap();
        assert!(state.path().is_dir());
    }

    #[test]
    fn path_below_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = StateDir::acquire(&file.join("state")).unwrap_err();
        assert!(matches!(err, StateDirError::Create { .. }), "got {err:?}");
    }

    #[test]
    fn second_holder_is_refused_until_first_drops() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateDir::acquire(dir.path()).unwrap();
        let err = StateDir::acquire(dir.path()).unwrap_err();
        assert!(matches!(err, StateDirError::InUse { .. }), "got {err:?}");
        drop(first);
        StateDir::acquire(dir.path()).unwrap();
    }
}
