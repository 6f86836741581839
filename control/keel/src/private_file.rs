//! Files only root reads (a login's tokens, a joined host's database URL):
//! mode 0600 from creation, written under a temporary name, synced and
//! renamed, so a crash never leaves a torn one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;

pub fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    }
    let partial = path.with_extension("partial");
    let context = || format!("Cannot write {}", partial.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .with_context(context)?;
    file.write_all(bytes).with_context(context)?;
    file.sync_all().with_context(context)?;
    std::fs::rename(&partial, path).with_context(|| format!("Cannot write {}", path.display()))
}
