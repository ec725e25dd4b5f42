//! The running part: a task that, every few seconds, samples the host, renders every
//! picture and page into a cache, records the USE history once a minute, and feeds the
//! metrics endpoint. Reads of the control files only copy bytes out of the cache, so no
//! FUSE request ever waits for a render (a failed render is an `EIO` with its reason).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::flame::{self, SymbolCache};
use super::heatmap::{self, HeatFigures, HeatSide};
use super::history::{self, HistoryRetention};
use super::host::{self, HostSnapshot, UseSummary};
use super::html::{self, BinarySection};
use super::metrics::{self, MetricsSettings};
use crate::catalog::{Catalog, base};
use crate::clock::{Clock, SystemClock};
use crate::control::SubsystemStatus;
use crate::control::details::{BinaryDetails, ObserveBinary};
use crate::control::sections::{MachineSections, ObserveMachine};
use crate::control::{ExtraFiles, StatusReport, StatusSource};
use crate::profile::attribute::{Frame, StackOwner, StackSample};
use crate::profile::stacks::StackStore;

/// How often everything is rendered again.
pub const RENDER_INTERVAL: Duration = Duration::from_secs(5);
/// How often a USE summary goes to the history.
const HISTORY_INTERVAL: Duration = Duration::from_secs(60);
/// At most this many binaries get their own pictures (those with the most samples).
const BINARIES_LIMIT: usize = 32;

pub const FLAME: &str = "flame.svg";
pub const METRICS: &str = "metrics";
pub const REPORT: &str = "report.html";
pub const HOST_USE: &str = "host/use";
pub const HOST_USE_JSON: &str = "host/use.json";

type Rendered = Result<Arc<Vec<u8>>, String>;

/// What the last render produced.
#[derive(Default)]
struct Cache {
    files: RwLock<BTreeMap<String, Rendered>>,
    /// Heat map figures by the original's sha256.
    figures: RwLock<HashMap<String, HeatFigures>>,
    summary: RwLock<String>,
}

/// The observability subsystem as the daemon runs it.
pub struct Observe {
    mountpoint: PathBuf,
    stacks: StackStore,
    catalog: Catalog,
    settings: MetricsSettings,
    cache: Arc<Cache>,
}

impl Observe {
    pub fn new(
        settings: &MetricsSettings,
        mountpoint: &Path,
        catalog: &Catalog,
        stacks: StackStore,
    ) -> Self {
        Self {
            mountpoint: mountpoint.to_path_buf(),
            stacks,
            catalog: catalog.clone(),
            settings: settings.clone(),
            cache: Arc::default(),
        }
    }

    /// The files under `.optbin/` this subsystem adds.
    pub fn files(&self) -> Arc<dyn ExtraFiles> {
        Arc::new(Files(Arc::clone(&self.cache)))
    }

    /// The `observe` section of the status report (heat map figures per binary).
    pub fn status(&self) -> Arc<dyn SubsystemStatus> {
        Arc::new(Section(Arc::clone(&self.cache)))
    }

    /// Starts the render task (and the metrics endpoint, when configured) on `rt`; both end
    /// on `shutdown`. Returns them for shutdown to await.
    pub fn spawn(
        &self,
        rt: &tokio::runtime::Handle,
        status: Arc<dyn StatusSource>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        let (page_tx, page_rx) = watch::channel(Arc::new(Vec::new()));
        if let Some(addr) = self.settings.listen {
            let stop = shutdown.clone();
            tasks.push(rt.spawn(async move {
                if let Err(e) = metrics::serve_http(addr, page_rx, stop).await {
                    tracing::error!(error = %format!("{e:#}"), "the metrics endpoint stopped");
                }
            }));
        }
        let renderer = Renderer {
            mountpoint: self.mountpoint.clone(),
            stacks: self.stacks.clone(),
            catalog: self.catalog.clone(),
            cache: Arc::clone(&self.cache),
            status,
            clock: Arc::new(SystemClock),
            symbols: Arc::default(),
        };
        tasks.push(rt.spawn(render_loop(renderer, page_tx, shutdown)));
        tasks
    }
}

struct Files(Arc<Cache>);

impl ExtraFiles for Files {
    fn names(&self) -> Vec<String> {
        self.0.files.read().map(|f| f.keys().cloned().collect()).unwrap_or_default()
    }

    fn read(&self, name: &str) -> Option<Result<Vec<u8>, String>> {
        let files = self.0.files.read().ok()?;
        Some(files.get(name)?.as_ref().map(|b| b.to_vec()).map_err(Clone::clone))
    }
}

struct Section(Arc<Cache>);

