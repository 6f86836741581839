//! Shipping sealed segments to the DR site: [`wire`] frames over mutual
//! [`tls`], sent by the [`ship`] thread of the source process.

pub mod digest;
pub mod ship;
pub mod tls;
pub mod wire;
