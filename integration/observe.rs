//! The pictures, the host summary, the metrics and the report on a real mount, nothing
//! faked: a C program compiled here with frame pointers (its hot function called from two
//! callers, cold code between them) runs through `<mnt>/bin` while the real daemon samples
//! the machine with perf callchains. Its flame graphs hold both call paths by name, its heat
//! map shows the hot function's pages, and once the daemon's own BOLT variant is served the
//! variant's hot-page figure is not larger than the original's. A CPU-burning workload
//! shows as CPU saturation with a hint; the metrics endpoint and `.optbin/metrics` parse as
//! Prometheus text; `report.html` renders in headless Chromium to a non-blank screenshot
//! and a DOM holding the flame graph and the table; `optbin use` reads the USE history.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, OPTBIN};
use serde_json::Value;

/// `hot` is called from `caller_a` and `caller_b`, which do work of their own; 20 KB of
/// cold code separates each of them, so the original's samples spread over several pages.
const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
volatile unsigned long sink;
#define R4(x) x x x x
#define R16(x) R4(R4(x))
#define R1K(x) R16(R16(R4(x)))
#define PAD(name) __attribute__((noinline, noclone)) void name(void) { R1K(sink = sink * 31 + 7;) }
PAD(cold_one)
__attribute__((noinline, noclone)) unsigned long finish(unsigned long x) { return x ^ (x >> 31); }
/* Not a leaf (it calls finish): gcc 12 leaves the frame pointer out of leaf functions even
   with -fno-omit-frame-pointer, and a sample in such a leaf shows its caller's caller. */
__attribute__((noinline, noclone)) unsigned long hot(unsigned long x, unsigned long n) {
    for (unsigned long i = 0; i < n; i++) x = x * 6364136223846793005UL + (i ^ (x >> 17));
    return finish(x) + 1;
}
PAD(cold_two)
__attribute__((noinline, noclone)) unsigned long caller_a(unsigned long n) {
    unsigned long s = 1;
    for (int k = 0; k < 20; k++) {
        s = hot(s, n);
        for (unsigned long j = 0; j < n / 2; j++) s = (s ^ (s >> 7)) * 0x100000001B3UL + j;
    }
    return s;
}
PAD(cold_three)
__attribute__((noinline, noclone)) unsigned long caller_b(unsigned long n) {
    unsigned long s = 3;
    for (int k = 0; k < 20; k++) {
        s = hot(s, n);
        for (unsigned long j = 0; j < n / 2; j++) s = (s + (s << 5)) ^ (j * 0x9E3779B97F4A7C15UL);
    }
    return s;
}
PAD(cold_four)
int main(int argc, char **argv) {
    unsigned long n = argc > 1 ? strtoul(argv[1], 0, 10) : 1000;
    if (argc > 2) { cold_one(); cold_two(); cold_three(); cold_four(); }
    printf("%lu\n", caller_a(n) ^ caller_b(n));
    return 0;
}
"#;

/// Iterations per call of `hot` in one run (about 0.1 s of CPU here).
const N: &str = "400000";

const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

