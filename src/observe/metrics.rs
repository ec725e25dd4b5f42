//! Prometheus text exposition format (version 0.0.4): optbin's own health, per served
//! binary its measured gain, and the host's USE figures. [`render`] is a pure function of
//! the status report and the USE summary; `.optbin/metrics` (for node_exporter's textfile
//! collector) and the optional HTTP endpoint ([`serve_http`]) serve its bytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::host::UseSummary;
use crate::catalog::base::VariantState;
use crate::control::StatusReport;

/// `[metrics]` in the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Where to serve `GET /metrics` over HTTP, e.g. `127.0.0.1:9187`. Off when unset.
    pub listen: Option<SocketAddr>,
    /// Allows `listen` on an address other than loopback (the metrics name every binary the
    /// machine runs; exposing them is a choice).
    #[serde(default)]
    pub allow_remote: bool,
}

impl MetricsSettings {
    /// Refuses a non-loopback `listen` unless `allow_remote` says so.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(addr) = self.listen
            && !addr.ip().is_loopback()
            && !self.allow_remote
        {
            anyhow::bail!(
                "[metrics] listen = \"{addr}\" is not a loopback address; set allow_remote = true \
                 to expose optbin's metrics beyond this machine"
            );
        }
        Ok(())
    }
}

/// Collects the families, then writes them with their HELP and TYPE lines once each.
#[derive(Default)]
struct Families {
    /// name -> (type, help, samples as `labels value`)
    map: BTreeMap<&'static str, (&'static str, &'static str, Vec<String>)>,
}

