//! The fleet's Redis side against real `redis-server` processes (no mounts): the ACL rules
//! of docs/fleet.md enforced by Redis itself, a 3-node Redis Cluster on loopback carrying
//! the same sharing, and `optbin fleet status|list|profile` against it.

#[path = "fleet_support.rs"]
mod fleet_support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fleet_support::{Cluster, Redis, TestCa, credentials, reader_acl, writer_acl};
use optbin::catalog::profiles::WindowBatch;
use optbin::catalog::{Catalog, base, profiles};
use optbin::clock::SystemClock;
use optbin::elf::ElfFacts;
use optbin::fleet::FleetView;
use optbin::fleet::format::{Contribution, Source, VERSION};
use optbin::fleet::redis_store::RedisStore;
use optbin::fleet::settings::{Credentials, FleetSettings};
use optbin::fleet::store::{FleetStore, Push, PushKind, Ttl};
use optbin::fleet::task::FleetTask;
use optbin::identity::{ContentId, FileKey};

const BINARY: &[u8] = b"bytes every machine runs";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn creds(user: &str, password: &str) -> Credentials {
    Credentials { username: Some(user.into()), password: password.into() }
}

fn store(urls: &[String], user: &str, password: &str) -> RedisStore {
    RedisStore::new(urls, Some(&creds(user, password)), Duration::from_secs(2)).unwrap()
}

fn contribution(machine: &str) -> Vec<u8> {
    let c = ContentId::of_bytes(BINARY);
    Contribution {
        v: VERSION,
        machine: machine.into(),
        content: c.hex(),
        build_id: None,
        source: Source::Samples,
        event: Some("cpu-clock".into()),
        samples: 10,
        outside: 0,
        runs: 1,
        stability: None,
        updated_at: 1,
        windows: vec![(0, 10)],
        functions: vec![("main".into(), 0, 10)],
        edges: vec![],
    }
    .encode(1 << 20)
}

fn push(machine: &str) -> Vec<Push> {
    vec![Push {
        content: ContentId::of_bytes(BINARY),
        kind: PushKind::Profile,
        bytes: contribution(machine),
    }]
}

const TTL: Ttl = Ttl { profile_secs: 600, verdict_secs: 600, now: 1 };

#[test]
fn redis_acls_refuse_a_readers_write_and_a_write_to_another_machines_key() {
    let tmp = tempfile::tempdir().unwrap();
    let acl = format!("{}\n{}", writer_acl("m-a", "pw-a"), reader_acl("r-1", "pw-r"));
    let redis = Redis::start(&tmp.path().join("redis"), &acl);
    let urls = vec![redis.url()];
    let rt = rt();
    let writer = store(&urls, "m-a", "pw-a");
    rt.block_on(writer.push("m-a", &push("m-a"), &TTL)).expect("a writer writes its own keys");
    let err = rt.block_on(writer.push("m-b", &push("m-b"), &TTL)).unwrap_err();
    assert!(format!("{err:#}").to_lowercase().contains("noperm"), "{err:#}");
    let reader = store(&urls, "r-1", "pw-r");
    let err = rt.block_on(reader.push("r-1", &push("r-1"), &TTL)).unwrap_err();
    assert!(format!("{err:#}").to_lowercase().contains("noperm"), "{err:#}");
    let pulled = rt.block_on(reader.pull(&[ContentId::of_bytes(BINARY)], 10, 1 << 20)).unwrap();
    assert_eq!(pulled[0].profiles, vec![("m-a".to_string(), contribution("m-a"))]);
    let wrong = store(&urls, "m-a", "not-the-password");
    let err = rt.block_on(wrong.pull(&[ContentId::of_bytes(BINARY)], 10, 1 << 20)).unwrap_err();
    assert!(!format!("{err:#}").contains("not-the-password"), "{err:#}");
    let anonymous = RedisStore::new(&urls, None, Duration::from_secs(2)).unwrap();
    assert!(rt.block_on(anonymous.identities(10)).is_err(), "the default user is off");
    assert_eq!(
        redis
            .cli(&[
                "EXISTS",
                &format!("optbin:v1:{{{}}}:profile:m-b", ContentId::of_bytes(BINARY).hex())
            ])
            .trim(),
        "0"
    );
}