impl SubsystemStatus for Section {
    fn name(&self) -> &'static str {
        "observe"
    }

    fn section(&self, sections: &mut MachineSections) {
        let summary = self.0.summary.read().map(|s| s.clone()).unwrap_or_default();
        sections.observe = Some(ObserveMachine { summary });
    }

    fn binary(&self, conn: &rusqlite::Connection, binary_id: i64, details: &mut BinaryDetails) {
        details.observe = self.figures_of(conn, binary_id);
    }
}

impl Section {
    fn figures_of(&self, conn: &rusqlite::Connection, binary_id: i64) -> Option<ObserveBinary> {
        let sha = base::binary_by_id(conn, binary_id).ok()??.sha256;
        let figures = self.0.figures.read().ok()?.get(&sha)?.clone();
        let summary = match figures.variant_hot_pages {
            Some(v) => format!(
                "hot code: {} pages hold 90% of the original's samples, {v} of the variant's",
                figures.original_hot_pages
            ),
            None => {
                format!("hot code: {} pages hold 90% of the samples", figures.original_hot_pages)
            }
        };
        Some(ObserveBinary { figures, summary })
    }
}

/// A status source shared by the control directory and the renderer.
pub struct SharedStatus(pub Arc<dyn StatusSource>);

impl StatusSource for SharedStatus {
    fn report(&self) -> anyhow::Result<StatusReport> {
        self.0.report()
    }
    fn bin_files(&self) -> Vec<String> {
        self.0.bin_files()
    }
    fn bin_file(&self, relative: &str) -> anyhow::Result<Option<Vec<u8>>> {
        self.0.bin_file(relative)
    }
}

struct Renderer {
    /// Files under the mount are never opened from here (the render would wait on this
    /// very daemon's FUSE loop).
    mountpoint: PathBuf,
    stacks: StackStore,
    catalog: Catalog,
    cache: Arc<Cache>,
    status: Arc<dyn StatusSource>,
    clock: Arc<dyn Clock>,
    symbols: Arc<std::sync::Mutex<SymbolCache>>,
}

async fn render_loop(
    r: Renderer,
    page: watch::Sender<Arc<Vec<u8>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let r = Arc::new(r);
    let mut before = tokio::task::spawn_blocking(|| HostSnapshot::read(Path::new("/")))
        .await
        .ok()
        .and_then(Result::ok);
    // The first summary needs an interval: a short one, so the files exist at once.
    let mut wait = Duration::from_secs(1);
    let mut last_history: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
        }
        wait = RENDER_INTERVAL;
        let r2 = Arc::clone(&r);
        let prev = before.take();
        let done = tokio::task::spawn_blocking(move || {
            let now = HostSnapshot::read(Path::new("/")).ok();
            let summary = match (&prev, &now) {
                (Some(a), Some(b)) => {
                    Some(host::summarize(a, b, r2.clock.unix_secs(), &|| host::top_resident(3)))
                }
                _ => None,
            };
            let metrics = r2.render_all(summary.as_ref());
            (now, summary, metrics)
        })
        .await;
        let Ok((now, summary, metrics_page)) = done else {
            tracing::error!("the render thread panicked");
            continue;
        };
        before = now;
        if let Some(m) = metrics_page {
            let _ = page.send(Arc::new(m));
        }
        if let Some(s) = summary
            && last_history.is_none_or(|t| t.elapsed() >= HISTORY_INTERVAL)
        {
            last_history = Some(tokio::time::Instant::now());
            let at = s.at;
            let written = r
                .catalog
                .run(move |c| {
                    history::record(c, &s)?;
                    history::rotate(c, at, HistoryRetention::default())
                })
                .await;
            if let Err(e) = written {
                tracing::warn!(error = %format!("{e:#}"), "recording the USE history failed");
            }
        }
    }
}

