//! Fleet benchmarks against a real `redis-server` on loopback, figures printed:
//!
//! 1. `first_run_to_built_variant_with_and_without_the_fleet`: two real daemons. Machine A
//!    learns alone (its fleet holds nothing but itself): time from its first run of a
//!    program to a built variant. Machine B then runs the same bytes once: time from that
//!    run to its built variant, from the fleet's profile. Printed side by side with the
//!    ratio.
//! 2. `many_machines_push_and_pull_profiles`: N simulated machines (async clients in one
//!    process, no mounts, each with its own connection) push contributions for M binaries
//!    through the real store code: pushes per second, wire bytes per push (Redis's own
//!    network counters), Redis memory per binary identity, and pull + parse + merge time of
//!    one identity with N contributions (median and range of several).
//!
//! A program (`harness = false`). `OPTBIN_BENCH_QUICK=1` (the smoke mode of run-tests.sh): 100 machines x 40 binaries and
//! small maturity thresholds; unset: 500 x 200.

#[path = "common/bench.rs"]
mod bench;
#[path = "common/branchy.rs"]
mod branchy;
#[path = "common/mod.rs"]
mod common;
#[path = "fleet_support.rs"]
mod fleet_support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, catalog_read_only};
use fleet_support::{ADMIN_PASSWORD, Redis, credentials, writer_acl};
use optbin::fleet::format::{Contribution, Source, VERSION};
use optbin::fleet::merge::merge;
use optbin::fleet::redis_store::RedisStore;
use optbin::fleet::settings::Credentials;
use optbin::fleet::store::{FleetStore, Push, PushKind, Ttl};
use optbin::identity::ContentId;

use bench::quick;

fn main() {
    bench::run("bench_fleet", || {
        many_machines_push_and_pull_profiles();
        first_run_to_built_variant_with_and_without_the_fleet();
    });
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn info_number(redis: &Redis, section: &str, field: &str) -> u64 {
    let text = redis.cli(&["INFO", section]);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO {section}: {text}"))
}

/// A realistic contribution: `functions` functions with a few offsets each, Zipf-like counts.
fn contribution(machine: &str, content: &ContentId, functions: usize, seed: u64) -> Contribution {
    let mut entries = Vec::new();
    let mut total = 0;
    for f in 0..functions {
        for off in 0..4u64 {
            let n = (100_000 / (f as u64 + 1)) / (off + 1) + (seed % 7);
            total += n;
            entries.push((format!("_ZN4core3fmt9function_{f}17h0123456789abcdefE"), off * 16, n));
        }
    }
    Contribution {
        v: VERSION,
        machine: machine.into(),
        content: content.hex(),
        build_id: Some("0123456789abcdef0123456789abcdef01234567".into()),
        source: Source::Samples,
        event: Some("cpu-clock".into()),
        samples: total,
        outside: total / 10,
        runs: 12,
        stability: Some(0.9),
        updated_at: 1_764_640_000,
        windows: (0..12).map(|w| (1_764_640_000 + w * 600, total / 12)).collect(),
        functions: entries,
        edges: vec![],
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn many_machines_push_and_pull_profiles() {
    let (machines, binaries, functions) = if quick() { (100, 40, 150) } else { (500, 200, 150) };
    let tmp = tempfile::tempdir().unwrap();
    let redis = Redis::start(&tmp.path().join("redis"), "maxclients 2000");
    let url = vec![redis.url()];
    let creds = Credentials { username: Some("admin".into()), password: ADMIN_PASSWORD.into() };
    let rt = rt();
    let contents: Vec<ContentId> =
        (0..binaries).map(|b| ContentId::of_bytes(format!("binary {b}").as_bytes())).collect();
    // Values prepared up front: the benchmark measures Redis and the store, not JSON.
    let batches: Vec<(String, Vec<Push>)> = (0..machines)
        .map(|m| {
            let id = format!("machine-{m:04}");
            let pushes = contents
                .iter()
                .map(|c| Push {
                    content: *c,
                    kind: PushKind::Profile,
                    bytes: contribution(&id, c, functions, m as u64).encode(1 << 20),
                })
                .collect();
            (id, pushes)
        })
        .collect();
    let value_bytes: usize = batches[0].1.iter().map(|p| p.bytes.len()).sum::<usize>() / binaries;
    let stores: Vec<Arc<RedisStore>> = (0..machines)
        .map(|_| Arc::new(RedisStore::new(&url, Some(&creds), Duration::from_secs(30)).unwrap()))
        .collect();
    let ttl = Ttl { profile_secs: 86_400, verdict_secs: 86_400, now: 1_764_640_000 };
    let mem_before = info_number(&redis, "memory", "used_memory");
    let net_before = info_number(&redis, "stats", "total_net_input_bytes");
    let started = Instant::now();
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for ((id, pushes), store) in batches.into_iter().zip(&stores) {
            let store = store.clone();
            set.spawn(async move { store.push(&id, &pushes, &ttl).await });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().expect("a push");
        }
    });
    let push_secs = started.elapsed().as_secs_f64();
    let pushes = machines * binaries;
    let wire = info_number(&redis, "stats", "total_net_input_bytes") - net_before;
    let mem = info_number(&redis, "memory", "used_memory") - mem_before;

    // Pull + parse + merge of one identity with every machine's contribution.
    let reader = &stores[0];
    let mut pull_ms = Vec::new();
    let mut merge_ms = Vec::new();
    for c in contents.iter().take(9) {
        let t = Instant::now();
        let raw = rt.block_on(reader.pull(&[*c], machines, 1 << 20)).unwrap();
        let pulled = t.elapsed();
        let parsed: Vec<Contribution> = raw[0]
            .profiles
            .iter()
            .map(|(m, b)| Contribution::parse(b, c, m, 1 << 20).unwrap())
            .collect();
        let merged = merge(&parsed, 0.5).unwrap();
        assert_eq!(merged.machines.len(), machines);
        merge_ms.push((t.elapsed() - pulled).as_secs_f64() * 1000.0);
        pull_ms.push(pulled.as_secs_f64() * 1000.0);
    }
    let range = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::MAX, f64::min);
        let hi = v.iter().cloned().fold(0.0, f64::max);
        format!("{lo:.1}..{hi:.1}")
    };
    println!(
        "fleet bench: {machines} machines x {binaries} binaries, {functions} functions x 4 offsets per contribution"
    );
    println!(
        "  pushes: {pushes} in {push_secs:.2} s = {:.0} pushes/s ({} concurrent clients)",
        pushes as f64 / push_secs,
        machines
    );
    println!(
        "  bytes per push: value {value_bytes} B, on the wire {} B (Redis total_net_input_bytes / pushes)",
        wire / pushes as u64
    );
    println!(
        "  Redis memory: {} KiB per binary identity ({} machines each), {:.1} MiB in all",
        mem / binaries as u64 / 1024,
        machines,
        mem as f64 / (1 << 20) as f64
    );
    let (mut p, mut m) = (pull_ms.clone(), merge_ms.clone());
    println!(
        "  one identity, {machines} contributions: pull median {:.1} ms ({} ms), parse + merge median {:.1} ms ({} ms), 9 identities",
        median(&mut p),
        range(&pull_ms),
        median(&mut m),
        range(&merge_ms)
    );
    assert!(wire >= (value_bytes * pushes) as u64, "the values went over the wire");
}

