//! The command line: clap definitions, turned into a validated [`Config`] and dispatched.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::config::{self, Config, FileConfig, Overrides};

/// optbin makes the programs on this machine faster with LLVM BOLT, without changing them.
///
/// A FUSE filesystem overlays the directories of PATH; put its `bin` first on PATH and every
/// command runs either its original binary or an optimized variant that was measured faster
/// on your own runs. Status and control live in files under `<mount>/.optbin/`.
#[derive(Debug, Parser)]
#[command(name = "optbin", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Mount the overlay and run the daemon (in the background unless --foreground).
    Mount {
        /// Where to mount [default: /opt/optbin, or `mountpoint` in the config file].
        mountpoint: Option<PathBuf>,
        /// A directory to overlay (repeatable, in PATH order) [default: the directories of $PATH].
        #[arg(long = "overlay", value_name = "DIR")]
        overlay: Vec<PathBuf>,
        /// Where the catalog (SQLite) and the variant store live [default: /var/lib/optbin].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Config file [default: /etc/optbin/config.toml, when it exists].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Stay in the foreground and log to stderr (for systemd and debugging).
        #[arg(long)]
        foreground: bool,
        /// Log filter, e.g. `info`, `debug`, `optbin=debug` [default: info, or RUST_LOG].
        #[arg(long, value_name = "FILTER")]
        log: Option<String>,
    },
    /// Unmount cleanly: stop the daemon and wait for the mount to go.
    Umount {
        /// The mountpoint [default: /opt/optbin].
        mountpoint: Option<PathBuf>,
        /// Seconds to wait for a clean stop before unmounting lazily (also when the daemon
        /// does not answer at all: stopped or hung).
        #[arg(long, default_value_t = 20)]
        timeout: u64,
    },
    /// Print the shell line that puts the overlay first on PATH: eval "$(optbin env)".
    Env {
        /// The mountpoint [default: /opt/optbin].
        mountpoint: Option<PathBuf>,
    },
    /// Keep the daemon's FUSE connection and restart the daemon when it dies (what systemd
    /// does for the service; `optbin mount` starts it by itself outside systemd).
    #[command(hide = true)]
    Hold {
        /// The mountpoint the daemon serves (unmounted lazily if the daemon cannot be
        /// restarted).
        mountpoint: PathBuf,
        /// The daemon's command line.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// What the fleet (the Redis of `[fleet]`) knows: status, list, profile NAME.
    Fleet {
        /// Config file [default: /etc/optbin/config.toml].
        #[arg(long, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: crate::fleet::cli::FleetCommand,
    },
    /// Benchmark a binary's original against its variant (see `optbin bench --help`).
    Bench(crate::bench::BenchArgs),
    /// What BOLT did for each program and what it measurably changed (see `optbin report
    /// --help`).
    Report(crate::report::ReportArgs),
    /// Print what `<mount>/.optbin/status` shows.
    Status {
        /// The mountpoint [default: /opt/optbin].
        mountpoint: Option<PathBuf>,
        /// Print status.json instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The host's USE summary (utilization, saturation, errors of CPU, memory, disks,
    /// network, task and file tables), measured now over one second, or over a past period
    /// from the daemon's history (`--since 1h`), with a hint where a threshold was crossed.
    Use {
        /// Summarize the history of this last period instead (e.g. `30m`, `1h`, `2d`).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Where the daemon keeps its catalog [default: the config file's, or /var/lib/optbin].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Config file [default: /etc/optbin/config.toml, when it exists].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("optbin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Mount { mountpoint, overlay, state_dir, config, foreground, log } => {
            let file = FileConfig::load(config.as_deref())?;
            let overrides = Overrides { mountpoint, state_dir, overlay, log };
            let cfg = Config::resolve(file, overrides, std::env::var("PATH").ok().as_deref())?;
            if foreground {
                init_logging(&cfg.log);
                crate::daemon::run::run_foreground(cfg)?;
                Ok(ExitCode::SUCCESS)
            } else {
                spawn_background(&cfg, config.as_deref())
            }
        }
        Cmd::Umount { mountpoint, timeout } => {
            umount(&mountpoint_or_default(mountpoint), Duration::from_secs(timeout))
        }
        Cmd::Hold { mountpoint, command } => {
            init_logging("info");
            crate::fuse::holder::run(&mountpoint, &command)
        }
        Cmd::Env { mountpoint } => {
            quiet_on_closed_pipe();
            let bin = mountpoint_or_default(mountpoint).join("bin");
            let bin = shell_quote(&bin.to_string_lossy());
            println!("case \":$PATH:\" in *:{bin}:*) ;; *) export PATH={bin}:\"$PATH\" ;; esac");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fleet { config, command } => crate::fleet::cli::run(config.as_deref(), command),
        Cmd::Bench(args) => crate::bench::main(args),
        Cmd::Report(args) => {
            quiet_on_closed_pipe();
            crate::report::main(args)
        }
        Cmd::Status { mountpoint, json } => {
            quiet_on_closed_pipe();
            let mnt = mountpoint_or_default(mountpoint);
            let file = mnt.join(".optbin").join(if json { "status.json" } else { "status" });
            match std::fs::read(&file) {
                Ok(bytes) => {
                    use std::io::Write;
                    std::io::stdout().write_all(&bytes)?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
                    "the mount at {} is stale: its daemon died; `optbin mount` clears it",
                    mnt.display()
                ),
                Err(e) => Err(e).with_context(|| {
                    format!("reading {} (is optbin mounted at {}?)", file.display(), mnt.display())
                }),
            }
        }
        Cmd::Use { since, state_dir, config, json } => {
            let state_dir = match state_dir {
                Some(d) => d,
                None => FileConfig::load(config.as_deref())?
                    .state_dir
                    .unwrap_or_else(|| PathBuf::from(config::DEFAULT_STATE_DIR)),
            };
            print!("{}", crate::observe::use_command(since, &state_dir, json)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn mountpoint_or_default(m: Option<PathBuf>) -> PathBuf {
    config::normalize(&m.unwrap_or_else(|| PathBuf::from(config::DEFAULT_MOUNTPOINT)))
}

fn shell_quote(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Output into a closed pipe (`optbin status | head`) ends the process quietly, as it does
/// Unix tools: SIGPIPE back to its default (Rust ignores it, so writes would fail with
/// EPIPE and end in an error message). Only for commands that print and exit, never the
/// daemon.
fn quiet_on_closed_pipe() {
    // libc: rustix sets signal dispositions only in its unstable `runtime` module.
    // SAFETY: resetting a signal disposition to its default installs no handler of ours.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn init_logging(filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let mut filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    // fuser logs every request it has no handler for at warn ("[Not Implemented] ioctl",
    // getxattr, ...): requests any user can make as often as they like (every terminal
    // probe of a served file is an ioctl).
    if !filter.contains("fuser") {
        filter.push_str(",fuser=error");
    }
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, never into a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(RateLimit::default());
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(filter))
        .with(lines)
        .try_init();
}

/// At most this many lines a minute from any one log statement at info level or above.
const LINES_PER_MINUTE: u32 = 20;

/// Many log lines follow from requests any user can make as often as they like (a refused
/// write, a failed request, a rejected command): none of them may grow the log without
/// bound. Debug and trace lines, asked for explicitly, are not limited.
#[derive(Default)]
struct RateLimit {
    seen:
        std::sync::Mutex<std::collections::HashMap<tracing::callsite::Identifier, (Instant, u32)>>,
}

impl<S> tracing_subscriber::layer::Filter<S> for RateLimit {
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if !meta.is_event() || *meta.level() > tracing::Level::INFO {
            return true;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (since, count) = seen.entry(meta.callsite()).or_insert((now, 0));
        if now.duration_since(*since) >= Duration::from_secs(60) {
            (*since, *count) = (now, 0);
        }
        *count += 1;
        *count <= LINES_PER_MINUTE
    }

    /// Asked every time (the answer changes with the count), never cached per callsite.
    fn callsite_enabled(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
}

/// The state directory holds which binaries every user ran and when: root's only (0700),
/// also when it already existed with wider permissions.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))
}

/// Starts `optbin mount --foreground` detached under the holder (`optbin hold`, which keeps
/// the FUSE connection and restarts the daemon if it dies), logging to
/// `<state>/optbin.log`, and waits until the mount answers (or the daemon gives up, whose
/// log tail is shown).
fn spawn_background(cfg: &Config, config_file: Option<&Path>) -> anyhow::Result<ExitCode> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    create_private_dir(&cfg.state_dir)?;
    let log_path = cfg.state_dir.join("optbin.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the optbin executable")?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("hold").arg(&cfg.mountpoint).arg("--").arg(&exe);
    cmd.arg("mount").arg(&cfg.mountpoint).arg("--foreground");
    cmd.arg("--state-dir").arg(&cfg.state_dir).arg("--log").arg(&cfg.log);
    for d in &cfg.overlay {
        cmd.arg("--overlay").arg(d);
    }
    if let Some(f) = config_file {
        cmd.arg("--config").arg(f);
    }
    cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: the closure only makes the setsid system call (rustix's is a raw syscall,
    // async-signal-safe, no allocation); it detaches the daemon from our terminal.
    unsafe {
        cmd.pre_exec(|| {
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the daemon")?;
    let status_file = cfg.mountpoint.join(".optbin/status");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the daemon exited ({status}) before the mount came up; its log {} ends with:\n{}",
                log_path.display(),
                tail(&log_path, 20)
            );
        }
        if std::fs::metadata(&status_file).is_ok() {
            println!(
                "optbin mounted at {} (holder pid {}, log {})",
                cfg.mountpoint.display(),
                child.id(),
                log_path.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the mount did not come up within 60 s; see {}", log_path.display())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Unmounts `mnt`: the server sees its session end, stops its tasks and exits, and the
/// supervisor follows. A busy mount (programs started from it still run) is detached; those
/// programs keep running from their backing files. Nothing here waits on the mount's server
/// beyond `timeout`: a stopped or hung server gets a forced lazy unmount when the time is up
/// (see [`crate::fuse::unmount_forcibly`]).
fn umount(mnt: &Path, timeout: Duration) -> anyhow::Result<ExitCode> {
    use crate::fuse::Unmounted;
    let deadline = Instant::now() + timeout;
    match crate::fuse::mount_entry(mnt)? {
        None => bail!("nothing is mounted at {}", mnt.display()),
        Some(entry) if !entry.is_optbin() => {
            bail!("{} is a {} mount, not optbin's", mnt.display(), entry.describe())
        }
        Some(_) => {}
    }
    // Asking the daemon (its status file) may hang on a stopped server: ask for a moment.
    let ask = timeout.min(Duration::from_secs(2));
    let pid = within(ask, {
        let mnt = mnt.to_path_buf();
        move || daemon_pid(&mnt)
    })
    .flatten();
    let left = deadline.saturating_duration_since(Instant::now());
    let how = match within(left, {
        let mnt = mnt.to_path_buf();
        move || crate::fuse::unmount(&mnt)
    }) {
        Some(how) => how?,
        None => {
            crate::fuse::unmount_forcibly(mnt)?;
            println!(
                "detached {} and aborted its connection: its daemon did not answer within {}s",
                mnt.display(),
                timeout.as_secs()
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    if let Some(pid) = pid {
        let alive = || {
            rustix::process::Pid::from_raw(pid as i32)
                .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
        };
        while Instant::now() < deadline && alive() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    match how {
        Unmounted::Clean => println!("unmounted {}", mnt.display()),
        Unmounted::Detached => println!(
            "detached {} (programs started from it keep running until they exit)",
            mnt.display()
        ),
        Unmounted::NotMounted => println!("{} was not mounted", mnt.display()),
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `f` on its own thread and waits at most `limit` for its answer. A thread stuck on
/// an unanswered FUSE request is left behind (the process's exit ends it).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("optbin-umount".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .ok()?;
    rx.recv_timeout(limit).ok()
}

/// The pid of the process serving `mnt`, as its own status file says.
fn daemon_pid(mnt: &Path) -> Option<u32> {
    let text = std::fs::read(mnt.join(".optbin/status.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v.get("daemon")?.get("pid")?.as_u64().map(|p| p as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer into a shared buffer, for reading back what was logged.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_repeated_warning_is_rate_limited_and_debug_lines_are_not() {
        use tracing_subscriber::prelude::*;
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_filter(RateLimit::default());
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("debug"))
            .with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..100 {
                tracing::warn!(i, "request failed");
            }
            for i in 0..100 {
                tracing::debug!(i, "asked for");
            }
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("request failed").count(), LINES_PER_MINUTE as usize);
        assert_eq!(text.matches("asked for").count(), 100);
        assert!(!text.contains('\u{1b}'));
    }
}
