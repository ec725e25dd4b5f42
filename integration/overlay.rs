//! Real-mount tests of the overlay: programs compiled here are run through the mount and
//! must behave exactly as the originals; variants switch without disturbing running
//! processes; upgrades underneath are seen; the supervised mount survives its server being
//! killed. Every mount is at a fresh temp dir and is gone at the end of each test.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use optbin::fs::{FsEvent, Overlay, OverlayConfig, ServedVariant, ServingTable, StaticControl};
use optbin::fuse::{MountOptions, mount_background};
use optbin::identity::FileKey;

struct Fixture {
    tmp: tempfile::TempDir,
    one: PathBuf,
    two: PathBuf,
    mount: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = open_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let one = root.join("one/bin");
    let two = root.join("two/bin");
    for d in [&one, &two, &root.join("one/share/optbin-test")] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(root.join("one/share/optbin-test/data.txt"), "exe-relative data\n").unwrap();
    prog(&one.join("prog"), "one", &["-pie", "-fPIE"]);
    prog(&one.join("prog_nopie"), "nopie", &["-no-pie"]);
    prog(&two.join("prog"), "two", &[]);
    prog(&two.join("only2"), "only2", &[]);
    cc(DATA_C, &one.join("data"), &[]);
    cc(MULTI_C, &one.join("multi"), &[]);
    std::os::unix::fs::symlink("multi", one.join("alias")).unwrap();
    std::os::unix::fs::symlink(one.join("prog"), one.join("abslink")).unwrap();
    prog(&one.join("stripped"), "stripped", &["-s"]);
    cc(EUID_C, &one.join("suid"), &[]);
    cc(EUID_C, &one.join("withcap"), &[]);
    let setcap = run(Command::new("setcap").arg("cap_net_raw+ep").arg(one.join("withcap")));
    assert_eq!(setcap.code, Some(0), "setcap: {}", setcap.stderr);
    std::fs::set_permissions(one.join("suid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::write(one.join("script"), "#!/bin/sh\necho script \"$@\"\nexit 3\n").unwrap();
    std::fs::set_permissions(one.join("script"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mount = root.join("mnt");
    Fixture { tmp, one, two, mount }
}

fn mount(
    f: &Fixture,
    serving: Arc<ServingTable>,
) -> (optbin::fuse::MountGuard, std::sync::mpsc::Receiver<FsEvent>, Arc<StaticControl>) {
    mount_with(f, serving, true)
}

fn mount_with(
    f: &Fixture,
    serving: Arc<ServingTable>,
    passthrough: bool,
) -> (optbin::fuse::MountGuard, std::sync::mpsc::Receiver<FsEvent>, Arc<StaticControl>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let control =
        Arc::new(StaticControl::new(&[("status", "all good\n"), ("bins/prog/info", "x\n")]));
    let overlay = Overlay::new(
        OverlayConfig {
            mountpoint: f.mount.clone(),
            overlay_dirs: vec![f.one.clone(), f.two.clone()],
            originals: Some(f.tmp.path().join("originals")),
        },
        serving,
        None,
        control.clone(),
        Arc::new(tx),
    )
    .unwrap();
    let mut opts = MountOptions::new(&f.mount);
    opts.passthrough = passthrough;
    let guard = mount_background(overlay, &opts).expect("mount");
    (guard, rx, control)
}

fn same_run(original: &Path, through_mount: &Path, env: &[(&str, &str)]) -> Output {
    let mut a = Command::new(original);
    let mut b = Command::new(through_mount);
    for c in [&mut a, &mut b] {
        c.args(["x", "y z"]).envs(env.iter().copied());
    }
    let (a, b) = (run(&mut a), run(&mut b));
    assert_eq!(
        (&a.stdout, a.code),
        (&b.stdout, b.code),
        "{} vs {}",
        original.display(),
        through_mount.display()
    );
    b
}

#[test]
fn programs_behave_like_the_originals() {
    let f = fixture();
    let (guard, events, control) = mount(&f, ServingTable::new());
    let view = f.mount.join("bin");

    // Output and exit codes through the PATH view equal the originals'.
    let out = same_run(&f.one.join("prog"), &view.join("prog"), &[("CODE", "7")]);
    assert_eq!((out.stdout.as_str(), out.code), ("one x y z\n", Some(7)), "first match wins");
    same_run(&f.one.join("prog_nopie"), &view.join("prog_nopie"), &[]);
    same_run(&f.two.join("only2"), &view.join("only2"), &[("CODE", "1")]);
    let script = same_run(&f.one.join("script"), &view.join("script"), &[]);
    assert_eq!((script.stdout.as_str(), script.code), ("script x y z\n", Some(3)));
    same_run(&f.one.join("stripped"), &view.join("stripped"), &[]);
    let alias = same_run(&f.one.join("alias"), &in_mount(&f.mount, &f.one.join("alias")), &[]);
    assert_eq!(alias.stdout, "called as alias\n", "busybox-style argv[0] kept");
    assert_eq!(run(&mut Command::new(view.join("alias"))).stdout, "called as alias\n");
    same_run(&f.one.join("abslink"), &view.join("abslink"), &[]);

    // Served ELF files are read-only regular files with the original's mode, owner, times.
    for name in ["prog", "prog_nopie", "data", "multi"] {
        let real = std::fs::metadata(f.one.join(name)).unwrap();
        let served = std::fs::symlink_metadata(in_mount(&f.mount, &f.one.join(name))).unwrap();
        assert!(served.file_type().is_file(), "{name} served as a file");
        assert_eq!(served.mode() & 0o7777, real.mode() & 0o7555, "{name} mode");
        assert_eq!((served.uid(), served.gid()), (real.uid(), real.gid()));
        assert_eq!((served.mtime(), served.mtime_nsec()), (real.mtime(), real.mtime_nsec()));
        assert_eq!(served.len(), real.len());
        assert_eq!(
            std::fs::read(in_mount(&f.mount, &f.one.join(name))).unwrap(),
            std::fs::read(f.one.join(name)).unwrap()
        );
    }
    // Everything else is a symlink to the original.
    for name in ["stripped", "script", "suid", "withcap"] {
        let mirror = in_mount(&f.mount, &f.one.join(name));
        assert!(std::fs::symlink_metadata(&mirror).unwrap().file_type().is_symlink(), "{name}");
        assert_eq!(std::fs::read_link(&mirror).unwrap(), f.one.join(name));
    }
    assert_eq!(
        std::fs::read_link(in_mount(&f.mount, &f.one.join("alias"))).unwrap(),
        PathBuf::from("multi")
    );
    assert_eq!(
        std::fs::read_link(view.join("prog")).unwrap(),
        in_mount(&f.mount, &f.one.join("prog"))
    );

    // Resources relative to /proc/self/exe are found through the mirror's siblings.
    let data = run(&mut Command::new(view.join("data")));
    assert_eq!(
        (data.stdout.as_str(), data.code),
        ("exe-relative data\n", Some(0)),
        "{}",
        data.stderr
    );

    // setuid keeps working (as the original: it runs from the real path), as nobody.
    let orig = run(&mut as_nobody(&f.one.join("suid")));
    let through = run(&mut as_nobody(&view.join("suid")));
    assert_eq!(orig.stdout, "euid=0\n", "{}", orig.stderr);
    assert_eq!(through.stdout, orig.stdout);
    // A non-root user runs served binaries (allow_other + default_permissions).
    let nobody = run(as_nobody(&view.join("prog")).arg("n"));
    assert_eq!((nobody.stdout.as_str(), nobody.code), ("one n\n", Some(0)), "{}", nobody.stderr);

    // Read-only: writes, creates, unlinks, renames give EROFS.
    let served = in_mount(&f.mount, &f.one.join("prog"));
    let erofs = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
    assert_eq!(
        erofs(std::fs::OpenOptions::new().write(true).open(&served).map(drop)),
        Some(libc::EROFS)
    );
    assert_eq!(
        erofs(std::fs::write(in_mount(&f.mount, &f.one.join("new")), b"x")),
        Some(libc::EROFS)
    );
    assert_eq!(erofs(std::fs::remove_file(&served)), Some(libc::EROFS));
    assert_eq!(
        erofs(std::fs::rename(&served, in_mount(&f.mount, &f.one.join("p2")))),
        Some(libc::EROFS)
    );
    assert_eq!(erofs(std::fs::create_dir(view.join("d"))), Some(libc::EROFS));
    assert_eq!(
        erofs(std::fs::set_permissions(&served, std::fs::Permissions::from_mode(0o777))),
        Some(libc::EROFS)
    );

    // The control directory: files (nested too), reads, one command per write.
    let ctl = f.mount.join(".optbin");
    assert_eq!(std::fs::read_to_string(ctl.join("status")).unwrap(), "all good\n");
    assert_eq!(std::fs::read_to_string(ctl.join("bins/prog/info")).unwrap(), "x\n");
    std::fs::write(ctl.join("control"), "exclude prog\n").unwrap();
    let sh = run(Command::new("sh")
        .arg("-c")
        .arg(format!("echo 'pin x original' > {}", ctl.join("control").display())));
    assert_eq!(sh.code, Some(0), "{}", sh.stderr);
    assert_eq!(
        control.writes().iter().map(|w| w.1.clone()).collect::<Vec<_>>(),
        vec![b"exclude prog\n".to_vec(), b"pin x original\n".to_vec()]
    );
    let bad = std::fs::write(ctl.join("control"), " \n").unwrap_err();
    assert_eq!(bad.raw_os_error(), Some(libc::EINVAL));
    let denied = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c"])
        .arg(format!("echo x > {}", ctl.join("control").display())));
    assert_ne!(denied.code, Some(0), "nobody may not write control");
    assert_eq!(
        std::fs::write(ctl.join("status"), "x").unwrap_err().raw_os_error(),
        Some(libc::EACCES)
    );

    // Events: exec opens of served files are reported with exec=true, plain reads not.
    let events: Vec<FsEvent> = events.try_iter().collect();
    assert!(events.iter().any(|e| matches!(e, FsEvent::Opened { original, exec: true, variant_id: None, .. } if *original == f.one.join("prog"))));
    assert!(events.iter().any(|e| matches!(e, FsEvent::Opened { exec: false, .. })));
    assert!(events.iter().any(
        |e| matches!(e, FsEvent::Seen { original, .. } if *original == f.one.join("stripped"))
    ));
    assert!(!events.iter().any(
        |e| matches!(e, FsEvent::Opened { original, .. } if *original == f.one.join("stripped"))
    ));

    // A second mount at the same place is refused clearly.
    let again = optbin::fuse::prepare_mountpoint(&f.mount).unwrap_err();
    assert!(format!("{again:#}").contains("already served by a live optbin"), "{again:#}");

    drop(guard);
    assert!(!is_mounted(&f.mount), "mount left behind");
    drop(f.tmp);
}

#[test]
fn variant_switch_and_upgrade_underneath() {
    let f = fixture();
    let serving = ServingTable::new();
    let (guard, _events, _control) = mount(&f, serving.clone());
    let view = f.mount.join("bin");
    let original = f.one.join("prog");

    // A process started before the switch, held until the switch is done, then prints.
    let before = Held::spawn(Command::new(view.join("prog")).arg("before"));
    // What a profiler sees: /proc/PID/exe and the code mappings name the path in the mount
    // (the kernel maps the backing file but shows the user's path), and the inode of
    // /proc/PID/exe is the node id, which tells exactly which bytes the process runs.
    let exe = std::fs::read_link(format!("/proc/{}/exe", before.id())).unwrap();
    assert_eq!(exe, in_mount(&f.mount, &original));
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", before.id())).unwrap();
    let mapped: Vec<&str> = maps
        .lines()
        .filter(|l| l.contains("prog"))
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert!(!mapped.is_empty() && mapped.iter().all(|p| Path::new(p) == exe), "{mapped:?}");
    let exe_ino = std::fs::metadata(format!("/proc/{}/exe", before.id())).unwrap().ino();
    let running = guard.overlay().file_node(exe_ino).unwrap();
    assert_eq!((running.original.as_path(), running.variant.as_ref()), (original.as_path(), None));

    // Place a variant through the core's API (a program with other output as its bytes).
    let store = f.tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    prog(&store.join("variant-1"), "variant", &[]);
    let key = FileKey::of(&original).unwrap();
    let size = std::fs::metadata(store.join("variant-1")).unwrap().len();
    serving.serve(
        &original,
        Some(ServedVariant {
            variant_id: 1,
            path_in_store: store.join("variant-1"),
            size,
            expected_original: key,
        }),
    );
    let after = Held::spawn(Command::new(view.join("prog")).arg("after"));
    let variant_ino = std::fs::metadata(format!("/proc/{}/exe", after.id())).unwrap().ino();
    assert_eq!(
        guard.overlay().file_node(variant_ino).unwrap().variant.as_ref().map(|v| v.variant_id),
        Some(1)
    );
    assert_eq!(after.release().stdout, "variant after\n");
    assert_eq!(
        guard.overlay().original_of(&in_mount(&f.mount, &original), None).map(|m| m.variant),
        Some(Some(1))
    );
    let by_node = guard.overlay().original_of(&in_mount(&f.mount, &original), Some(variant_ino));
    assert_eq!(by_node.map(|m| (m.original, m.variant)), Some((original.clone(), Some(1))));
    assert_eq!(before.release().stdout, "one before\n", "the running process kept its bytes");

    // Back to the original.
    serving.serve(&original, None);
    assert_eq!(run(Command::new(view.join("prog")).arg("back")).stdout, "one back\n");
    serving.serve(
        &original,
        Some(ServedVariant {
            variant_id: 1,
            path_in_store: store.join("variant-1"),
            size,
            expected_original: key,
        }),
    );
    assert_eq!(run(Command::new(view.join("prog")).arg("again")).stdout, "variant again\n");

    // An upgrade underneath (rename over the original): the next exec sees the new
    // original, and the variant built from the old one is no longer served.
    let staged = f.one.join(".prog.new");
    prog(&staged, "upgraded", &[]);
    std::fs::rename(&staged, &original).unwrap();
    let start = Instant::now();
    let upgraded = run(Command::new(view.join("prog")).arg("now"));
    assert_eq!(upgraded.stdout, "upgraded now\n", "after {:?}", start.elapsed());

    // Exclusion: the binary reaches the user as a symlink and runs natively.
    serving.set_excluded(&original, true);
    let mirror = in_mount(&f.mount, &original);
    assert!(std::fs::symlink_metadata(&mirror).unwrap().file_type().is_symlink());
    assert_eq!(run(Command::new(view.join("prog")).arg("excluded")).stdout, "upgraded excluded\n");

    drop(guard);
    assert!(!is_mounted(&f.mount));
}

/// Several processes opening a served file for the first time at the same moment (a shell
/// script's parallel jobs, `make -j`): with FUSE passthrough each open carries a backing
/// id, and the kernel refuses with EIO an open whose backing differs from the one already
/// attached to the node by an open still in progress. They must all succeed.
#[test]
fn simultaneous_first_opens_of_a_served_file_all_succeed() {
    let f = fixture();
    const FILES: usize = 40;
    const OPENERS: usize = 6;
    let names: Vec<String> = (0..FILES).map(|i| format!("fresh{i}")).collect();
    for n in &names {
        std::fs::copy(f.one.join("prog"), f.one.join(n)).unwrap();
    }
    let (guard, _events, _control) = mount(&f, ServingTable::new());
    let mut failures = Vec::new();
    for n in &names {
        let path = in_mount(&f.mount, &f.one.join(n));
        let start = Arc::new(std::sync::Barrier::new(OPENERS));
        let opened = Arc::new(std::sync::Barrier::new(OPENERS));
        let threads: Vec<_> = (0..OPENERS)
            .map(|_| {
                let (path, start, opened) = (path.clone(), start.clone(), opened.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let file = std::fs::File::open(&path);
                    // Every opener holds its file until all have opened: the first one's
                    // backing stays attached while the others open.
                    opened.wait();
                    file.map(drop)
                })
            })
            .collect();
        for t in threads {
            if let Err(e) = t.join().unwrap() {
                failures.push(format!("{n}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} opens failed: {failures:?}",
        failures.len(),
        FILES * OPENERS
    );
    // And the files still run.
    same_run(&f.one.join("prog"), &in_mount(&f.mount, &f.one.join("fresh0")), &[]);
    drop(guard);
    assert!(!is_mounted(&f.mount));
}

#[test]
fn without_passthrough_optbin_serves_the_reads() {
    let f = fixture();
    let serving = ServingTable::new();
    let (guard, _events, _control) = mount_with(&f, serving.clone(), false);
    let view = f.mount.join("bin");
    same_run(&f.one.join("prog"), &view.join("prog"), &[("CODE", "4")]);
    same_run(&f.one.join("prog_nopie"), &view.join("prog_nopie"), &[]);
    assert_eq!(run(&mut Command::new(view.join("data"))).stdout, "exe-relative data\n");
    for name in ["prog", "prog_nopie", "data", "multi"] {
        let served = std::fs::read(in_mount(&f.mount, &f.one.join(name))).unwrap();
        assert_eq!(served, std::fs::read(f.one.join(name)).unwrap(), "{name}");
    }
    // A running process keeps reading its own bytes through its handle after a switch.
    let original = f.one.join("prog");
    let before = Held::spawn(Command::new(view.join("prog")).arg("before"));
    let store = f.tmp.path().join("variant");
    prog(&store, "variant", &[]);
    let size = std::fs::metadata(&store).unwrap().len();
    let key = FileKey::of(&original).unwrap();
    serving.serve(
        &original,
        Some(ServedVariant { variant_id: 3, path_in_store: store, size, expected_original: key }),
    );
    assert_eq!(run(Command::new(view.join("prog")).arg("after")).stdout, "variant after\n");
    assert_eq!(before.release().stdout, "one before\n");
    drop(guard);
    assert!(!is_mounted(&f.mount));
}

#[test]
fn a_real_toolchain_works_from_the_mount() {
    let sysroot = run(Command::new("rustc").args(["--print", "sysroot"])).stdout.trim().to_string();
    let toolchain_bin = Path::new(&sysroot).join("bin");
    let tmp = open_tempdir();
    let mount = tmp.path().canonicalize().unwrap().join("mnt");
    let overlay = Overlay::new(
        OverlayConfig {
            mountpoint: mount.clone(),
            overlay_dirs: vec![toolchain_bin.clone()],
            originals: None,
        },
        ServingTable::new(),
        None,
        Arc::new(StaticControl::default()),
        Arc::new(optbin::fs::NoEvents),
    )
    .unwrap();
    let guard = mount_background(overlay, &MountOptions::new(&mount)).unwrap();
    let canonical_bin = toolchain_bin.canonicalize().unwrap();
    let rustc = mount.join("bin/rustc");
    let version = run(Command::new(&rustc).arg("--version"));
    assert_eq!(
        version.stdout,
        run(Command::new(toolchain_bin.join("rustc")).arg("--version")).stdout
    );
    // rustc finds its sysroot from librustc_driver, which the loader found at
    // $ORIGIN/../lib: through the mirror's sibling symlink, i.e. the real directory.
    let served_sysroot = run(Command::new(&rustc).args(["--print", "sysroot"]));
    assert_eq!(served_sysroot.code, Some(0), "{}", served_sysroot.stderr);
    assert_eq!(served_sysroot.stdout.trim(), sysroot);
    // The sysroot found relative to the served exe really works: compile and run.
    let src = tmp.path().join("hello.rs");
    std::fs::write(&src, "fn main() { println!(\"hello from the mount\"); }").unwrap();
    let exe = tmp.path().join("hello");
    let built = run(Command::new(&rustc).arg(&src).arg("-o").arg(&exe).env_remove("RUSTC_WRAPPER"));
    assert_eq!(built.code, Some(0), "{}", built.stderr);
    assert_eq!(run(&mut Command::new(&exe)).stdout, "hello from the mount\n");
    let cargo = run(Command::new(mount.join("bin/cargo")).arg("--version"));
    assert_eq!(cargo.code, Some(0), "{}", cargo.stderr);
    assert_eq!(
        cargo.stdout,
        run(Command::new(toolchain_bin.join("cargo")).arg("--version")).stdout
    );
    let served = std::fs::symlink_metadata(in_mount(&mount, &canonical_bin.join("cargo"))).unwrap();
    assert!(served.file_type().is_file(), "cargo has symbols: served as a file");
    drop(guard);
    assert!(!is_mounted(&mount));
}

// ----- the supervised mount -----

const SUPERVISOR_ENV: &str = "OPTBIN_TEST_SUPERVISE";
/// Makes `supervisor_entry`'s server fail at every start.
const BROKEN_ENV: &str = "OPTBIN_TEST_BROKEN_SERVER";

/// Not a test by itself: the supervised-mount test runs this test binary again with
/// `--ignored --exact supervisor_entry` and the environment set, so that the supervisor
/// gets a fresh process (it forks) that the test can kill.
#[test]
#[ignore]
fn supervisor_entry() {
    let Ok(spec) = std::env::var(SUPERVISOR_ENV) else { return };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(std::env::var("OPTBIN_TEST_LOG").unwrap_or_else(|_| "optbin=warn".into()))
        .try_init();
    let mut parts = spec.split('\n');
    let mountpoint = PathBuf::from(parts.next().unwrap());
    let pid_file = PathBuf::from(parts.next().unwrap());
    let dirs: Vec<PathBuf> = parts.map(PathBuf::from).collect();
    let mut opts = MountOptions::new(&mountpoint);
    opts.server_pid_file = Some(pid_file);
    opts.max_crashes = 50;
    let broken = std::env::var_os(BROKEN_ENV).is_some();
    if broken {
        opts.max_crashes = 3;
    }
    let result = optbin::fuse::run_supervised(&opts, |ctx| {
        if broken {
            anyhow::bail!("this server cannot start (test)");
        }
        let overlay = Overlay::new(
            OverlayConfig {
                mountpoint: ctx.mountpoint.clone(),
                overlay_dirs: dirs.clone(),
                originals: None,
            },
            ServingTable::new(),
            None,
            Arc::new(SlowControl(StaticControl::new(&[("status", "supervised\n")]))),
            Arc::new(optbin::fs::NoEvents),
        )?;
        Ok(optbin::fuse::Served { overlay, shutdown: Box::new(|| eprintln!("shutdown hook ran")) })
    });
    if let Err(e) = &result {
        eprintln!("supervisor: {e:#}");
    }
    std::process::exit(if result.is_ok() { 0 } else { 1 });
}

/// A control plane with a file whose read takes a while: a request in flight when the
/// server is killed.
struct SlowControl(StaticControl);

impl optbin::fs::ControlPlane for SlowControl {
    fn files(&self) -> Vec<optbin::fs::ControlFile> {
        let mut files = self.0.files();
        files.push(optbin::fs::ControlFile { name: "slow".into(), mode: 0o444, writable: false });
        files
    }
    fn read(&self, name: &str) -> Result<Vec<u8>, optbin::error::FsError> {
        if name == "slow" {
            // Tells the test that this request is in flight in the server (beside the pid
            // file, see `Supervisor::spawn`), then takes its time.
            if let Some(marker) = std::env::var_os(SLOW_MARKER_ENV) {
                std::fs::write(marker, b"").ok();
            }
            std::thread::sleep(Duration::from_millis(1500));
            return Ok(b"slow\n".to_vec());
        }
        self.0.read(name)
    }
    fn write(&self, name: &str, uid: u32, data: &[u8]) -> Result<(), optbin::error::FsError> {
        self.0.write(name, uid, data)
    }
}

struct Supervisor {
    child: std::process::Child,
}

impl Supervisor {
    fn spawn(mount: &Path, pid_file: &Path, dirs: &[PathBuf], broken: bool) -> Self {
        let mut spec = format!("{}\n{}", mount.display(), pid_file.display());
        for d in dirs {
            spec.push_str(&format!("\n{}", d.display()));
        }
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--ignored", "--exact", "supervisor_entry", "--nocapture", "--test-threads=1"])
            .env(SUPERVISOR_ENV, spec)
            .stdout(Stdio::null());
        if broken {
            cmd.env(BROKEN_ENV, "1");
        }
        cmd.env(SLOW_MARKER_ENV, slow_marker(pid_file));
        Self { child: cmd.spawn().unwrap() }
    }

    fn start(mount: &Path, pid_file: &Path, dirs: &[PathBuf]) -> Self {
        let s = Self::spawn(mount, pid_file, dirs, false);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(pid_file.exists()
            && std::fs::read_to_string(mount.join(".optbin/status"))
                .is_ok_and(|s| s == "supervised\n"))
        {
            assert!(Instant::now() < deadline, "the supervised mount did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The file a supervised server's `slow` control file touches when a read of it begins.
const SLOW_MARKER_ENV: &str = "OPTBIN_TEST_SLOW_MARKER";

fn slow_marker(pid_file: &Path) -> PathBuf {
    pid_file.with_file_name("slow-read-started")
}

/// Waits until the command loop of the supervised test, which writes its iteration count
/// to `progress` after each iteration, has completed `n` iterations.
fn wait_loop_iterations(progress: &Path, n: u64) {
    let done = || std::fs::read_to_string(progress).ok().and_then(|s| s.trim().parse::<u64>().ok());
    daemon::wait_until(
        Duration::from_secs(30),
        &format!("{n} iterations of the command loop"),
        || done().unwrap_or(0) >= n,
    );
}

fn loop_iterations(progress: &Path) -> u64 {
    std::fs::read_to_string(progress).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn server_pid(pid_file: &Path) -> i32 {
    std::fs::read_to_string(pid_file).unwrap().trim().parse().unwrap()
}

#[test]
fn supervised_mount_keeps_commands_working_while_the_server_is_killed() {
    let f = fixture();
    let pid_file = f.tmp.path().join("server.pid");
    let usr_bin = PathBuf::from("/usr/bin");
    let sup = Supervisor::start(&f.mount, &pid_file, &[f.one.clone(), usr_bin]);
    let view = f.mount.join("bin");
    let stop = f.tmp.path().join("stop");
    let progress = f.tmp.path().join("progress");
    let data = f.tmp.path().join("data.txt");
    std::fs::write(&data, "d\n").unwrap();

    // Commands found through PATH (the mount first; bash's hashing off so that every
    // command is looked up again): a served binary, an exe-relative one, coreutils.
    let script = format!(
        r#"set +h
export PATH={view}:$PATH
n=0; fails=0
while [ ! -e {stop} ]; do
  n=$((n+1))
  out=$(prog a 2>&1); [ "$out" = "one a" ] || {{ fails=$((fails+1)); echo "prog: $out" >&2; }}
  out=$(data 2>&1); [ "$out" = "exe-relative data" ] || {{ fails=$((fails+1)); echo "data: $out" >&2; }}
  out=$(cat {data} 2>&1); [ "$out" = "d" ] || {{ fails=$((fails+1)); echo "cat: $out" >&2; }}
  ls -d / >/dev/null 2>&1 || {{ fails=$((fails+1)); echo "ls failed" >&2; }}
  echo $n > {progress}.new && mv {progress}.new {progress}
done
echo "$n $fails""#,
        view = view.display(),
        stop = stop.display(),
        progress = progress.display(),
        data = data.display()
    );
    let loop_child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed only while commands are running through the mount, and each new server
    // serves a few loop iterations before the next kill.
    wait_loop_iterations(&progress, 3);
    let mut kills = 0;
    let mut restart_ms = Vec::new();
    for _ in 0..5 {
        let server = server_pid(&pid_file);
        // SAFETY: killing the server process of our own supervisor.
        assert_eq!(unsafe { libc::kill(server, libc::SIGKILL) }, 0);
        kills += 1;
        let killed_at = Instant::now();
        while server_pid(&pid_file) == server {
            assert!(killed_at.elapsed() < Duration::from_secs(10), "no restart");
            std::thread::sleep(Duration::from_millis(5));
        }
        restart_ms.push(killed_at.elapsed().as_millis());
        wait_loop_iterations(&progress, loop_iterations(&progress) + 5);
    }
    std::fs::write(&stop, "").unwrap();
    let out = loop_child.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    let mut it = summary.split_whitespace().map(|s| s.parse::<u64>().unwrap());
    let (iterations, failures) = (it.next().unwrap(), it.next().unwrap());
    eprintln!(
        "supervised mount: {kills} server kills, {iterations} loop iterations ({} commands), {failures} failed; restarts took {restart_ms:?} ms",
        iterations * 4
    );
    assert!(iterations > 20, "the loop ran too little: {iterations}");
    assert_eq!(failures, 0, "failed commands:\n{}", String::from_utf8_lossy(&out.stderr));

    // A request the server had read but not answered when it died is sent again to the
    // next server (FUSE_NOTIFY_RESEND): the reader gets its answer instead of hanging.
    let reader = Command::new("timeout")
        .args(["20", "cat"])
        .arg(f.mount.join(".optbin/slow"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let marker = slow_marker(&pid_file);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the slow read never reached the server");
        std::thread::sleep(Duration::from_millis(5));
    }
    let server = server_pid(&pid_file);
    // SAFETY: killing the server process of our own supervisor.
    unsafe { libc::kill(server, libc::SIGKILL) };
    let resent_at = Instant::now();
    let reader = reader.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&reader.stdout), "slow\n", "{:?}", reader.status);
    eprintln!("the interrupted request was answered {:?} after the kill", resent_at.elapsed());

    // A clean stop: SIGTERM to the supervisor unmounts (lazily: a program started from the
    // mount still runs) and exits 0; the running program finishes normally.
    let running = Held::spawn(Command::new(view.join("prog")).arg("still"));
    let mut sup = sup;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(sup.pid(), libc::SIGTERM) };
    let status = sup.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!is_mounted(&f.mount));
    let running = running.release();
    assert_eq!((running.stdout.as_str(), running.code), ("one still\n", Some(0)));

    // A dead daemon (supervisor and server SIGKILLed) leaves a stale mount; the next start
    // clears it by itself.
    let sup2 = Supervisor::start(&f.mount, &pid_file, std::slice::from_ref(&f.one));
    let server = server_pid(&pid_file);
    // SAFETY: signalling our own child and grandchild. The supervisor is stopped first so
    // that it neither restarts the server nor lets it unmount cleanly (parent-death signal).
    unsafe {
        libc::kill(sup2.pid(), libc::SIGSTOP);
        libc::kill(server, libc::SIGKILL);
        libc::kill(sup2.pid(), libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while optbin::fuse::mount_state(&f.mount).unwrap() != optbin::fuse::MountState::Stale {
        if Instant::now() >= deadline {
            let holders = run(Command::new("sh").arg("-c").arg("for p in /proc/[0-9]*; do ls -l $p/fd 2>/dev/null | grep -q /dev/fuse && echo \"$p $(cat $p/cmdline | tr '\\0' ' ')\"; done"));
            panic!("expected a stale mount; /dev/fuse holders:\n{}", holders.stdout);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let dead = Command::new(view.join("prog")).output().map(drop).unwrap_err();
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "a dead mount answers ENOTCONN");
    drop(sup2);
    std::fs::remove_file(&pid_file).unwrap();
    let sup3 = Supervisor::start(&f.mount, &pid_file, std::slice::from_ref(&f.one));
    assert_eq!(run(&mut Command::new(view.join("prog"))).stdout, "one\n");
    drop(sup3);
    assert!(!is_mounted(&f.mount), "mount left behind");
}

/// Mounts `dirs` at `mount` with an empty serving table; copies of originals in `originals`.
fn mount_dirs(
    mount: &Path,
    dirs: &[PathBuf],
    originals: Option<PathBuf>,
) -> (optbin::fuse::MountGuard, std::sync::mpsc::Receiver<FsEvent>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let overlay = Overlay::new(
        OverlayConfig { mountpoint: mount.to_path_buf(), overlay_dirs: dirs.to_vec(), originals },
        ServingTable::new(),
        None,
        Arc::new(StaticControl::new(&[("status", "ok\n")])),
        Arc::new(tx),
    )
    .unwrap();
    let guard = mount_background(overlay, &MountOptions::new(mount)).expect("mount");
    (guard, rx)
}

/// `setpriv` as nobody running `program args...`.
fn nobody(program: &str, args: &[&Path]) -> Output {
    let mut c = as_nobody(Path::new(program));
    c.args(args);
    run(&mut c)
}

/// Issue 10.1: a 0700 overlay dir, or a 0700 directory above one, stops the same users
/// through the mount as on the real path, and the PATH view gives each user what PATH
/// lookup would give them.
#[test]
fn directory_permissions_are_mirrored_for_every_user() {
    let tmp = open_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let restricted = root.join("restricted/bin");
    let locked = root.join("locked/deep/bin");
    let open = root.join("open/bin");
    for d in [&restricted, &locked, &open] {
        std::fs::create_dir_all(d).unwrap();
    }
    prog(&restricted.join("onlysecret"), "secret", &[]);
    prog(&restricted.join("shared"), "restricted", &[]);
    prog(&locked.join("onlylocked"), "locked", &[]);
    prog(&open.join("shared"), "open", &[]);
    chmod(&restricted, 0o700);
    chmod(&root.join("locked"), 0o700);
    let mnt = root.join("mnt");
    let (guard, _events) =
        mount_dirs(&mnt, &[restricted.clone(), locked.clone(), open.clone()], None);

    // Reading, running and listing: through the mount exactly as on the real path.
    for file in [
        restricted.join("onlysecret"),
        restricted.join("shared"),
        locked.join("onlylocked"),
        open.join("shared"),
    ] {
        let through = in_mount(&mnt, &file);
        let (native, mounted) = (nobody("cat", &[&file]), nobody("cat", &[&through]));
        assert_eq!(
            native.code == Some(0),
            mounted.code == Some(0),
            "cat {}: {mounted:?}",
            file.display()
        );
        let (native, mounted) = (run(&mut as_nobody(&file)), run(&mut as_nobody(&through)));
        assert_eq!(
            (&native.stdout, native.code == Some(0)),
            (&mounted.stdout, mounted.code == Some(0)),
            "exec {}",
            file.display()
        );
    }
    for dir in [restricted.clone(), root.join("locked"), locked.clone(), open.clone()] {
        let (native, mounted) = (nobody("ls", &[&dir]), nobody("ls", &[&in_mount(&mnt, &dir)]));
        assert_eq!(
            native.code == Some(0),
            mounted.code == Some(0),
            "ls {}: {mounted:?}",
            dir.display()
        );
        let real_mode = std::fs::metadata(&dir).unwrap().mode() & 0o7777;
        let shown = std::fs::metadata(in_mount(&mnt, &dir)).unwrap().mode() & 0o7777;
        assert_eq!(shown, real_mode & 0o7555, "mode of {}", dir.display());
    }
    assert_ne!(nobody("cat", &[&in_mount(&mnt, &restricted.join("onlysecret"))]).code, Some(0));

    // The PATH view: each user gets the first directory *they* may search.
    let view = mnt.join("bin");
    assert_eq!(run(&mut Command::new(view.join("shared"))).stdout, "restricted\n");
    assert_eq!(run(&mut as_nobody(&view.join("shared"))).stdout, "open\n");
    assert_eq!(run(&mut Command::new(view.join("shared"))).stdout, "restricted\n", "root again");
    assert_ne!(run(&mut as_nobody(&view.join("onlysecret"))).code, Some(0));
    assert_ne!(run(&mut as_nobody(&view.join("onlylocked"))).code, Some(0));
    assert_eq!(run(&mut Command::new(view.join("onlylocked"))).stdout, "locked\n");
    let listed = nobody("ls", &[&view]);
    assert_eq!(listed.stdout, "shared\n", "nobody lists what nobody can run");
    let listed = run(Command::new("ls").arg(&view));
    assert_eq!(listed.stdout, "onlylocked\nonlysecret\nshared\n");
    drop(guard);
}

/// `setfacl ARGS...` (mount/deps.sh installs the acl package).
fn setfacl(args: &[&str], path: &Path) {
    let out = Command::new("setfacl").args(args).arg(path).output().expect("setfacl");
    assert!(out.status.success(), "setfacl {args:?} {}: {out:?}", path.display());
}

/// Issue 10.1 with POSIX ACLs: an ACL entry on a real directory or file stops (or admits)
/// the same users through the mount as on the real path, in the mirrors (the kernel reads
/// the ACL through the mount) and in the PATH view (optbin evaluates it per caller).
#[test]
fn acls_on_real_directories_and_files_stop_and_admit_the_same_users() {
    let tmp = open_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    // 0755, but nobody named with no rights; 0700, but nobody named with r-x; an open dir
    // holding a 0755 program whose own ACL denies nobody.
    let denied = root.join("denied/bin");
    let granted = root.join("granted/bin");
    let open = root.join("open/bin");
    for d in [&denied, &granted, &open] {
        std::fs::create_dir_all(d).unwrap();
    }
    prog(&denied.join("onlydenied"), "denied", &[]);
    prog(&denied.join("shared"), "denied", &[]);
    prog(&granted.join("onlygranted"), "granted", &[]);
    prog(&open.join("shared"), "open", &[]);
    prog(&open.join("fileacl"), "fileacl", &[]);
    setfacl(&["-m", "u:nobody:---"], &denied);
    chmod(&granted, 0o700);
    setfacl(&["-m", "u:nobody:r-x"], &granted);
    setfacl(&["-m", "u:nobody:---"], &open.join("fileacl"));
    let mnt = root.join("mnt");
    let (guard, _events) = mount_dirs(&mnt, &[denied.clone(), granted.clone(), open.clone()], None);

    // The mirrors: reading, running and listing as on the real path.
    let files = [
        (denied.join("onlydenied"), false),
        (granted.join("onlygranted"), true),
        (open.join("shared"), true),
        (open.join("fileacl"), false),
    ];
    for (file, nobody_may) in &files {
        let through = in_mount(&mnt, file);
        let (native, mounted) = (run(&mut as_nobody(file)), run(&mut as_nobody(&through)));
        assert_eq!(native.code == Some(0), *nobody_may, "natively, exec {}", file.display());
        assert_eq!(
            (&native.stdout, native.code == Some(0)),
            (&mounted.stdout, mounted.code == Some(0)),
            "exec {}: {}",
            file.display(),
            mounted.stderr
        );
        let (native, mounted) = (nobody("cat", &[file]), nobody("cat", &[&through]));
        assert_eq!(native.code == Some(0), mounted.code == Some(0), "cat {}", file.display());
        // Root is not stopped by any of them.
        assert_eq!(run(&mut Command::new(&through)).code, Some(0), "root runs {}", file.display());
    }
    for (dir, nobody_may) in [(&denied, false), (&granted, true), (&open, true)] {
        let (native, mounted) = (nobody("ls", &[dir]), nobody("ls", &[&in_mount(&mnt, dir)]));
        assert_eq!(native.code == Some(0), nobody_may, "natively, ls {}", dir.display());
        assert_eq!(
            (native.code == Some(0), &native.stdout),
            (mounted.code == Some(0), &mounted.stdout),
            "ls {}",
            dir.display()
        );
    }
    // getfacl through the mount shows the real ACL.
    let shown = run(Command::new("getfacl").args(["-cp"]).arg(in_mount(&mnt, &granted)));
    assert!(shown.stdout.contains("user:nobody:r-x"), "{shown:?}");

    // The PATH view: nobody skips the directory its ACL closes, and reaches the one its ACL
    // opens; root sees the first directory as always.
    let view = mnt.join("bin");
    assert_eq!(run(&mut as_nobody(&view.join("shared"))).stdout, "open\n");
    assert_eq!(run(&mut Command::new(view.join("shared"))).stdout, "denied\n");
    assert_ne!(run(&mut as_nobody(&view.join("onlydenied"))).code, Some(0));
    assert_eq!(run(&mut as_nobody(&view.join("onlygranted"))).stdout, "granted\n");
    assert_ne!(run(&mut as_nobody(&view.join("fileacl"))).code, Some(0));
    drop(guard);
}

/// A program that says "ready", waits for a line on stdin, then prints MSG.
const WAITER_C: &str = r#"
#include <stdio.h>
int main(void) {
    printf("ready\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 2;
    printf("%s\n", MSG);
    return 0;
}
"#;

/// Starts `program`, waits for its "ready" and returns it with its stdin and stdout.
fn start_waiter(
    program: &Path,
) -> (std::process::Child, std::io::BufReader<std::process::ChildStdout>) {
    use std::io::BufRead;
    let mut child = Command::new(program)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    (child, out)
}

/// Lets a waiter finish and returns what it printed after "ready" and its exit status.
fn finish_waiter(
    mut child: std::process::Child,
    mut out: std::io::BufReader<std::process::ChildStdout>,
) -> (String, Option<i32>) {
    use std::io::{Read, Write};
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    (rest, status.code())
}

/// Issue 10.2: writing an original in place while it runs through the mount leaves the
/// running process its bytes (natively the write fails with ETXTBSY).
#[test]
fn a_running_program_keeps_its_bytes_when_the_original_is_written_in_place() {
    let (_tmp, root, bin) = open_test_root();
    let original = bin.join("waiter");
    let (old, new) = (root.join("waiter.old"), root.join("waiter.new"));
    cc(WAITER_C, &old, &["-DMSG=\"AAAA\""]);
    cc(WAITER_C, &new, &["-DMSG=\"BBBB\""]);
    assert_eq!(std::fs::metadata(&old).unwrap().len(), std::fs::metadata(&new).unwrap().len());
    std::fs::copy(&old, &original).unwrap();

    // Natively: ETXTBSY, and the process finishes as it started.
    let (child, out) = start_waiter(&original);
    let cp = run(Command::new("cp").arg(&new).arg(&original));
    assert_ne!(cp.code, Some(0));
    assert!(cp.stderr.contains("Text file busy"), "{cp:?}");
    assert_eq!(finish_waiter(child, out), ("AAAA\n".into(), Some(0)));

    let mnt = root.join("mnt");
    let (guard, _events) =
        mount_dirs(&mnt, std::slice::from_ref(&bin), Some(root.join("originals")));
    let through = in_mount(&mnt, &original);
    assert!(std::fs::symlink_metadata(&through).unwrap().file_type().is_file(), "served");
    let run_through = || {
        let (child, out) = start_waiter(&through);
        finish_waiter(child, out)
    };
    let wait_for = |expected: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = run_through();
            if got.0 == expected {
                break;
            }
            assert!(Instant::now() < deadline, "still {got:?}, expected {expected:?}");
        }
    };
    assert_eq!(run_through(), ("AAAA\n".into(), Some(0)));

    for (how, args) in [
        ("cp", vec!["cp".to_string(), new.display().to_string(), original.display().to_string()]),
        (
            "dd conv=notrunc",
            vec![
                "dd".to_string(),
                format!("if={}", new.display()),
                format!("of={}", original.display()),
                "conv=notrunc".to_string(),
                "status=none".to_string(),
            ],
        ),
    ] {
        // Start from the old version, served.
        std::fs::copy(&old, root.join("restore")).unwrap();
        std::fs::rename(root.join("restore"), &original).unwrap();
        wait_for("AAAA\n");
        let (child, out) = start_waiter(&through);
        let write = run(Command::new(&args[0]).args(&args[1..]));
        assert_eq!(write.code, Some(0), "{how} into the real file: {write:?}");
        assert_eq!(std::fs::read(&original).unwrap(), std::fs::read(&new).unwrap());
        assert_eq!(finish_waiter(child, out), ("AAAA\n".into(), Some(0)), "after {how}");
        // The next exec runs the new bytes.
        wait_for("BBBB\n");
    }
    drop(guard);
}

/// Issue 10.9: a relative symlink in an overlaid dir that climbs to the root resolves
/// through the mount as it does natively.
#[test]
fn relative_links_that_climb_above_the_mirror_resolve() {
    let tmp = open_tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let bin = root.join("a/b/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let up = "../".repeat(bin.components().count() - 1);
    std::os::unix::fs::symlink(format!("{up}usr/bin/env"), bin.join("climb")).unwrap();
    // Through the real `/bin` (not the mount's PATH view, which has no `env`).
    std::os::unix::fs::symlink(format!("{up}bin/env"), bin.join("climb_bin")).unwrap();
    let mnt = root.join("mnt");
    let (guard, _events) = mount_dirs(&mnt, std::slice::from_ref(&bin), None);
    for name in ["climb", "climb_bin"] {
        let native = run(Command::new(bin.join(name)).args(["echo", "hi"]));
        assert_eq!((native.stdout.as_str(), native.code), ("hi\n", Some(0)));
        let mounted = run(Command::new(in_mount(&mnt, &bin.join(name))).args(["echo", "hi"]));
        assert_eq!((mounted.stdout.as_str(), mounted.code), ("hi\n", Some(0)), "{name}");
        let view = run(Command::new(mnt.join("bin").join(name)).args(["echo", "hi"]));
        assert_eq!(view.stdout, "hi\n", "bin/{name}");
    }
    drop(guard);
}

/// Issue 9: a listing is a snapshot per opendir (offsets stay valid while the directory
/// changes, each name comes once) and announces no binary.
#[test]
fn a_listing_is_a_stable_snapshot_and_announces_nothing() {
    let (_tmp, root, bin) = open_test_root();
    prog(&bin.join("prog"), "p", &[]);
    let name = |i: usize| format!("script-with-a-rather-long-name-to-fill-pages-{i:05}");
    let before: std::collections::BTreeSet<String> =
        (0..3000).map(name).chain(["prog".to_string()]).collect();
    for i in 0..3000 {
        std::fs::write(bin.join(name(i)), "#!/bin/sh\n").unwrap();
        chmod(&bin.join(name(i)), 0o755);
    }
    let mnt = root.join("mnt");
    let (guard, events) = mount_dirs(&mnt, std::slice::from_ref(&bin), None);
    let mirror = in_mount(&mnt, &bin);
    let mut listing = std::fs::read_dir(&mirror).unwrap();
    let mut seen = vec![listing.next().unwrap().unwrap().file_name().into_string().unwrap()];
    // Between the first READDIR and the next ones, a third of the names go and others come.
    for i in 0..1000 {
        std::fs::remove_file(bin.join(name(i))).unwrap();
        std::fs::write(bin.join(name(10_000 + i)), "#!/bin/sh\n").unwrap();
    }
    seen.extend(listing.map(|e| e.unwrap().file_name().into_string().unwrap()));
    let unique: std::collections::BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a name came twice");
    assert_eq!(unique, before, "the listing is the directory as it was at opendir");
    // A new listing sees the change.
    assert_eq!(std::fs::read_dir(&mirror).unwrap().count(), 3001);
    // `ls -l` and a listing of the PATH view announced nothing; a lookup does.
    assert_eq!(run(Command::new("ls").arg("-l").arg(&mirror)).code, Some(0));
    assert_eq!(run(Command::new("ls").arg(mnt.join("bin"))).code, Some(0));
    std::fs::read_dir(&mirror).unwrap().for_each(drop);
    let announced = |events: &std::sync::mpsc::Receiver<FsEvent>| {
        events.try_iter().filter(|e| matches!(e, FsEvent::Seen { .. })).count()
    };
    // `ls -l` stats (looks up) each entry: that is a lookup, so `prog` may be announced by
    // it; a plain listing must not. Check the plain listing alone on a fresh mount.
    drop(guard);
    drop(events);
    let (guard, events) = mount_dirs(&mnt, std::slice::from_ref(&bin), None);
    std::fs::read_dir(&mirror).unwrap().for_each(drop);
    std::fs::read_dir(mnt.join("bin")).unwrap().for_each(drop);
    assert_eq!(announced(&events), 0, "a listing announced a binary");
    assert_eq!(run(&mut Command::new(mirror.join("prog"))).stdout, "p\n");
    assert_eq!(announced(&events), 1, "running it announces it");
    drop(guard);
}
