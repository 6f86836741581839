//! Every suite `keel bench` knows.

pub mod control;
pub mod store;

use crate::Suite;

pub const ALL: &[Suite] = &[store::SUITE, control::SUITE];

pub fn find(name: &str) -> Option<&'static Suite> {
    ALL.iter().find(|s| s.name == name)
}
