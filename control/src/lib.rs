//! keel's control plane: the management REST API, the state store, and the
//! `keel up` appliance process that ties them together.
//!
//! Data flows one way: API → store → host agent → data planes. Nothing in
//! here calls into a data plane directly.

pub mod api;
pub mod server;
pub mod state_dir;
pub mod store;
