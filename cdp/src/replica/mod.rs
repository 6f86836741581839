//! The DR side of a consistency group: [`server`] receives segments over
//! mutual TLS, [`store`] verifies and applies them and keeps recovery
//! points; promote stops it at a chosen point.

pub mod server;
pub mod store;

pub use server::{serve, ReplicaConfig, ServeError};
pub use store::{PointInfo, Refusal, Replica, ReplicaState, StoreError};
