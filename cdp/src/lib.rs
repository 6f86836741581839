//! keel's data protection: continuous replication of guest writes to a
//! disaster-recovery site, and changed-block-tracking backups.
//!
//! - [`backup`]: content-addressed backup repository, full and incremental
//!   (CBT) backup jobs, restore, verify, retention and garbage collection.
//! - The CDP journal (a later issue) will live in its own module beside it;
//!   both consume the vhost-blk write hook.

pub mod backup;
