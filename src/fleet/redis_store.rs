//! [`FleetStore`] over Redis (one server, or a Redis Cluster when several URLs are given),
//! through the `redis` crate. One connection, made on first use and again after a
//! failure; every round trip has a deadline. Values of one identity are read and written in
//! one pipeline (one slot: the keys share a hash tag); the index is a separate command.

use std::time::Duration;

use anyhow::Context;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, IntoConnectionInfo, Pipeline};
use tokio::sync::Mutex;

use super::keys;
use super::settings::{Credentials, Resolved};
use super::store::{FleetStore, Push, PushKind, RawIdentity, Ttl};
use crate::identity::ContentId;

enum Client {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query<T: FromRedisValue>(&mut self, pipe: &Pipeline) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => pipe.query_async(c).await,
            Conn::Cluster(c) => pipe.query_async(c).await,
        }
    }
}

pub struct RedisStore {
    client: Client,
    conn: Mutex<Option<Conn>>,
    timeout: Duration,
}

impl RedisStore {
    /// The store the resolved `[fleet]` settings describe.
    pub fn from_settings(r: &Resolved) -> anyhow::Result<Self> {
        Self::with_ca(&r.urls, r.credentials.as_ref(), r.ca_pem.as_deref(), r.timeout())
    }

    /// Checks the URLs and builds the client; connects on first use.
    pub fn new(
        urls: &[String],
        credentials: Option<&Credentials>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        Self::with_ca(urls, credentials, None, timeout)
    }

    /// As [`RedisStore::new`]; `rediss://` URLs verify the servers' certificates against
    /// `ca_pem` (PEM; one server only, see `FleetSettings::resolve`) when given, else
    /// against the system's trusted roots.
    pub fn with_ca(
        urls: &[String],
        credentials: Option<&Credentials>,
        ca_pem: Option<&[u8]>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let infos = urls
            .iter()
            .map(|u| {
                let info = u
                    .as_str()
                    .into_connection_info()
                    .with_context(|| format!("[fleet] url {u:?} is not a Redis URL"))?;
                Ok(match credentials {
                    Some(c) => {
                        let mut r = info.redis_settings().clone().set_password(&c.password);
                        if let Some(user) = &c.username {
                            r = r.set_username(user);
                        }
                        info.set_redis_settings(r)
                    }
                    None => info,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let client = if infos.len() == 1 {
            let info = infos.into_iter().next().unwrap();
            Client::Single(Box::new(match ca_pem {
                Some(pem) => redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) },
                )
                .context("[fleet] setting up TLS with the ca_file")?,
                None => redis::Client::open(info)?,
            }))
        } else {
            let mut b = redis::cluster::ClusterClientBuilder::new(infos)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1);
            if let Some(c) = credentials {
                b = b.password(&c.password);
                if let Some(u) = &c.username {
                    b = b.username(u);
                }
            }
            if let Some(pem) = ca_pem {
                b = b.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                });
            }
            Client::Cluster(Box::new(b.build().context("[fleet] setting up the cluster client")?))
        };
        Ok(Self { client, conn: Mutex::new(None), timeout })
    }

    async fn connection(&self) -> anyhow::Result<Conn> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let connect = async {
            Ok::<_, redis::RedisError>(match &self.client {
                Client::Single(c) => {
                    let cfg = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(self.timeout))
                        .set_response_timeout(Some(self.timeout));
                    Conn::Single(c.get_multiplexed_async_connection_with_config(&cfg).await?)
                }
                Client::Cluster(c) => Conn::Cluster(c.get_async_connection().await?),
            })
        };
        let conn = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| anyhow::anyhow!("connecting timed out after {:?}", self.timeout))?
            .map_err(describe)?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// One round trip with a deadline; a broken connection is dropped for the next try.
    async fn run<T: FromRedisValue>(&self, conn: &mut Conn, pipe: &Pipeline) -> anyhow::Result<T> {
        match tokio::time::timeout(self.timeout, conn.query(pipe)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.is_unrecoverable_error()
                    || e.is_cluster_error()
                {
                    *self.conn.lock().await = None;
                }
                Err(describe(e))
            }
            Err(_) => {
                *self.conn.lock().await = None;
                anyhow::bail!("no answer within {:?}", self.timeout)
            }
        }
    }

    /// A PING (status, `optbin fleet status`).
    pub async fn ping(&self) -> anyhow::Result<()> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        let _: Vec<String> = self.run(&mut conn, &pipe).await?;
        Ok(())
    }

    /// Memory Redis reports for a key (the benchmark's memory per identity).
    pub async fn memory_usage(&self, key: &str) -> anyhow::Result<u64> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("MEMORY").arg("USAGE").arg(key).arg("SAMPLES").arg(0);
        let (n,): (Option<u64>,) = self.run(&mut conn, &pipe).await?;
        Ok(n.unwrap_or(0))
    }

    /// Runs one raw command (tests and the benchmark).
    pub async fn raw(&self, args: &[&str]) -> anyhow::Result<redis::Value> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        let cmd = pipe.cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let (v,): (redis::Value,) = self.run(&mut conn, &pipe).await?;
        Ok(v)
    }
}

