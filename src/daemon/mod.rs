//! The daemon: wiring of the mount, the catalog and the background tasks, and their
//! orderly shutdown.

pub mod actions;
pub mod indexer;
pub mod native_execs;
pub mod optimizing;
pub mod priority;
pub mod profiling;
pub mod report;
pub mod run;
pub mod serving;
pub mod warming;
