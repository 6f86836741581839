//! Every suite `keel bench` knows.

pub mod backup;
pub mod control;
pub mod dataplane;
pub mod image;
pub mod store;

use crate::Suite;

pub const ALL: &[Suite] = &[
    store::SUITE,
    control::SUITE,
    dataplane::SUITE,
    image::SUITE,
    backup::SUITE,
];

pub fn find(name: &str) -> Option<&'static Suite> {
    ALL.iter().find(|s| s.name == name)
}
