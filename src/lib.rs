//! optbin: post-link optimization (LLVM BOLT) for one ordinary Linux machine.
//!
//! Data flows one way on the exec path (lookup -> serving table -> handle -> read) and one
//! way on the optimizing path (sampler -> profile -> maturity -> BOLT job -> store ->
//! policy -> serving table). See `docs/architecture.md` for the map of modules.

pub mod bench;
pub mod bolt;
pub mod catalog;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod elf;
pub mod error;
pub mod fleet;
pub mod fs;
pub mod fuse;
pub mod identity;
pub mod measure;
pub mod observe;
pub mod policy;
pub mod profile;
pub mod store;
pub mod train;
pub mod warm;
