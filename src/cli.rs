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
        /// Seconds to wait for a clean stop before unmounting lazily.
        #[arg(long, default_value_t = 20)]
        timeout: u64,
    },
    /// Print the shell line that puts the overlay first on PATH: eval "$(optbin env)".
    Env {
        /// The mountpoint [default: /opt/optbin].
        mountpoint: Option<PathBuf>,
    },
    /// Benchmark a binary's original against its variant (see `optbin bench --help`).
    Bench(crate::bench::BenchArgs),
    /// Print what `<mount>/.optbin/status` shows.
    Status {
        /// The mountpoint [default: /opt/optbin].
        mountpoint: Option<PathBuf>,
        /// Print status.json instead of the table.
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
        Cmd::Env { mountpoint } => {
            let bin = mountpoint_or_default(mountpoint).join("bin");
            let bin = shell_quote(&bin.to_string_lossy());
            println!("case \":$PATH:\" in *:{bin}:*) ;; *) export PATH={bin}:\"$PATH\" ;; esac");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(args) => crate::bench::main(args),
        Cmd::Status { mountpoint, json } => {
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

fn init_logging(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Starts `optbin mount --foreground` detached, logging to `<state>/optbin.log`, and waits
/// until the mount answers (or the daemon gives up, whose log tail is shown).
fn spawn_background(cfg: &Config, config_file: Option<&Path>) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let log_path = cfg.state_dir.join("optbin.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the optbin executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("mount").arg(&cfg.mountpoint).arg("--foreground");
    cmd.arg("--state-dir").arg(&cfg.state_dir).arg("--log").arg(&cfg.log);
    for d in &cfg.overlay {
        cmd.arg("--overlay").arg(d);
    }
    if let Some(f) = config_file {
        cmd.arg("--config").arg(f);
    }
    cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
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
                "optbin mounted at {} (daemon pid {}, log {})",
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
/// programs keep running from their backing files.
fn umount(mnt: &Path, timeout: Duration) -> anyhow::Result<ExitCode> {
    use crate::fuse::{MountState, Unmounted};
    match crate::fuse::mount_state(mnt)? {
        MountState::NotMounted => bail!("nothing is mounted at {}", mnt.display()),
        MountState::Other(what) => bail!("{} is a {what} mount, not optbin's", mnt.display()),
        MountState::Stale | MountState::LiveOptbin => {}
    }
    let pid = daemon_pid(mnt);
    let how = crate::fuse::unmount(mnt)?;
    if let Some(pid) = pid {
        let deadline = Instant::now() + timeout;
        // SAFETY: kill(pid, 0) only probes whether the process exists.
        while Instant::now() < deadline && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0 {
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

/// The pid of the process serving `mnt`, as its own status file says.
fn daemon_pid(mnt: &Path) -> Option<u32> {
    let text = std::fs::read(mnt.join(".optbin/status.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v.get("daemon")?.get("pid")?.as_u64().map(|p| p as u32)
}
