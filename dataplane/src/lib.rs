//! keel's userspace virtual switch and distributed router for VPC networks.
//!
//! Empty until the switch/router issue fills it: thread-per-core workers,
//! AF_PACKET/AF_XDP/vhost-user ports, logical switches, overlay and the
//! distributed router, all configured through one declarative desired-state
//! interface.
