//! keel's data protection: continuous replication of guest writes to a
//! disaster-recovery site, and changed-block-tracking backups.
//!
//! Empty until the backup and CDP issues fill it; both consume the vhost-blk
//! write hook.
