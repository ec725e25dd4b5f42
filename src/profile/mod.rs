//! Profiles: continuous, cheap sampling of the whole machine into per-binary BOLT
//! profiles.
//!
//! Flow: [`source`] picks the perf event -> [`sampler`] reads decoded records ->
//! [`attribute`] maps samples to binaries and file offsets -> [`identify`] and
//! [`symbolize`] turn offsets into (function, offset) for one exact content ->
//! `catalog::profiles` stores them in time windows -> [`maturity`] judges them ->
//! [`fdata`] / [`summary`] hand them to BOLT and to the status pages; call stacks go to
//! [`stacks`] for the pictures of `crate::observe`. [`task`] runs it all;
//! [`instrument`] holds the instrumentation mode's decision and merge.

pub mod attribute;
pub mod fdata;
pub mod identify;
pub mod instrument;
pub mod maturity;
pub mod procmaps;
pub mod resolve;
pub mod sampler;
pub mod settings;
pub mod source;
pub mod stacks;
pub mod summary;
pub mod symbolize;
pub mod task;

pub use resolve::{IdentityResolver, PathResolver, Resolved, UnderDirResolver};
pub use settings::Settings;
pub use summary::{
    ProfileKind, ProfileSummary, profile_summary, write_fdata, write_profile_for_bolt,
};
pub use task::{
    BinaryStatus, Profiler, ProfilerConfig, ProfilerStatus, ProfilerStatusHandle, run_profiler,
};
