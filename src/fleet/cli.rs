//! `optbin fleet status|list|profile NAME`: asks Redis directly (with the `[fleet]`
//! settings and credentials of the config file), not the daemon, so it works on a machine
//! whose daemon is down and shows what the fleet itself holds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;

use super::format::{Contribution, VerdictList};
use super::merge::merge;
use super::redis_store::RedisStore;
use super::settings::Resolved;
use super::store::{FleetStore, RawIdentity};
use super::trust::summarize;
use crate::config::FileConfig;
use crate::identity::ContentId;
use crate::profile::maturity::group;

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Whether Redis answers, this machine's id and mode, how many binaries the fleet knows.
    Status,
    /// Per binary identity: machines, samples, runs, verdicts (newest first).
    List {
        /// Identities shown at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// The merged fleet profile of NAME's content (a command on PATH or a path), as BOLT
    /// fdata on stdout.
    Profile { name: String },
}

/// Runs one `optbin fleet` command with the config file at `config` (default location when
/// None).
pub fn run(config: Option<&Path>, cmd: FleetCommand) -> anyhow::Result<ExitCode> {
    let file = FileConfig::load(config)?;
    let Some(settings) = &file.fleet else {
        bail!(
            "no [fleet] section in {}: this machine works alone (docs/fleet.md shows how to \
             join a fleet)",
            config.map_or(crate::config::DEFAULT_CONFIG_FILE.into(), |p| p.display().to_string())
        );
    };
    let resolved = settings.resolve()?;
    let store = RedisStore::from_settings(&resolved)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mountpoint =
        file.mountpoint.clone().unwrap_or_else(|| crate::config::DEFAULT_MOUNTPOINT.into());
    rt.block_on(async {
        match cmd {
            FleetCommand::Status => status(&store, &resolved).await,
            FleetCommand::List { limit } => list(&store, &resolved, limit).await,
            FleetCommand::Profile { name } => profile(&store, &resolved, &name, &mountpoint).await,
        }
    })
}

async fn status(store: &RedisStore, r: &Resolved) -> anyhow::Result<ExitCode> {
    println!(
        "machine: {} ({})",
        r.machine,
        if r.settings.mode.writes() { "read-write" } else { "read" }
    );
    println!(
        "redis: {} ({})",
        r.urls.join(", "),
        if r.urls.len() > 1 { "cluster" } else { "one server" }
    );
    match store.ping().await {
        Ok(()) => println!("reachable: yes"),
        Err(e) => {
            println!("reachable: no ({e:#})");
            return Ok(ExitCode::FAILURE);
        }
    }
    let ids = store.identities(1_000_000).await?;
    println!("binaries known to the fleet: {}", ids.len());
    if let Some((_, newest)) = ids.first() {
        println!("newest push: {}", super::utc(*newest));
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(store: &RedisStore, r: &Resolved, limit: usize) -> anyhow::Result<ExitCode> {
    let ids = store.identities(limit).await?;
    let contents: Vec<ContentId> = ids.iter().filter_map(|(s, _)| ContentId::parse(s)).collect();
    let raws = store.pull(&contents, r.settings.max_machines, r.settings.max_value_bytes).await?;
    println!(
        "{:<16} {:>8} {:>12} {:>7}  {:<16} {:<22} last push",
        "identity", "machines", "samples", "runs", "source", "verdicts"
    );
    for ((content, raw), (_, at)) in contents.iter().zip(&raws).zip(&ids) {
        let (contribs, lists, refused) = parse_all(content, raw, r.settings.max_value_bytes);
        let merged = merge(&contribs, r.settings.max_machine_share);
        let v = summarize(&lists);
        let rejected: std::collections::BTreeSet<&str> =
            v.rejected.iter().map(|x| x.0.as_str()).collect();
        let verdicts =
            format!("+{} -{} !{}", v.promoted_on.len(), rejected.len(), v.quarantined.len());
        let (machines, samples, runs, source) = match &merged {
            Some(m) => (
                m.machines.len(),
                group(m.samples),
                m.runs,
                serde_json::to_value(m.source)
                    .ok()
                    .and_then(|s| s.as_str().map(String::from))
                    .unwrap_or_default(),
            ),
            None => (0, "-".into(), 0, "-".into()),
        };
        println!(
            "{:<16} {:>8} {:>12} {:>7}  {:<16} {:<22} {}",
            &content.hex()[..16],
            machines,
            samples,
            runs,
            source,
            verdicts,
            super::utc(*at)
        );
        for (key, why) in refused {
            eprintln!("  refused {key}: {why}");
        }
    }
    println!("(verdicts: +promoted on N machines, -rejected on N, !variants quarantined)");
    Ok(ExitCode::SUCCESS)
}

async fn profile(
    store: &RedisStore,
    r: &Resolved,
    name: &str,
    mountpoint: &Path,
) -> anyhow::Result<ExitCode> {
    let path = resolve_command(name, mountpoint)?;
    let content =
        ContentId::of_file(&path).with_context(|| format!("hashing {}", path.display()))?;
    let raws = store.pull(&[content], r.settings.max_machines, r.settings.max_value_bytes).await?;
    let (contribs, _, refused) = parse_all(&content, &raws[0], r.settings.max_value_bytes);
    for (key, why) in refused {
        eprintln!("optbin: refused {key}: {why}");
    }
    let Some(merged) = merge(&contribs, r.settings.max_machine_share) else {
        bail!("the fleet has no profile of {} (sha256 {})", path.display(), content.hex());
    };
    eprintln!(
        "{}: {} machines, {} samples, {} runs (sha256 {})",
        path.display(),
        merged.machines.len(),
        group(merged.samples),
        merged.runs,
        content.short()
    );
    std::io::stdout().write_all(&merged.fdata())?;
    Ok(ExitCode::SUCCESS)
}

/// Parsed contributions and verdicts, and the refused values with their reasons.
pub fn parse_all(
    content: &ContentId,
    raw: &RawIdentity,
    cap: usize,
) -> (Vec<Contribution>, Vec<VerdictList>, Vec<(String, String)>) {
    let mut refused = Vec::new();
    let mut contribs = Vec::new();
    for (m, bytes) in &raw.profiles {
        match Contribution::parse(bytes, content, m, cap) {
            Ok(c) => contribs.push(c),
            Err(why) => refused.push((super::keys::profile(content, m), why)),
        }
    }
    let mut lists = Vec::new();
    for (m, bytes) in &raw.verdicts {
        match VerdictList::parse(bytes, content, m, cap) {
            Ok(l) => lists.push(l),
            Err(why) => refused.push((super::keys::verdicts(content, m), why)),
        }
    }
    (contribs, lists, refused)
}

/// A path as given, or the first NAME on PATH outside the optbin mount (whose files may be
/// variants, not the original).
fn resolve_command(name: &str, mountpoint: &Path) -> anyhow::Result<PathBuf> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if crate::config::normalize(&dir).starts_with(mountpoint) {
            continue;
        }
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{name} is not on PATH (outside the optbin mount); give its path")
}
