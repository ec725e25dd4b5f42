//! Safe mode: what the supervisor serves when the full server keeps crashing.
//!
//! Unmounting would break every command in flight (ECONNABORTED) and, while PATH still
//! names the mount, leave the user guessing. So past the crash limit the supervisor keeps
//! the mount and serves a server that needs none of the state that may be causing the
//! crashes: no catalog, no store, no profiler, no policy. Every file is served as its
//! original (an empty serving table), and `.optbin/status` says why, since when, and when
//! the full server is tried again. Control commands are refused (EAGAIN) until then.

use std::sync::Arc;
use std::time::SystemTime;

use crate::error::FsError;
use crate::fs::{ControlFile, ControlPlane, NoEvents, Overlay, OverlayConfig, ServingTable};

/// Why safe mode is on and what comes next, as status shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SafeModeInfo {
    /// Why the full server was given up on, e.g. "the server crashed 5 times within 10s
    /// (last: killed by signal 11)".
    pub reason: String,
    #[serde(with = "unix_secs")]
    pub since: SystemTime,
    /// When the supervisor tries the full server again.
    #[serde(with = "unix_secs")]
    pub retry_at: SystemTime,
    /// How many times the full server was tried again since safe mode began.
    pub retries: u32,
    pub supervisor_pid: u32,
}

mod unix_secs {
    pub fn serialize<S: serde::Serializer>(
        t: &std::time::SystemTime,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        s.serialize_u64(secs)
    }
}

/// The overlay of the safe server: every file its original.
pub fn overlay(config: OverlayConfig, info: SafeModeInfo) -> anyhow::Result<Arc<Overlay>> {
    // Variants a full server bind-mounted over entries would still be served: remove them
    // (a path walk through the mount, so on a thread of its own until the session answers).
    let mountpoint = config.mountpoint.clone();
    let unbind = std::thread::Builder::new().name("optbin-unbind".into()).spawn(move || {
        let n = super::bind::detach_submounts(&mountpoint);
        if n > 0 {
            tracing::info!(n, "safe mode: removed the bind mounts of served variants");
        }
    });
    if let Err(e) = unbind {
        tracing::warn!(error = %e, "safe mode: could not start removing bind mounts");
    }
    Overlay::new(
        config.clone(),
        ServingTable::new(),
        None,
        Arc::new(SafeControl { info, mountpoint: config.mountpoint.display().to_string() }),
        Arc::new(NoEvents),
    )
}

struct SafeControl {
    info: SafeModeInfo,
    mountpoint: String,
}

impl SafeControl {
    fn text(&self) -> String {
        let i = &self.info;
        format!(
            "optbin SAFE MODE at {}: every file is served as its original, nothing is \
             optimized or measured\n  why:   {}\n  since: {}\n  next:  the full server is \
             tried again at {} (retry {})\n",
            self.mountpoint,
            i.reason,
            humantime::format_rfc3339_seconds(i.since),
            humantime::format_rfc3339_seconds(i.retry_at),
            i.retries + 1,
        )
    }

    fn json(&self) -> Vec<u8> {
        let value = serde_json::json!({
            "mode": "safe",
            "mountpoint": self.mountpoint,
            "safe_mode": self.info,
            "daemon": { "pid": std::process::id(), "supervisor_pid": self.info.supervisor_pid },
            "binaries": [],
            "controls": [],
        });
        let mut bytes = serde_json::to_vec_pretty(&value).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}

const REFUSED: &str = "safe mode: control commands wait for the full server (see status)\n";

impl ControlPlane for SafeControl {
    fn files(&self) -> Vec<ControlFile> {
        let file = |name: &str, mode, writable| ControlFile { name: name.into(), mode, writable };
        vec![
            file("status", 0o444, false),
            file("status.json", 0o444, false),
            file("control", 0o644, true),
            file("last_error", 0o444, false),
        ]
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, FsError> {
        match name {
            "status" => Ok(self.text().into_bytes()),
            "status.json" => Ok(self.json()),
            "control" | "last_error" => Ok(REFUSED.as_bytes().to_vec()),
            _ => Err(FsError::new(libc::ENOENT, format!("no control file {name}"))),
        }
    }

    fn write(&self, _name: &str, uid: u32, _data: &[u8]) -> Result<(), FsError> {
        if uid != 0 {
            return Err(FsError::new(libc::EACCES, "only root may write control"));
        }
        Err(FsError::new(libc::EAGAIN, REFUSED.trim_end()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_says_why_and_when_and_commands_wait() {
        let now = SystemTime::now();
        let control = SafeControl {
            info: SafeModeInfo {
                reason: "the server crashed 5 times within 10s (last: killed by signal 11)".into(),
                since: now,
                retry_at: now + std::time::Duration::from_secs(30),
                retries: 0,
                supervisor_pid: 42,
            },
            mountpoint: "/opt/optbin".into(),
        };
        let text = String::from_utf8(control.read("status").unwrap()).unwrap();
        assert!(text.starts_with("optbin SAFE MODE"), "{text}");
        assert!(text.contains("killed by signal 11"), "{text}");
        let json: serde_json::Value =
            serde_json::from_slice(&control.read("status.json").unwrap()).unwrap();
        assert_eq!(json["mode"], "safe");
        assert_eq!(json["safe_mode"]["supervisor_pid"], 42);
        assert_eq!(control.write("control", 0, b"exclude x").unwrap_err().errno, libc::EAGAIN);
        assert_eq!(control.write("control", 1000, b"exclude x").unwrap_err().errno, libc::EACCES);
    }
}
