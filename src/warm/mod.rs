//! Keeping hot binaries warm: the files that runs of served binaries need (the binary served
//! and the shared libraries its processes map) stay in the page cache, within a memory
//! budget, so that a cold start after eviction (a big build, memory pressure) runs at warm
//! speed.
//!
//! The parts, each with one job:
//! - [`settings`]: the `[warm]` section of the config file.
//! - [`rank`]: which files are hot (exec counts with exponential decay) and which of them fit
//!   the budget. Pure.
//! - [`pages`]: the page cache seen through a small trait: a file's resident pages
//!   (`mincore` of a read-only mapping) and reading ranges back (`posix_fadvise(WILLNEED)`).
//! - [`hot`]: where a BOLT variant's hot code is packed (its new `.text`).
//! - [`order`]: in which order lost pages are read back: packed hot code first. Pure.
//! - [`pressure`]: memory pressure from PSI (`/proc/pressure/memory`); warming backs off
//!   when the kernel is short of memory instead of fighting it.
//! - [`maps`]: the regular files a process maps (its shared libraries).
//! - [`warmer`]: the owner thread that ties them together and its status.
//!
//! A file's *working set* is the union of the pages seen resident right after its runs (the
//! pages runs actually touched, plus the kernel's readahead). Only those pages are read
//! back: first the pages of BOLT variants' packed hot code, then the rest, hottest file
//! first.

pub mod hot;
pub mod maps;
pub mod order;
pub mod pages;
pub mod pressure;
pub mod rank;
pub mod settings;
pub mod warmer;

pub use settings::Settings;
pub use warmer::{WarmStatus, Warmer};
