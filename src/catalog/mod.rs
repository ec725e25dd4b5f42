//! The catalog: optbin's SQLite database and its one owner.
//!
//! A single thread owns the `rusqlite::Connection`; everybody else holds a cheap
//! [`Catalog`] handle and sends it closures that run on that thread, one at a time. Queries
//! live next to the data they touch (`binaries`, `controls`, ... in this folder, and each
//! subsystem's own tables in its own module), as plain functions over `&Connection`, so
//! they are unit-testable against an in-memory database.

pub mod base;
pub mod bolt_jobs;
pub mod flag_trials;
pub mod health;
mod migrations;
pub mod profile_digests;
pub mod profiles;
pub mod runs;
pub mod variant;

use std::path::Path;
use std::sync::mpsc;
use std::thread;

use anyhow::{Context, anyhow};
use rusqlite::Connection;

pub use migrations::{MIGRATIONS, Migration};

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle to the catalog's owner thread. Clone it freely; the thread ends when the last
/// handle is dropped.
#[derive(Clone)]
pub struct Catalog {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Catalog")
    }
}

impl Catalog {
    /// Opens (creating if needed) the database at `path`, migrates it, and starts its owner.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the catalog directory {}", dir.display()))?;
        }
        make_private(path)?;
        let conn = Connection::open(path)
            .with_context(|| format!("opening the catalog {}", path.display()))?;
        Self::start(conn, &path.display().to_string())
    }

    /// Moves everything the write-ahead log holds into the database file and empties the
    /// log (call on clean stop: the database then stands on its own, and a damaged WAL
    /// can cost nothing). Returns whether the checkpoint completed.
    pub fn checkpoint(&self) -> anyhow::Result<bool> {
        self.run_blocking(|c| {
            let busy: i64 = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
            Ok(busy == 0)
        })
    }

    /// A private in-memory catalog, for tests.
    pub fn in_memory() -> anyhow::Result<Self> {
        Self::start(Connection::open_in_memory()?, ":memory:")
    }

    fn start(mut conn: Connection, name: &str) -> anyhow::Result<Self> {
        configure(&conn).with_context(|| format!("configuring the catalog {name}"))?;
        migrations::migrate(&mut conn).with_context(|| format!("migrating the catalog {name}"))?;
        let (jobs, inbox) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("optbin-catalog".into())
            .spawn(move || {
                for job in inbox {
                    job(&mut conn);
                }
            })
            .context("starting the catalog thread")?;
        Ok(Self { jobs })
    }

    /// Runs `f` on the owner thread and waits for its answer, from async code.
    pub async fn run<R, F>(&self, f: F) -> anyhow::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<R> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.await.map_err(|_| anyhow!("the catalog thread stopped"))?
    }

    /// Runs `f` on the owner thread and waits for its answer, from a plain thread (FUSE
    /// request threads, tests). Never call it from inside the async runtime.
    pub fn run_blocking<R, F>(&self, f: F) -> anyhow::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<R> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().map_err(|_| anyhow!("the catalog thread stopped"))?
    }

    /// Queues `f` without waiting; failures are logged. For writes nobody waits on (events,
    /// "seen" updates) on paths that must not block.
    pub fn spawn<F>(&self, what: &'static str, f: F)
    where
        F: FnOnce(&mut Connection) -> anyhow::Result<()> + Send + 'static,
    {
        let sent = self.send(f, move |r| {
            if let Err(e) = r {
                tracing::warn!(error = %format!("{e:#}"), "catalog write failed: {what}");
            }
        });
        if let Err(e) = sent {
            tracing::warn!(error = %e, "catalog write dropped: {what}");
        }
    }

    fn send<R, F, D>(&self, f: F, deliver: D) -> anyhow::Result<()>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<R> + Send + 'static,
        D: FnOnce(anyhow::Result<R>) + Send + 'static,
    {
        let job: Job = Box::new(move |conn| deliver(f(conn)));
        self.jobs.send(job).map_err(|_| anyhow!("the catalog thread stopped"))
    }
}

/// The catalog says which binaries every user ran, and when: root's only. SQLite gives its
/// `-wal` and `-shm` files the database file's mode.
fn make_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the catalog {}", path.display()))?;
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("making {} private", path.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_thread_answers_in_order() {
        let cat = Catalog::in_memory().unwrap();
        let v: i64 = cat
            .run_blocking(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(v, MIGRATIONS.last().unwrap().version);
    }

    #[test]
    fn reopening_a_file_keeps_data_and_does_not_remigrate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        {
            let cat = Catalog::open(&path).unwrap();
            cat.run_blocking(|c| {
                base::record_event(c, 7, None, "test", "hello")?;
                Ok(())
            })
            .unwrap();
        }
        let cat = Catalog::open(&path).unwrap();
        let n: i64 = cat
            .run_blocking(|c| Ok(c.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(n, 1);
    }
}