fn config(scratch: &Path, port: u16) -> String {
    format!(
        r#"[profile]
frequency_hz = 999
flush_secs = 1
window_secs = 2
identify_after_samples = 20
min_samples = 1500
min_runs = 2
min_stability = 0.5

[optimizer]
scratch_dir = {:?}
min_text_bytes = 1024
check_interval_secs = 1
timeout_secs = 120

[metrics]
listen = "127.0.0.1:{port}"
"#,
        scratch.display().to_string()
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run(program: &Path) {
    let out = common::run(Command::new(program).arg(N));
    assert_eq!(out.code, Some(0), "{}: {out:?}", program.display());
}

/// One frame of an inferno flame graph: its name and box.
#[derive(Debug, Clone)]
struct Frame {
    name: String,
    x: f64,
    width: f64,
    y: f64,
}

/// The frames of a flame graph SVG (which must parse as XML).
fn frames(svg: &str) -> Vec<Frame> {
    let doc = xml(svg);
    let pct = |s: Option<&str>| s.and_then(|s| s.trim_end_matches('%').parse::<f64>().ok());
    doc.descendants()
        .filter(|n| n.has_tag_name("g"))
        .filter_map(|g| {
            let title = g.children().find(|c| c.has_tag_name("title"))?.text()?;
            let rect = g.children().find(|c| c.has_tag_name("rect"))?;
            let name = title.rsplit_once(" (").map_or(title, |(n, _)| n).to_string();
            Some(Frame {
                name,
                x: pct(rect.attribute("x"))?,
                width: pct(rect.attribute("width"))?,
                y: rect.attribute("y")?.parse().ok()?,
            })
        })
        .collect()
}

/// An SVG document parsed as XML (inferno's carry a DOCTYPE).
fn xml(text: &str) -> roxmltree::Document<'_> {
    let opts = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
    roxmltree::Document::parse_with_options(text, opts)
        .unwrap_or_else(|e| panic!("not XML: {e}\n{text}"))
}

/// The caller of `f`: the frame right below it (inferno draws roots at the bottom) whose
/// box spans it.
fn parent<'a>(all: &'a [Frame], f: &Frame) -> Option<&'a Frame> {
    all.iter()
        .filter(|p| p.y > f.y && p.x <= f.x + 1e-6 && p.x + p.width >= f.x + f.width - 1e-6)
        .min_by(|a, b| a.y.total_cmp(&b.y))
}

/// The call paths (root first) ending in a frame named `leaf`.
fn paths_to(svg: &str, leaf: &str) -> Vec<Vec<String>> {
    let all = frames(svg);
    all.iter()
        .filter(|f| f.name == leaf)
        .map(|f| {
            let mut path = vec![f.name.clone()];
            let mut at = f;
            while let Some(p) = parent(&all, at) {
                path.push(p.name.clone());
                at = p;
            }
            path.reverse();
            path
        })
        .collect()
}

fn has_path(paths: &[Vec<String>], want: &[&str]) -> bool {
    paths.iter().any(|p| p.windows(want.len()).any(|w| w == want))
}

fn read(d: &Daemon, rel: &str) -> Option<String> {
    std::fs::read_to_string(d.mnt.join(".optbin").join(rel)).ok()
}

/// Runs `prog` through the mount until `ok` holds of `.optbin/REL`; panics after `secs`.
fn run_until(d: &Daemon, prog: &Path, rel: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(text) = read(d, rel).filter(|t| ok(t)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{rel} never became what the test waits for; now:\n{}\nlog:\n{}",
            read(d, rel).unwrap_or_default().chars().take(3000).collect::<String>(),
            common::daemon::tail(&d.log(), 30)
        );
        run(prog);
    }
}