/// Stacks of one original binary: its own, and its variants' by variant id.
#[derive(Default)]
struct BinaryStacks<'a> {
    original: Vec<(&'a StackSample, u64)>,
    mapped: Option<(u64, u64)>,
    variants: BTreeMap<i64, Vec<(&'a StackSample, u64)>>,
    samples: u64,
}

impl Renderer {
    /// Renders every file into the cache; returns the metrics page.
    fn render_all(&self, host: Option<&UseSummary>) -> Option<Vec<u8>> {
        let mut files: BTreeMap<String, Rendered> = BTreeMap::new();
        let mut figures = HashMap::new();
        let report = match self.status.report() {
            Ok(r) => Some(r),
            Err(e) => {
                let reason = format!("building the status report: {e:#}");
                tracing::warn!("{reason}");
                for name in [METRICS, REPORT] {
                    files.insert(name.into(), Err(reason.clone()));
                }
                None
            }
        };
        let now = self.clock.unix_secs();
        let stacks = self.stacks.recent(now);
        let Ok(mut symbols) = self.symbols.lock() else { return None };
        let variant_paths: HashMap<i64, PathBuf> = report
            .iter()
            .flat_map(|r| &r.binaries)
            .flat_map(|b| &b.variants)
            .map(|v| (v.id, PathBuf::from(&v.store_path)))
            .collect();

        // The machine.
        let all: Vec<(&StackSample, u64)> = stacks.iter().map(|(s, n)| (s, *n)).collect();
        let machine = fold_all(&all, true, &variant_paths, &self.mountpoint, &mut symbols);
        let total: u64 = all.iter().map(|(_, n)| n).sum();
        let machine_title =
            format!("CPU of the whole machine, last {} min", self.stacks.window_secs() / 60);
        let machine_subtitle = format!("{total} samples; {}", flame::unwinding_note(&all));
        let machine_svg = flame::render(&machine_title, &machine_subtitle, &machine);
        files.insert(FLAME.into(), to_rendered(FLAME, machine_svg));
        // The report's copy: the same graph at a fixed width (see `flame::render_inline`).
        let inline_flame = flame::render_inline(&machine_title, &machine_subtitle, &machine)
            .map(|svg| String::from_utf8_lossy(&svg).into_owned())
            .unwrap_or_else(|e| {
                flame::empty_svg(&machine_title, &format!("could not be rendered: {e:#}"))
            });

        // Per binary.
        let mut per_binary: HashMap<&Path, BinaryStacks> = HashMap::new();
        for (s, n) in &all {
            match &s.owner {
                StackOwner::Original(f) => {
                    let b = per_binary.entry(f.path.as_path()).or_default();
                    b.original.push((s, *n));
                    b.mapped = b.mapped.or(f.mapped);
                    b.samples += n;
                }
                StackOwner::Variant { original, variant: Some(id) } => {
                    let b = per_binary.entry(original.path.as_path()).or_default();
                    b.variants.entry(*id).or_default().push((s, *n));
                    b.samples += n;
                }
                _ => {}
            }
        }
        let mut ranked: Vec<(&Path, BinaryStacks)> = per_binary.into_iter().collect();
        ranked.sort_by_key(|b| std::cmp::Reverse(b.1.samples));
        ranked.truncate(BINARIES_LIMIT);
        let mut sections = Vec::new();
        for (path, b) in &ranked {
            let Some(status) = report
                .as_ref()
                .and_then(|r| r.binaries.iter().find(|s| Path::new(&s.path) == *path))
            else {
                continue;
            };
            if status.name.is_empty() {
                continue; // not the one PATH finds: no bins/NAME directory
            }
            let name = &status.name;
            let folded =
                fold_all(&b.original, false, &variant_paths, &self.mountpoint, &mut symbols);
            let title = format!("{name}: CPU, last {} min", self.stacks.window_secs() / 60);
            let sub = format!(
                "{} samples of the original; {}",
                b.original.iter().map(|(_, n)| n).sum::<u64>(),
                flame::unwinding_note(&b.original)
            );
            let key = format!("bins/{name}/{FLAME}");
            files.insert(key.clone(), to_rendered(&key, flame::render(&title, &sub, &folded)));

            // The variant with the most samples (normally the one served).
            let variant =
                b.variants.iter().max_by_key(|(_, v)| v.iter().map(|(_, n)| n).sum::<u64>());
            if let Some((id, vstacks)) = variant {
                let after =
                    fold_all(vstacks, false, &variant_paths, &self.mountpoint, &mut symbols);
                let key = format!("bins/{name}/flame-diff.svg");
                let diff = flame::render_diff(
                    &format!(
                        "{name}: variant {id} against the original (normalized; red grew, blue shrank)"
                    ),
                    &format!(
                        "{} samples of the variant",
                        vstacks.iter().map(|(_, n)| n).sum::<u64>()
                    ),
                    &folded,
                    &after,
                );
                files.insert(key.clone(), to_rendered(&key, diff));
            }

            let key = format!("bins/{name}/heatmap.svg");
            match heat_sides(
                path,
                b.mapped,
                &b.original,
                variant.map(|(id, v)| (*id, v.as_slice())),
                &variant_paths,
                &mut symbols,
            ) {
                Ok((sides, fig)) => {
                    let svg = heatmap::render_svg(
                        &format!(
                            "{name}: code layout heat map, last {} min",
                            self.stacks.window_secs() / 60
                        ),
                        &sides,
                    );
                    if let Some(sha) = &status.sha256 {
                        figures.insert(sha.clone(), fig);
                    }
                    if !status.variants.is_empty() {
                        let gain = status
                            .details
                            .policy()
                            .and_then(|p| p.gain.as_ref())
                            .map(|g| g.text.clone());
                        sections.push(BinarySection {
                            name: name.clone(),
                            gain,
                            heatmap: svg.clone(),
                        });
                    }
                    files.insert(key, Ok(Arc::new(svg.into_bytes())));
                }
                Err(e) => {
                    files.insert(key.clone(), to_rendered::<Vec<u8>>(&key, Err(e)));
                }
            }
        }
        drop(symbols);

        // The host.
        if let Some(h) = host {
            files.insert(HOST_USE.into(), Ok(Arc::new(host::render_text(h).into_bytes())));
            let mut json = serde_json::to_vec_pretty(h).unwrap_or_default();
            json.push(b'\n');
            files.insert(HOST_USE_JSON.into(), Ok(Arc::new(json)));
        }

        let metrics_page = report.as_ref().map(|r| metrics::render(r, host).into_bytes());
        if let (Some(r), Some(m)) = (&report, &metrics_page) {
            files.insert(METRICS.into(), Ok(Arc::new(m.clone())));
            files.insert(
                REPORT.into(),
                Ok(Arc::new(html::render(r, &inline_flame, &sections, host).into_bytes())),
            );
        }

        let summary = format!(
            "{} pictures rendered from {total} samples of the last {} min{}",
            files.len(),
            self.stacks.window_secs() / 60,
            host.and_then(|h| h.resources.iter().find_map(|r| r.hint.as_deref()))
                .map_or(String::new(), |h| format!("; {h}"))
        );
        if let Ok(mut s) = self.cache.summary.write() {
            *s = summary;
        }
        if let Ok(mut f) = self.cache.figures.write() {
            *f = figures;
        }
        if let Ok(mut f) = self.cache.files.write() {
            *f = files;
        }
        metrics_page
    }
}

fn to_rendered<T: Into<Vec<u8>>>(name: &str, r: anyhow::Result<T>) -> Rendered {
    r.map(|b| Arc::new(b.into())).map_err(|e| {
        let reason = format!("rendering .optbin/{name}: {e:#}");
        tracing::warn!("{reason}");
        reason
    })
}

/// Folded lines of `stacks`, each symbolized against its owner's file.
fn fold_all(
    stacks: &[(&StackSample, u64)],
    with_process: bool,
    variants: &HashMap<i64, PathBuf>,
    mountpoint: &Path,
    symbols: &mut SymbolCache,
) -> Vec<String> {
    let mut sums: HashMap<String, u64> = HashMap::new();
    let mut by_owner: HashMap<&StackOwner, Option<Arc<crate::profile::symbolize::Symbolizer>>> =
        HashMap::new();
    for (s, n) in stacks {
        let sym = by_owner
            .entry(&s.owner)
            .or_insert_with(|| {
                let (path, mapped) = flame::owner_file(&s.owner, variants)?;
                if path.starts_with(mountpoint) {
                    return None;
                }
                symbols.get(&path, mapped)
            })
            .clone();
        let line = flame::fold(s, with_process.then_some(&*s.process), sym.as_deref());
        *sums.entry(line).or_default() += n;
    }
    flame::folded_lines(sums)
}

/// The heat map's sides (original, and the variant when it has samples) and figures.
fn heat_sides(
    path: &Path,
    mapped: Option<(u64, u64)>,
    original: &[(&StackSample, u64)],
    variant: Option<(i64, &[(&StackSample, u64)])>,
    variants: &HashMap<i64, PathBuf>,
    symbols: &mut SymbolCache,
) -> anyhow::Result<(Vec<HeatSide>, HeatFigures)> {
    let leaves = |stacks: &[(&StackSample, u64)]| {
        let mut m: HashMap<u64, u64> = HashMap::new();
        for (s, n) in stacks {
            if let Some(Frame::Own(off)) = s.frames.first() {
                *m.entry(*off).or_default() += n;
            }
        }
        m
    };
    let sym = symbols.get(path, mapped).ok_or_else(|| {
        anyhow::anyhow!("{} has no symbols (or was replaced since it ran)", path.display())
    })?;
    let orig = heatmap::side("original", heatmap::exec_sections(path)?, &sym, &leaves(original));
    let mut fig = HeatFigures {
        original_samples: orig.samples,
        original_hot_pages: heatmap::hot_pages(&orig, heatmap::HOT_SHARE),
        ..Default::default()
    };
    let mut sides = vec![orig];
    if let Some((id, stacks)) = variant
        && let Some(vpath) = variants.get(&id)
        && let Some(vsym) = symbols.get(vpath, None)
    {
        let v = heatmap::side(
            format!("variant {id}"),
            heatmap::exec_sections(vpath)?,
            &vsym,
            &leaves(stacks),
        );
        fig.variant = Some(id);
        fig.variant_samples = v.samples;
        fig.variant_hot_pages = Some(heatmap::hot_pages(&v, heatmap::HOT_SHARE));
        sides.push(v);
    }
    Ok((sides, fig))
}