#[test]
fn rediss_urls_speak_tls_and_check_the_servers_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let ca = TestCa::create(&root.join("ca"));
    let redis = Redis::start_tls(&root.join("redis"), &writer_acl("m-a", "pw-a"), &ca);
    let url = redis.url();
    assert!(url.starts_with("rediss://"), "{url}");
    let secret = credentials(root, "m-a", "pw-a");
    let fleet = |ca_file: Option<&Path>| {
        let ca_line =
            ca_file.map_or(String::new(), |p| format!("ca_file = {:?}\n", p.display().to_string()));
        format!(
            "url = {url:?}\nmachine_id = \"m-a\"\ncredentials = {:?}\ntimeout_ms = 2000\n{ca_line}",
            secret.display().to_string()
        )
    };
    let rt = rt();

    // With the private CA: a round trip through TLS.
    let settings: FleetSettings = toml::from_str(&fleet(Some(&ca.ca_pem))).unwrap();
    let tls = RedisStore::from_settings(&settings.resolve().unwrap()).unwrap();
    rt.block_on(tls.push("m-a", &push("m-a"), &TTL)).expect("a push over TLS");
    let pulled = rt.block_on(tls.pull(&[ContentId::of_bytes(BINARY)], 10, 1 << 20)).unwrap();
    assert_eq!(pulled[0].profiles, vec![("m-a".to_string(), contribution("m-a"))]);

    // Without it, the server's certificate is not trusted (the system's roots do not hold
    // the test CA): the connection is refused, not made without checking.
    let settings: FleetSettings = toml::from_str(&fleet(None)).unwrap();
    let untrusting = RedisStore::from_settings(&settings.resolve().unwrap()).unwrap();
    let err = rt.block_on(untrusting.identities(10)).unwrap_err();
    assert!(format!("{err:#}").to_lowercase().contains("certificate"), "{err:#}");

    // Plain text to the TLS port gets no answer.
    let plain = store(&[url.replacen("rediss://", "redis://", 1)], "m-a", "pw-a");
    assert!(rt.block_on(plain.identities(10)).is_err());

    // The command line with the CA in the config file.
    let cfg = root.join("config.toml");
    std::fs::write(&cfg, format!("[fleet]\n{}", fleet(Some(&ca.ca_pem)))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_optbin"))
        .args(["fleet", "status", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("reachable: yes"), "{out:?}");
}

/// A machine's catalog holding the binary at a path and `windows` windows of samples.
fn catalog(dir: &Path, windows: i64, per_window: u64) -> Catalog {
    let path = dir.join("tool");
    std::fs::write(&path, BINARY).unwrap();
    let key = FileKey::of(&path).unwrap();
    let text = path.to_string_lossy().into_owned();
    let catalog = Catalog::in_memory().unwrap();
    catalog
        .run_blocking(move |c| {
            let id =
                base::upsert_binary(c, &ContentId::of_bytes(BINARY), 24, &ElfFacts::default(), 1)?;
            base::upsert_path(c, &text, Some(id), &key, 1)?;
            for w in 0..windows {
                let batch = WindowBatch {
                    samples: vec![("hot".into(), 0x10, per_window)],
                    own_samples: per_window,
                    new_runs: 1,
                    ..Default::default()
                };
                profiles::add_window(c, id, w * 600, "cpu-clock", &batch, 1)?;
            }
            Ok(id)
        })
        .unwrap();
    catalog
}

/// The `[fleet]` section's body for `machine` (with `ca_file` when the servers speak TLS).
fn fleet_toml(urls: &[String], machine: &str, secret: &Path, ca: Option<&TestCa>) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    let ca_line =
        ca.map_or(String::new(), |ca| format!("ca_file = {:?}\n", ca.ca_pem.display().to_string()));
    format!(
        "url = [{}]\nmachine_id = \"{machine}\"\ncredentials = {:?}\n{ca_line}",
        urls.join(", "),
        secret.display().to_string()
    )
}