/// The error without anything secret (redis errors never carry the password; the URL is
/// not part of them).
fn describe(e: redis::RedisError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

impl FleetStore for RedisStore {
    async fn push(&self, machine: &str, items: &[Push], ttl: &Ttl) -> anyhow::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        let mut set = tokio::task::JoinSet::new();
        let mut by_content: std::collections::BTreeMap<String, Vec<&Push>> = Default::default();
        for item in items {
            by_content.entry(item.content.hex()).or_default().push(item);
        }
        let mut index = redis::pipe();
        let zadd = index.cmd("ZADD").arg(keys::INDEX);
        for (hex, pushes) in &by_content {
            zadd.arg(ttl.now).arg(hex);
            let content = pushes[0].content;
            let mut pipe = redis::pipe();
            for p in pushes {
                let (key, secs) = match p.kind {
                    PushKind::Profile => (keys::profile(&content, machine), ttl.profile_secs),
                    PushKind::Verdicts => (keys::verdicts(&content, machine), ttl.verdict_secs),
                };
                pipe.cmd("SET").arg(key).arg(&p.bytes).arg("EX").arg(secs.max(1)).ignore();
            }
            let machines = keys::machines(&content);
            pipe.cmd("SADD").arg(&machines).arg(machine).ignore();
            pipe.cmd("EXPIRE").arg(&machines).arg(ttl.verdict_secs.max(ttl.profile_secs)).ignore();
            let mut c = conn.clone();
            let timeout = self.timeout;
            set.spawn(async move {
                tokio::time::timeout(timeout, c.query::<()>(&pipe))
                    .await
                    .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))?
                    .map_err(describe)
            });
        }
        let mut first_error = None;
        while let Some(r) = set.join_next().await {
            if let Err(e) = r.map_err(anyhow::Error::from).and_then(|r| r)
                && first_error.is_none()
            {
                first_error = Some(e);
            }
        }
        if let Some(e) = first_error {
            // Drop the connection so the next round reconnects if it broke.
            *self.conn.lock().await = None;
            return Err(e);
        }
        let _: () = self.run(&mut conn, index.ignore()).await?;
        Ok(())
    }

    async fn pull(
        &self,
        contents: &[ContentId],
        max_machines: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<RawIdentity>> {
        let conn = self.connection().await?;
        let mut set = tokio::task::JoinSet::new();
        for (i, content) in contents.iter().enumerate() {
            let mut c = conn.clone();
            let content = *content;
            let timeout = self.timeout;
            set.spawn(async move {
                let read = async {
                    let mut pipe = redis::pipe();
                    pipe.cmd("SRANDMEMBER").arg(keys::machines(&content)).arg(max_machines);
                    let (machines,): (Vec<String>,) = c.query(&pipe).await?;
                    // Ids that could not be ours are not even looked up.
                    let machines: Vec<String> = machines
                        .into_iter()
                        .filter(|m| keys::check_machine_id(m).is_ok())
                        .collect();
                    let mut raw = RawIdentity::default();
                    if machines.is_empty() {
                        return Ok(raw);
                    }
                    let mut pipe = redis::pipe();
                    for m in &machines {
                        pipe.cmd("GETRANGE").arg(keys::profile(&content, m)).arg(0).arg(max_bytes);
                        pipe.cmd("GETRANGE").arg(keys::verdicts(&content, m)).arg(0).arg(max_bytes);
                    }
                    let values: Vec<Vec<u8>> = c.query(&pipe).await?;
                    for (m, pair) in machines.iter().zip(values.chunks(2)) {
                        if !pair[0].is_empty() {
                            raw.profiles.push((m.clone(), pair[0].clone()));
                        }
                        if !pair[1].is_empty() {
                            raw.verdicts.push((m.clone(), pair[1].clone()));
                        }
                    }
                    Ok::<_, redis::RedisError>(raw)
                };
                let r = tokio::time::timeout(timeout, read)
                    .await
                    .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))
                    .and_then(|r| r.map_err(describe));
                (i, r)
            });
        }
        let mut out = vec![RawIdentity::default(); contents.len()];
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined?;
            match r {
                Ok(raw) => out[i] = raw,
                Err(e) => {
                    *self.conn.lock().await = None;
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    async fn identities(&self, limit: usize) -> anyhow::Result<Vec<(String, i64)>> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(keys::INDEX)
            .arg(0)
            .arg(limit.saturating_sub(1))
            .arg("REV")
            .arg("WITHSCORES");
        let (rows,): (Vec<(String, f64)>,) = self.run(&mut conn, &pipe).await?;
        Ok(rows.into_iter().map(|(k, s)| (k, s as i64)).collect())
    }
}
