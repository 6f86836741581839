//! The bootable keel appliance image for compute hosts, and guest boot
//! firmware selection.
//!
//! Empty until the appliance-image issue fills it. The test guest image that
//! integration tests boot lives in `keel-testkit`, not here: it is a fixture,
//! not something keel ships.
