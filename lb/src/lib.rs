//! keel-lb: keel's load balancer. An Octavia-shaped declarative model
//! ([`model`]), validated and compiled into a [`plan::Plan`], realized by a
//! thread-per-core L4/L7 proxy ([`Proxy`]) with active health checks and
//! Maglev consistent hashing.
//!
//! See `lb/README.md` for the design, threading model and assumptions.

pub mod cores;
pub mod daemon;
pub mod health;
mod http;
pub mod l4;
pub mod listener;
/// Maglev lives in the data plane (its L4 LB builds the same tables); one copy.
pub use keel_dataplane::maglev;
pub mod model;
pub mod plan;
pub mod pool;
pub mod proxy;
mod splice;
pub mod stats;
mod tcp;
pub mod tls;

pub use model::LoadBalancer;
pub use proxy::{ApplyError, ApplyReport, Proxy, ProxyOptions, StartError};
pub use stats::LbStatus;
