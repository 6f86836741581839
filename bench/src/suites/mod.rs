//! Every suite `keel bench` knows.

pub mod backup;
pub mod cdp;
pub mod control;
mod control_fanout;
mod control_rss;
pub mod dataplane;
pub mod image;
pub mod lb;
pub mod store;
pub mod vhost;
pub mod vm;

use crate::Suite;

pub const ALL: &[Suite] = &[
    store::SUITE,
    control::SUITE,
    dataplane::SUITE,
    image::SUITE,
    lb::SUITE,
    vm::SUITE,
    backup::SUITE,
    cdp::SUITE,
    vhost::SUITE,
];

pub fn find(name: &str) -> Option<&'static Suite> {
    ALL.iter().find(|s| s.name == name)
}