/// Busy threads until dropped (a CPU-burning workload of 3 threads per CPU).
struct Burner {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Burner {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..cpus * 3)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 1u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Opens `page` in headless Chromium: (screenshot PNG path, DOM text).
fn chromium(page: &Path, work: &Path) -> (PathBuf, String) {
    let shot = work.join("report.png");
    let url = format!("file://{}", page.display());
    let out = Command::new("chromium")
        .args(CHROMIUM_FLAGS)
        .arg(format!("--user-data-dir={}", work.join("profile-shot").display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1400,2400")
        .arg(&url)
        .output()
        .expect("running chromium (mount/deps.sh installs it)");
    assert!(shot.exists(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
    let dom = Command::new("chromium")
        .args(CHROMIUM_FLAGS)
        .arg(format!("--user-data-dir={}", work.join("profile-dom").display()))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    (shot, String::from_utf8_lossy(&dom.stdout).into_owned())
}

/// (share of pixels that are not the page's white, distinct colours) of a PNG.
fn ink(png_path: &Path) -> (f64, usize) {
    let decoder =
        png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png_path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let pixels = &buf[..info.buffer_size()];
    let mut colours = std::collections::HashSet::new();
    let mut inked = 0usize;
    let mut total = 0usize;
    for px in pixels.chunks(channels) {
        total += 1;
        let rgb = (px[0], px[1.min(channels - 1)], px[2.min(channels - 1)]);
        colours.insert(rgb);
        if rgb != (255, 255, 255) {
            inked += 1;
        }
    }
    (inked as f64 / total.max(1) as f64, colours.len())
}

/// The longest horizontal run of coloured (not grey or white) pixels in any row of a PNG:
/// the width the flame graph was drawn at (its frames and its yellow background are the
/// only wide coloured area of the page).
fn widest_coloured_run(png_path: &Path) -> usize {
    let decoder =
        png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png_path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let row_bytes = info.width as usize * channels;
    let mut widest = 0;
    for row in buf[..info.buffer_size()].chunks(row_bytes) {
        let mut run = 0;
        for px in row.chunks(channels) {
            let coloured = channels >= 3 && !(px[0] == px[1] && px[1] == px[2]);
            run = if coloured { run + 1 } else { 0 };
            widest = widest.max(run);
        }
    }
    widest
}

#[test]
fn pictures_host_summary_metrics_and_report_on_a_real_mount() {
    let (_tmp, root, bin) = common::open_test_root();
    let prog = bin.join("fp");
    common::cc(PROGRAM, &prog, &["-fno-omit-frame-pointer", "-fPIE", "-pie", "-Wl,--emit-relocs"]);
    let port = free_port();
    std::fs::write(root.join("config.toml"), config(&root.join("scratch"), port)).unwrap();
    let d = Daemon::start(
        &root.join("mnt"),
        &[&bin],
        &root.join("state"),
        Some(&root.join("config.toml")),
    );
    let served = d.bin().join("fp");

    // Flame graphs: the binary's and the machine's hold both call paths, by name.
    let both = |svg: &str| {
        let paths = paths_to(svg, "hot");
        has_path(&paths, &["main", "caller_a", "hot"])
            && has_path(&paths, &["main", "caller_b", "hot"])
    };
    let flame = run_until(&d, &served, "bins/fp/flame.svg", 180, both);
    assert!(flame.contains("frame pointers"), "the title says how stacks were unwound");
    // The machine's graph: inferno's `all`, then the program's name, then its stack.
    let machine = run_until(&d, &served, "flame.svg", 60, |svg| {
        both(svg)
            && paths_to(svg, "caller_a").iter().any(|p| p.get(1).map(String::as_str) == Some("fp"))
    });
    assert!(machine.contains("CPU of the whole machine"));

    // The heat map shows the hot function's pages; status.json carries its figure.
    let heat =
        run_until(&d, &served, "bins/fp/heatmap.svg", 60, |svg| svg.contains("hottest: hot"));
    xml(&heat);
    let fig = d.wait_for(Duration::from_secs(30), "heat figures in status.json", |d| {
        d.binary(&prog).and_then(|b| b["details"]["observe"].as_object().cloned())
    });
    let original_pages = fig["original_hot_pages"].as_u64().unwrap();
    assert!(original_pages >= 1, "{fig:?}");

    // The USE summary: values within bounds, and a CPU-burning workload shows as CPU
    // saturation with a hint.
    let use_json: Value = serde_json::from_str(&read(&d, "host/use.json").unwrap()).unwrap();
    for r in use_json["resources"].as_array().unwrap() {
        if let Some(u) = r["utilization"].as_f64() {
            assert!((0.0..=1.0).contains(&u), "{r}");
        }
        if let Some(s) = r["saturation"].as_f64() {
            assert!(s >= 0.0, "{r}");
        }
    }
    let names: Vec<&str> = use_json["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["resource"].as_str())
        .collect();
    for want in ["cpu", "memory", "tasks", "files"] {
        assert!(names.contains(&want), "{names:?}");
    }
    let burner = Burner::start();
    let saturated = d.wait_for(Duration::from_secs(60), "CPU saturation in host/use.json", |d| {
        let v: Value = serde_json::from_str(&read(d, "host/use.json")?).ok()?;
        let cpu = v["resources"].as_array()?.iter().find(|r| r["resource"] == "cpu")?.clone();
        (cpu["saturation"].as_f64()? > 0.10 && cpu["hint"].is_string()).then_some(cpu)
    });
    drop(burner);
    assert!(saturated["hint"].as_str().unwrap().contains("flame.svg"), "{saturated}");
    let use_text = read(&d, "host/use").unwrap();
    assert!(use_text.contains("hint: CPU saturated"), "{use_text}");

    // Metrics: the endpoint and the file parse as Prometheus text.
    let curl = Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    assert!(curl.status.success(), "curl: {curl:?}");
    let body = String::from_utf8(curl.stdout).unwrap();
    for text in [body.as_str(), read(&d, "metrics").unwrap().as_str()] {
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let samples =
            scrape.samples.iter().find(|s| s.metric == "optbin_profiler_samples_total").map(|s| {
                match s.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                    _ => 0.0,
                }
            });
        assert!(samples.is_some_and(|v| v > 0.0), "{text}");
        assert!(
            scrape.samples.iter().any(|s| s.metric == "optbin_host_utilization_ratio"),
            "{text}"
        );
    }
    let not_found = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://127.0.0.1:{port}/")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&not_found.stdout), "404");

    // The daemon's own BOLT variant, served to every exec: the variant's hot code takes no
    // more pages than the original's.
    d.wait_for(Duration::from_secs(240), "a BOLT variant", |d| {
        run(&served);
        let b = d.binary(&prog)?;
        b["variants"].as_array()?.iter().any(|v| v["kind"] == "bolt").then_some(())
    });
    d.control("pin fp bolted").unwrap();
    let fig = d.wait_for(Duration::from_secs(120), "the variant's heat figure", |d| {
        run(&served);
        let f = d.binary(&prog)?["details"]["observe"].clone();
        (f["variant_samples"].as_u64()? >= 300).then_some(f)
    });
    let (orig, var) =
        (fig["original_hot_pages"].as_u64().unwrap(), fig["variant_hot_pages"].as_u64().unwrap());
    println!("hot pages (90% of samples): original {orig}, variant {var}: {fig}");
    assert!(var <= orig, "{fig}");
    let heat = read(&d, "bins/fp/heatmap.svg").unwrap();
    assert!(heat.contains("variant "), "both sides drawn");
    let diff = read(&d, "bins/fp/flame-diff.svg").unwrap();
    xml(&diff);
    // A real differential graph of the variant against the original: both arms had samples,
    // and the variant's stacks are drawn with the call paths the original's had.
    assert!(!diff.contains("needs samples"), "{diff}");
    for path in ["caller_a", "caller_b", "hot"] {
        assert!(diff.contains(path), "{path} missing from the differential graph");
    }

    // The report in a real browser: a non-blank page whose DOM holds the flame graph and
    // the tables.
    let page = root.join("report.html");
    std::fs::write(&page, read(&d, "report.html").unwrap()).unwrap();
    let (shot, dom) = chromium(&page, &root);
    // `OPTBIN_SAVE_SCREENSHOT=docs/observe-report.png` refreshes the documentation's picture.
    if let Ok(keep) = std::env::var("OPTBIN_SAVE_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    let (share, colours) = ink(&shot);
    println!("screenshot: {:.1}% of pixels inked, {colours} colours", share * 100.0);
    assert!(share > 0.05 && colours > 20, "a blank render? {share} {colours}");
    // Drawn at its full width in a 1400-pixel window, not squashed into a narrow column.
    let flame_width = widest_coloured_run(&shot);
    assert!(flame_width >= 1000, "the flame graph is drawn {flame_width} pixels wide");
    assert!(dom.contains("id=\"flame\"") && dom.contains("caller_a"), "flame graph in the DOM");
    assert!(
        dom.contains("id=\"status\"") && dom.contains(&prog.display().to_string()),
        "status table"
    );
    assert!(dom.contains("id=\"use\""), "USE table");

    // `optbin use`: now, and the history the daemon recorded.
    let now = Command::new(OPTBIN).arg("use").output().unwrap();
    let now_text = String::from_utf8_lossy(&now.stdout);
    assert!(
        now.status.success() && now_text.contains("RESOURCE") && now_text.contains("cpu"),
        "{now:?}"
    );
    let past = Command::new(OPTBIN)
        .args(["use", "--since", "1h", "--state-dir"])
        .arg(&d.state)
        .output()
        .unwrap();
    let past_text = String::from_utf8_lossy(&past.stdout);
    assert!(
        past.status.success() && past_text.contains("summaries") && past_text.contains("cpu"),
        "{past:?}"
    );
    assert!(!past_text.starts_with("no USE history"), "{past_text}");
}
