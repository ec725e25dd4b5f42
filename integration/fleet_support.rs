//! Real `redis-server` processes for the fleet tests: each on a free loopback port with its
//! own temp dir and config, killed by Drop in every path (panics included). Never port 6379,
//! never a system Redis.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_PASSWORD: &str = "admin-pw";

/// The ACL rules docs/fleet.md gives: a writer may read every optbin key and write only its
/// own contributions (plus the shared index and machine sets); a reader may only read.
pub fn writer_acl(machine: &str, password: &str) -> String {
    format!(
        "user {machine} on >{password} resetkeys %R~optbin:v1:* \
         ~optbin:v1:*:profile:{machine} ~optbin:v1:*:verdicts:{machine} \
         ~optbin:v1:*:machines ~optbin:v1:index resetchannels -@all +@connection \
         +get +getrange +srandmember +zrange +set +sadd +expire +zadd \
         +cluster|slots +cluster|shards +cluster|nodes +info"
    )
}

pub fn reader_acl(machine: &str, password: &str) -> String {
    format!(
        "user {machine} on >{password} resetkeys %R~optbin:v1:* resetchannels -@all \
         +@connection +get +getrange +srandmember +zrange \
         +cluster|slots +cluster|shards +cluster|nodes +info"
    )
}

/// A port that is free now, and its cluster-bus port (+10000) too.
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        let port = l.local_addr().unwrap().port();
        drop(l);
        if port != 6379 && port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

/// One `redis-server`.
pub struct Redis {
    pub port: u16,
    pub dir: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
    /// Serving TLS only (the port is its `tls-port`), with this CA's certificate.
    tls: Option<PathBuf>,
}

/// A private certificate authority and a server certificate it signed for 127.0.0.1, made
/// with the `openssl` command.
pub struct TestCa {
    pub ca_pem: PathBuf,
    pub server_pem: PathBuf,
    pub server_key: PathBuf,
}

impl TestCa {
    pub fn create(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let words = |line: &str| line.split(' ').map(str::to_string).collect::<Vec<_>>();
        let mut ca = words(&format!("req -x509 {key} -keyout ca.key -out ca.pem -days 2"));
        ca.extend(["-subj".into(), "/CN=optbin test CA".into()]);
        openssl(&ca.iter().map(String::as_str).collect::<Vec<_>>());
        let mut csr = words(&format!("req {key} -keyout server.key -out server.csr"));
        csr.extend(["-subj".into(), "/CN=127.0.0.1".into()]);
        openssl(&csr.iter().map(String::as_str).collect::<Vec<_>>());
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        let sign = words(
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
             -days 2 -extfile ext.cnf",
        );
        openssl(&sign.iter().map(String::as_str).collect::<Vec<_>>());
        TestCa {
            ca_pem: dir.join("ca.pem"),
            server_pem: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }
}

impl Redis {
    /// Starts a server with `extra` config lines (ACL users, cluster mode) and an admin user.
    pub fn start(dir: &Path, extra: &str) -> Self {
        Self::start_with(dir, extra, None)
    }

    /// As [`Redis::start`], serving TLS only, with the certificate `ca` signed.
    pub fn start_tls(dir: &Path, extra: &str, ca: &TestCa) -> Self {
        Self::start_with(dir, extra, Some(ca))
    }

    fn start_with(dir: &Path, extra: &str, tls: Option<&TestCa>) -> Self {
        let port = free_port();
        std::fs::create_dir_all(dir).unwrap();
        let conf = dir.join("redis.conf");
        let listen = match tls {
            None => format!("port {port}"),
            Some(ca) => format!(
                "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                 tls-ca-cert-file {}\ntls-auth-clients no\ntls-cluster yes\ntls-replication yes",
                ca.server_pem.display(),
                ca.server_key.display(),
                ca.ca_pem.display()
            ),
        };
        std::fs::write(
            &conf,
            format!(
                "{listen}\nbind 127.0.0.1\ndir {}\nsave \"\"\nappendonly no\n\
                 daemonize no\nlogfile {}\nuser default off\n\
                 user admin on >{ADMIN_PASSWORD} ~* &* +@all\n{extra}\n",
                dir.display(),
                dir.join("redis.log").display()
            ),
        )
        .unwrap();
        let tls = tls.map(|ca| ca.ca_pem.clone());
        let mut r = Redis { port, dir: dir.to_path_buf(), conf, child: None, tls };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server (mount/deps.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            // A TLS server cannot be pinged in plain text: listening is enough there.
            let up = if self.tls.is_some() {
                TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                ping(self.port)
            };
            if up {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not come up: {}", self.port, self.log());
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// Starts again on the same port (empty: persistence is off, as after a lost server).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// `redis-cli` as the admin user (over TLS to a TLS server); returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = admin_cli(self.tls.as_deref())
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (mount/deps.sh installs redis-tools)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether something answers RESP on the port (PONG, or NOAUTH when default is off).
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    s.set_read_timeout(Some(Duration::from_millis(500))).ok();
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if n > 0)
}

/// `redis-cli` as the admin user, over TLS trusting `ca` when given.
fn admin_cli(ca: Option<&Path>) -> Command {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["--user", "admin", "--pass", ADMIN_PASSWORD, "--no-auth-warning"]);
    if let Some(ca) = ca {
        cmd.arg("--tls").arg("--cacert").arg(ca);
    }
    cmd
}

/// A 3-node Redis Cluster on loopback (no replicas).
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub fn start(dir: &Path, acl: &str) -> Self {
        Self::start_with(dir, acl, None)
    }

    /// As [`Cluster::start`], every node serving TLS only (clients and the cluster bus),
    /// with certificates `ca` signed.
    pub fn start_tls(dir: &Path, acl: &str, ca: &TestCa) -> Self {
        Self::start_with(dir, acl, Some(ca))
    }

    fn start_with(dir: &Path, acl: &str, tls: Option<&TestCa>) -> Self {
        let nodes: Vec<Redis> = (0..3)
            .map(|i| {
                let d = dir.join(format!("node{i}"));
                Redis::start_with(
                    &d,
                    &format!(
                        "cluster-enabled yes\ncluster-config-file {}\ncluster-node-timeout 2000\n\
                         masteruser admin\nmasterauth {ADMIN_PASSWORD}\n{acl}",
                        d.join("nodes.conf").display()
                    ),
                    tls,
                )
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut cmd = admin_cli(tls.map(|ca| ca.ca_pem.as_path()));
        cmd.args(["--cluster", "create"]);
        cmd.args(&addrs);
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = cmd.output().expect("redis-cli --cluster create");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let c = Cluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.nodes.iter().all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }
}

/// A credentials file as the daemon accepts it (root's, mode 600).
pub fn credentials(dir: &Path, user: &str, password: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let f = dir.join(format!("{user}.secret"));
    std::fs::write(&f, format!("username = \"{user}\"\npassword = \"{password}\"\n")).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    f
}
