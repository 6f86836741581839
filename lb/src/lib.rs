//! keel's load balancing: L4 in the data plane and a thread-per-core L7
//! HTTP/HTTPS proxy, configured through Octavia-shaped resources.
//!
//! Empty until the load-balancing issue fills it.
