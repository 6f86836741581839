//! keel's VPC data plane.
pub mod packet;
