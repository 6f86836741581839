//! Packet formats: `zerocopy` header types, a bounds-checked parser and
//! Internet checksum helpers.
//!
//! Nothing here allocates or panics on input: every header is read through
//! `zerocopy`'s checked prefix casts, and every length taken from a packet is
//! compared against the bytes actually present before it is used.

pub mod checksum;
pub mod headers;
pub mod parse;

pub use parse::{build, parse, ParseError, Parsed};
