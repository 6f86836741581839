//! Volume files whose volume is gone. An API process removes a deleted
//! volume's files from its own state directory, which is the host's only
//! when API and agent share a process; with an API node in front of a
//! shared database the host's agent finds them here instead.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use keel_control::api::{records, volumes};

use super::{Agent, StepError};

/// Deleted volumes' files go within this long.
pub(super) const GC_EVERY: Duration = Duration::from_secs(10);

impl Agent {
    /// Removes `<state>/volumes/<id>.raw` (and its sidecars) of volumes no
    /// longer in the store. A volume's record is stored before its file is
    /// made (CREATING), and half-made files (`.partial`) are left alone, so
    /// a file without a record is one whose volume was deleted.
    pub(super) fn gc_volume_files(&mut self, last: &mut Instant) -> Result<(), StepError> {
        if last.elapsed() < GC_EVERY {
            return Ok(());
        }
        *last = Instant::now();
        let purged = self.block_on(async {
            let mut tx = self.store.begin_write().await?;
            let purged = volumes::purge_expired(&mut tx, records::now_ms()).await?;
            tx.commit().await?;
            Ok::<_, StepError>(purged)
        })?;
        for id in &purged {
            tracing::info!(volume = %id, "purged from the recycle bin");
        }
        let dir = self.config.state_dir.join("volumes");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let files: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".raw").map(str::to_owned)
            })
            .collect();
        if files.is_empty() {
            return Ok(());
        }
        let known: HashSet<String> = self.block_on(async {
            let mut conn = self.store.pool().acquire().await?;
            Ok::<_, StepError>(
                records::all(&mut conn, volumes::KIND)
                    .await?
                    .into_iter()
                    .map(|r| r.meta.id)
                    .collect(),
            )
        })?;
        for id in files.iter().filter(|id| !known.contains(*id)) {
            tracing::info!(volume = %id, "removing the files of a deleted volume");
            volumes::remove_volume_files(&self.config.state_dir, id);
        }
        Ok(())
    }
}
