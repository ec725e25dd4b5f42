//! The daemon: wiring of the mount, the catalog and the background tasks, and their
//! orderly shutdown.

pub mod actions;
pub mod indexer;
pub mod optimizing;
pub mod policing;
pub mod priority;
pub mod profiling;
pub mod refresh;
pub mod report;
pub mod run;
pub mod warming;
