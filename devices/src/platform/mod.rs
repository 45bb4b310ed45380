//! Platforms: where a kind of machine puts its devices.

pub mod pc;