fn settings(urls: &[String], machine: &str, secret: &Path, ca: Option<&TestCa>) -> FleetSettings {
    toml::from_str(&fleet_toml(urls, machine, secret, ca)).unwrap()
}

#[test]
fn a_three_node_cluster_shares_profiles_like_one_server() {
    cluster_shares_profiles_like_one_server(false);
}

#[test]
fn a_tls_cluster_with_a_private_ca_shares_profiles_like_one_server() {
    cluster_shares_profiles_like_one_server(true);
}

fn cluster_shares_profiles_like_one_server(tls: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let acl = format!("{}\n{}", writer_acl("m-a", "pw-m-a"), writer_acl("m-b", "pw-m-b"));
    let ca = tls.then(|| TestCa::create(&root.join("ca")));
    let cluster = match &ca {
        Some(ca) => Cluster::start_tls(&root.join("cluster"), &acl, ca),
        None => Cluster::start(&root.join("cluster"), &acl),
    };
    let urls = cluster.urls();
    assert_eq!(urls.iter().all(|u| u.starts_with("rediss://")), tls, "{urls:?}");
    let rt = rt();
    let mut views = Vec::new();
    for (machine, windows, per_window) in [("m-a", 4, 5_000), ("m-b", 1, 200)] {
        let dir = root.join(machine);
        std::fs::create_dir_all(&dir).unwrap();
        let secret = credentials(&dir, machine, &format!("pw-{machine}"));
        let resolved = settings(&urls, machine, &secret, ca.as_ref()).resolve().unwrap();
        let store = Arc::new(RedisStore::from_settings(&resolved).unwrap());
        let view = Arc::new(FleetView::new(machine.into(), true, 2));
        let mut task = FleetTask::new(
            store,
            resolved,
            catalog(&dir, windows, per_window),
            view.clone(),
            Arc::new(SystemClock),
            None,
        );
        rt.block_on(task.round()).expect("a round against the cluster");
        views.push((view, task));
    }
    // m-a pulls again and sees both.
    rt.block_on(views[0].1.round()).unwrap();
    for (view, _) in &views {
        let merged = view.identity(&ContentId::of_bytes(BINARY).hex()).unwrap().merged.unwrap();
        assert_eq!(merged.machines.len(), 2, "{merged:?}");
        assert_eq!(merged.samples, 20_200);
    }

    // The command line against the cluster.
    let dir = root.join("m-a");
    let cfg = dir.join("config.toml");
    let section = fleet_toml(&urls, "m-a", &dir.join("m-a.secret"), ca.as_ref());
    std::fs::write(&cfg, format!("[fleet]\n{section}")).unwrap();
    let optbin = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_optbin"))
            .arg("fleet")
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "optbin fleet {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let status = optbin(&["status"]);
    println!("{status}");
    assert!(status.contains("machine: m-a (read-write)"), "{status}");
    assert!(status.contains("(cluster)") && status.contains("reachable: yes"), "{status}");
    assert!(status.contains("binaries known to the fleet: 1"), "{status}");
    let list = optbin(&["list"]);
    println!("{list}");
    let hex = ContentId::of_bytes(BINARY).hex();
    let row = list.lines().find(|l| l.starts_with(&hex[..16])).expect(&list);
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[1..5], &["2", "20,200", "5", "samples"], "{row}");
    let profile = optbin(&["profile", dir.join("tool").to_str().unwrap()]);
    assert_eq!(profile, "no_lbr cpu-clock:\n1 hot 10 20200\n");
}
