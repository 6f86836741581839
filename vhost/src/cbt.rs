//! placeholder
pub struct Cbt;
#[derive(Debug)]
pub struct CbtError;