fn bench_config(
    dir: &Path,
    redis: &Redis,
    machine: &str,
    secret: &Path,
    min_samples: u64,
) -> String {
    format!(
        r#"[profile]
frequency_hz = 999
flush_secs = 1
window_secs = 2
identify_after_samples = 20
min_samples = {min_samples}
min_runs = 2
min_stability = 0.5

[optimizer]
scratch_dir = {scratch:?}
min_text_bytes = 1024
check_interval_secs = 1
timeout_secs = 120

[fleet]
url = "{url}"
credentials = {secret:?}
machine_id = "{machine}"
interval_secs = 1
"#,
        scratch = dir.join("scratch").display().to_string(),
        url = redis.url(),
        secret = secret.display().to_string(),
    )
}

fn built(d: &Daemon) -> bool {
    let c = catalog_read_only(&d.state);
    c.query_row("SELECT count(*) FROM variants WHERE kind = 'bolt'", [], |r| r.get::<_, i64>(0))
        .unwrap()
        > 0
}

fn first_run_to_built_variant_with_and_without_the_fleet() {
    let min_samples = if quick() { 1500 } else { 20_000 };
    let tmp = common::open_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let acl = format!("{}\n{}", writer_acl("m-a", "pw-m-a"), writer_acl("m-b", "pw-m-b"));
    let redis = Redis::start(&root.join("redis"), &acl);
    let prog = root.join("prog");
    common::cc(branchy::PROGRAM, &prog, &["-fPIE", "-pie", "-Wl,--emit-relocs"]);
    let start = |id: &str| {
        let dir = root.join(id);
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy(&prog, bin.join("prog")).unwrap();
        let secret = credentials(&dir, id, &format!("pw-{id}"));
        let cfg = dir.join("config.toml");
        std::fs::write(&cfg, bench_config(&dir, &redis, id, &secret, min_samples)).unwrap();
        Daemon::start(&dir.join("mnt"), &[&bin], &dir.join("state"), Some(&cfg))
    };
    let run = |d: &Daemon| {
        let out = Command::new(d.bin().join("prog")).arg("10000000").output().unwrap();
        assert!(out.status.success());
    };
    let a = start("m-a");
    let t = Instant::now();
    let mut runs_a = 0;
    while !built(&a) {
        run(&a);
        runs_a += 1;
        assert!(t.elapsed() < Duration::from_secs(600), "A never built");
    }
    let alone = t.elapsed().as_secs_f64();
    let b = start("m-b");
    let t = Instant::now();
    run(&b);
    b.wait_for(Duration::from_secs(120), "B's build", |d| built(d).then_some(()));
    let with_fleet = t.elapsed().as_secs_f64();
    println!(
        "first run to built variant (maturity at {min_samples} samples, 999 Hz, ~0.1 s per run): \
         alone {alone:.1} s ({runs_a} runs), with the fleet {with_fleet:.1} s (1 run): ratio {:.3}",
        with_fleet / alone
    );
}
