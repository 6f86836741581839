//! keel's vhost-user backends: the virtio-blk disks (and later virtio-net
//! NICs) that QEMU guests use.
//!
//! Empty until the vhost-user-blk issue fills it. Every completed guest write
//! and flush will pass one hook in the write path; CDP and CBT hang there.
