//! keel's data protection: continuous replication of guest writes to a
//! disaster-recovery site (CDP), and changed-block-tracking backups.
//!
//! - [`journal`]: the CDP journal of a consistency group, fed by the
//!   vhost-blk write hook; segments sealed every RPO period.
//! - [`transport`]: ships sealed segments to the DR site over mutual TLS.
//! - [`replica`]: the DR side: verifies, applies whole segments in order,
//!   keeps recovery points, promotes.
//! - [`source`]: one process serving a group's disks with the journal and
//!   the shipper (`keel cdp source`).
//! - [`capacity`]: the bandwidth sizing formula.
//! - [`backup`]: content-addressed backup repository, full and incremental
//!   (CBT) backup jobs, restore, verify, retention and garbage collection.

pub mod backup;
pub mod capacity;
pub mod journal;
pub mod replica;
pub mod source;
pub mod transport;