impl Families {
    fn add(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        if !value.is_finite() {
            return;
        }
        let labels = if labels.is_empty() {
            String::new()
        } else {
            let parts: Vec<String> =
                labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape_label(v))).collect();
            format!("{{{}}}", parts.join(","))
        };
        self.map
            .entry(name)
            .or_insert((kind, help, Vec::new()))
            .2
            .push(format!("{name}{labels} {value}"));
    }

    fn write(self) -> String {
        let mut out = String::new();
        for (name, (kind, help, samples)) in self.map {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for s in samples {
                let _ = writeln!(out, "{s}");
            }
        }
        out
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The metrics page.
pub fn render(report: &StatusReport, host: Option<&UseSummary>) -> String {
    let mut f = Families::default();
    let sections = &report.subsystems;
    if let Some(p) = &sections.profiler {
        let p = &p.status;
        let counters: [(&'static str, f64, &'static str); 4] = [
            ("optbin_profiler_samples_total", p.samples as f64, "Samples the profiler read."),
            (
                "optbin_profiler_lost_records_total",
                p.lost_records as f64,
                "Records the kernel dropped because a ring buffer was full.",
            ),
            (
                "optbin_profiler_unattributed_samples_total",
                p.unattributed_samples as f64,
                "Samples of programs optbin does not profile.",
            ),
            (
                "optbin_profiler_cpu_seconds_total",
                p.sampler_cpu_secs,
                "CPU seconds the sampling thread used.",
            ),
        ];
        for (name, v, help) in counters {
            f.add(name, "counter", help, &[], v);
        }
    }
    if let Some(p) = &sections.policy {
        let v = p.measurement.runs_measured as f64;
        f.add("optbin_runs_measured_total", "counter", "Runs of served binaries measured.", &[], v);
        let v = p.measurement.runs_without_counters as f64;
        let help = "Of those, runs followed to their exit without counters (a served variant's \
                    runs not sampled).";
        f.add("optbin_runs_without_counters_total", "counter", help, &[], v);
        let b = &p.measurement.bound;
        let help = "Runs of variants bind-mounted over their entry (no request through the mount).";
        f.add("optbin_bound_runs_total", "counter", help, &[], b.execs as f64);
        let help = "Windows in which a bind mount was removed for execs through the mount.";
        f.add("optbin_bound_windows_total", "counter", help, &[], b.windows as f64);
        let help = "Variants bind-mounted over their entry now.";
        f.add("optbin_bound_variants", "gauge", help, &[], b.bound_now as f64);
    }
    if let Some(o) = &sections.optimizer {
        let o = &o.status;
        for (result, v) in [("built", o.built), ("failed", o.failed)] {
            f.add(
                "optbin_bolt_jobs_total",
                "counter",
                "BOLT jobs finished, by result.",
                &[("result", result)],
                v as f64,
            );
        }
        let queued = o.queued.len() as f64;
        f.add("optbin_bolt_jobs_queued", "gauge", "BOLT jobs waiting.", &[], queued);
    }
    f.add(
        "optbin_binaries_seen",
        "gauge",
        "Binaries the mount has seen.",
        &[],
        report.binaries.len() as f64,
    );
    let mut states: BTreeMap<VariantState, u64> = BTreeMap::new();
    for b in &report.binaries {
        for v in &b.variants {
            *states.entry(v.state).or_default() += 1;
        }
    }
    for &state in VariantState::ALL {
        let n = states.get(&state).copied().unwrap_or(0);
        f.add(
            "optbin_variants",
            "gauge",
            "Variants in the catalog, by state.",
            &[("state", state.as_str())],
            n as f64,
        );
    }
    for b in &report.binaries {
        let Some(gain) = b.details.policy().and_then(|p| p.gain.as_ref()) else {
            continue;
        };
        let labels = [("binary", b.path.as_str())];
        {
            let r = gain.ratio;
            f.add(
                "optbin_binary_time_ratio",
                "gauge",
                "Measured time of the variant over the original's (below 1 is faster).",
                &labels,
                r,
            );
        }
        {
            let r = gain.variant_runs as f64;
            f.add(
                "optbin_binary_variant_runs",
                "gauge",
                "Measured runs of the variant.",
                &labels,
                r,
            );
        }
        f.add(
            "optbin_binary_served_optimized",
            "gauge",
            "1 when a variant serves every exec.",
            &labels,
            f64::from(u8::from(b.served.starts_with("variant") && !b.served.contains('%'))),
        );
    }
    if let Some(h) = host {
        for r in &h.resources {
            let labels = [("resource", r.resource.as_str())];
            if let Some(u) = r.utilization {
                f.add(
                    "optbin_host_utilization_ratio",
                    "gauge",
                    "USE: utilization of the resource (0..1).",
                    &labels,
                    u,
                );
            }
            if let Some(s) = r.saturation {
                let labels =
                    [("resource", r.resource.as_str()), ("measure", r.saturation_kind.as_str())];
                f.add(
                    "optbin_host_saturation",
                    "gauge",
                    "USE: saturation of the resource, in the unit its measure label names.",
                    &labels,
                    s,
                );
            }
            if let Some(e) = r.errors {
                f.add(
                    "optbin_host_errors",
                    "gauge",
                    "USE: errors of the resource in the last interval.",
                    &labels,
                    e as f64,
                );
            }
        }
    }
    f.write()
}

/// Serves `GET /metrics` (the latest rendering in `page`) on `addr` until `shutdown`.
/// Anything else gets 404; one request per connection.
pub async fn serve_http(
    addr: SocketAddr,
    page: watch::Receiver<Arc<Vec<u8>>>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for metrics on {addr}"))?;
    tracing::info!(%addr, "serving metrics over HTTP");
    loop {
        let (mut conn, peer) = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a metrics connection failed");
                    continue;
                }
            },
        };
        let page = page.clone();
        tokio::spawn(async move {
            let reply = async {
                let mut buf = vec![0u8; 4096];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
                    let n = conn.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                }
                let head = String::from_utf8_lossy(&buf[..len]);
                let mut first = head.lines().next().unwrap_or("").split_whitespace();
                let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
                let (status, ctype, body): (&str, &str, Vec<u8>) = if method == "GET"
                    && (path == "/metrics" || path.starts_with("/metrics?"))
                {
                    ("200 OK", "text/plain; version=0.0.4; charset=utf-8", page.borrow().to_vec())
                } else {
                    ("404 Not Found", "text/plain", b"only GET /metrics is served here\n".to_vec())
                };
                let header = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                conn.write_all(header.as_bytes()).await?;
                conn.write_all(&body).await?;
                conn.shutdown().await
            };
            let timed = tokio::time::timeout(std::time::Duration::from_secs(10), reply).await;
            if let Ok(Err(e)) = timed {
                tracing::debug!(%peer, error = %e, "metrics request failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bolt::discover::BoltState;
    use crate::bolt::status::OptimizerStatus;
    use crate::control::sections::{DiskCaps, OptimizerMachine, OrError, ProfilerMachine};
    use crate::observe::host::UseRow;
    use crate::profile::ProfilerStatus;

    #[test]
    fn the_page_parses_as_prometheus_text() {
        let mut report = StatusReport::default();
        report.subsystems.profiler = Some(ProfilerMachine {
            status: ProfilerStatus { samples: 12, ..Default::default() },
            disk_caps: DiskCaps { per_binary_bytes: 1, total_bytes: 2 },
            enabled: true,
            summary: String::new(),
            thresholds: Default::default(),
        });
        let mut status = OptimizerStatus::new(&BoltState::Missing { looked_in: vec![] });
        (status.built, status.failed) = (1, 2);
        report.subsystems.optimizer = Some(OptimizerMachine {
            applicability: Default::default(),
            status,
            failures: vec![],
            maturity: Default::default(),
            off: None,
            scratch_dir: "/tmp".into(),
            store: OrError::Read(Default::default()),
            store_dir: "/var/lib/optbin/variants".into(),
            summary: String::new(),
        });
        let host = UseSummary {
            at: 0,
            interval_secs: 10.0,
            resources: vec![UseRow {
                resource: "cpu".into(),
                utilization: Some(0.5),
                saturation_kind: "psi some avg10".into(),
                saturation: Some(0.2),
                errors: None,
                ..Default::default()
            }],
        };
        let text = render(&report, Some(&host));
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        let names: Vec<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
        assert!(names.contains(&"optbin_profiler_samples_total"), "{text}");
        assert!(text.contains("optbin_profiler_samples_total 12\n"), "{text}");
        assert!(text.contains("optbin_bolt_jobs_total{result=\"failed\"} 2\n"), "{text}");
        assert!(text.contains("optbin_bolt_jobs_queued 0\n"), "{text}");
        assert!(names.contains(&"optbin_host_utilization_ratio"));
        assert_eq!(text.matches("# TYPE optbin_bolt_jobs_total").count(), 1, "{text}");
    }

    #[test]
    fn remote_listening_must_be_asked_for() {
        let s: MetricsSettings = toml::from_str("listen = \"0.0.0.0:9187\"").unwrap();
        assert!(s.validate().unwrap_err().to_string().contains("allow_remote"));
        let ok: MetricsSettings = toml::from_str("listen = \"127.0.0.1:9187\"").unwrap();
        ok.validate().unwrap();
        let bad = toml::from_str::<MetricsSettings>("listn = \"127.0.0.1:1\"").unwrap_err();
        assert!(bad.to_string().contains("listn"), "{bad}");
    }
}
