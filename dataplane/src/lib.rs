//! keel's VPC data plane.
pub mod afpacket;
pub mod bench;
pub mod config;
#[cfg(test)]
mod config_tests;
pub mod control;
pub mod counters;
pub mod daemon;
pub mod engine;
pub mod fastmap;
pub mod lpm;
pub mod model;
pub mod packet;
pub mod pipeline;
#[cfg(test)]
mod pipeline_tests;
pub mod port;
pub mod tables;
pub mod testutil;
