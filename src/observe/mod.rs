//! Seeing where the machine's time goes: flame graphs of the sampled call stacks, code
//! layout heat maps of each binary and its BOLT variant, a USE summary of the host,
//! Prometheus metrics and a self-contained HTML report. Brendan Gregg's flame graphs, code
//! heat maps and USE method, built on what the profiler already samples.
//!
//! Renderers are pure functions from data to bytes ([`flame`], [`heatmap`], [`host`]'s
//! text, [`metrics`], [`html`]); [`serve`] runs them from a task into a cache the
//! `.optbin/` files read from, so the FUSE loop never waits for a render; [`history`] keeps
//! the USE summaries in the catalog. What the user sees is described in docs/observe.md.
//!
//! | file under `.optbin/` | what |
//! |---|---|
//! | `flame.svg` | the whole machine's CPU over the last window: process, then its stack |
//! | `bins/NAME/flame.svg` | one binary's CPU |
//! | `bins/NAME/flame-diff.svg` | the served variant against the original (differential) |
//! | `bins/NAME/heatmap.svg` | code layout heat map, original and variant side by side |
//! | `host/use`, `host/use.json` | the USE summary with hints |
//! | `metrics` | Prometheus text format |
//! | `report.html` | everything on one page |

pub mod command;
pub mod flame;
pub mod heatmap;
pub mod history;
pub mod host;
pub mod html;
pub mod metrics;
pub mod serve;

pub use command::use_command;
pub use metrics::MetricsSettings;
pub use serve::{Observe, SharedStatus};
