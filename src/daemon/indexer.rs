//! The indexer: learns what a binary is, off the exec path.
//!
//! The mount tells it which originals were looked up; it hashes each new or changed file
//! (sha256, streaming, at low priority), reads its ELF facts and records both in the
//! catalog. Serving never waits for it: the original is served without a hash.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::catalog::{Catalog, base};
use crate::clock::Clock;
use crate::elf::ElfFacts;
use crate::identity::{ContentId, FileKey};

/// What the indexer learned about one file.
#[derive(Debug, Clone)]
pub struct Indexed {
    pub path: PathBuf,
    pub key: FileKey,
    pub binary_id: i64,
    pub content: ContentId,
    pub facts: ElfFacts,
}

/// A request to index `path`, which had `key` when it was seen.
#[derive(Debug, Clone)]
pub struct SeenFile {
    pub path: PathBuf,
    pub key: FileKey,
}

/// Runs until shutdown: indexes each seen file once per [`FileKey`], one at a time (a 100 MB
/// binary takes a fraction of a second; the machine has two cores and users on them), and
/// reports each result on `indexed`.
pub async fn run_indexer(
    catalog: Catalog,
    clock: Arc<dyn Clock>,
    mut seen: mpsc::UnboundedReceiver<SeenFile>,
    indexed: mpsc::UnboundedSender<Indexed>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut done: HashMap<PathBuf, FileKey> = HashMap::new();
    loop {
        let file = tokio::select! {
            _ = shutdown.changed() => break,
            f = seen.recv() => match f { Some(f) => f, None => break },
        };
        if done.get(&file.path) == Some(&file.key) {
            continue;
        }
        match index_one(&catalog, clock.as_ref(), &file).await {
            Ok(Some(result)) => {
                done.insert(file.path.clone(), file.key);
                let _ = indexed.send(result);
            }
            Ok(None) => {
                // Known already with this key: nothing to do.
                done.insert(file.path.clone(), file.key);
            }
            Err(e) => {
                tracing::warn!(path = %file.path.display(), error = %format!("{e:#}"), "indexing failed")
            }
        }
    }
}

/// Indexes one file unless the catalog already knows it with the same key. Returns what
/// was learned (also for known files, so callers can rebuild state).
pub async fn index_one(
    catalog: &Catalog,
    clock: &dyn Clock,
    file: &SeenFile,
) -> anyhow::Result<Option<Indexed>> {
    let path_text = file.path.to_string_lossy().into_owned();
    let key = file.key;
    let known = catalog
        .run(move |c| {
            let Some(row) = base::path_row(c, &path_text)? else { return Ok(None) };
            let Some(id) = row.binary_id.filter(|_| row.key == key) else { return Ok(None) };
            Ok(base::binary_by_id(c, id)?.map(|b| (id, b)))
        })
        .await?;
    if let Some((binary_id, row)) = known {
        let content = ContentId::parse(&row.sha256).context("a malformed sha256 in the catalog")?;
        return Ok(Some(Indexed {
            path: file.path.clone(),
            key,
            binary_id,
            content,
            facts: row.facts,
        }));
    }
    let path = file.path.clone();
    let (content, facts, now_key) = tokio::task::spawn_blocking(move || read_file(&path))
        .await
        .context("the hashing task panicked")??;
    if now_key != file.key {
        // Replaced while we read it: the next lookup will report the new version.
        anyhow::bail!("{} changed while it was being indexed", file.path.display());
    }
    let now = clock.unix_secs();
    let path_text = file.path.to_string_lossy().into_owned();
    let facts2 = facts.clone();
    let binary_id = catalog
        .run(move |c| {
            let tx = c.transaction()?;
            let id = base::upsert_binary(&tx, &content, key.size, &facts2, now)?;
            base::upsert_path(&tx, &path_text, Some(id), &key, now)?;
            tx.commit()?;
            Ok(id)
        })
        .await?;
    tracing::info!(path = %file.path.display(), sha256 = %content.short(), "indexed");
    Ok(Some(Indexed { path: file.path.clone(), key, binary_id, content, facts }))
}

/// Hashes and parses at idle I/O and CPU priority; returns the key seen after reading, so
/// a file replaced meanwhile is noticed.
fn read_file(path: &Path) -> anyhow::Result<(ContentId, ElfFacts, FileKey)> {
    crate::daemon::priority::lower_current_thread();
    let content =
        ContentId::of_file(path).with_context(|| format!("hashing {}", path.display()))?;
    let facts =
        ElfFacts::read(path).with_context(|| format!("reading ELF facts of {}", path.display()))?;
    let key = FileKey::of(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((content, facts, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    #[tokio::test]
    async fn indexes_once_and_notices_replacement() {
        let cat = Catalog::in_memory().unwrap();
        let exe = std::env::current_exe().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bin");
        std::fs::copy(&exe, &p).unwrap();
        let seen = SeenFile { path: p.clone(), key: FileKey::of(&p).unwrap() };
        let first = index_one(&cat, &SystemClock, &seen).await.unwrap().unwrap();
        assert_eq!(first.content, ContentId::of_file(&p).unwrap());
        assert!(first.facts.has_symbols);
        let again = index_one(&cat, &SystemClock, &seen).await.unwrap().unwrap();
        assert_eq!(again.binary_id, first.binary_id);

        std::fs::write(dir.path().join("new"), b"#!/bin/sh\n").unwrap();
        std::fs::rename(dir.path().join("new"), &p).unwrap();
        let seen2 = SeenFile { path: p.clone(), key: FileKey::of(&p).unwrap() };
        let second = index_one(&cat, &SystemClock, &seen2).await.unwrap().unwrap();
        assert_ne!(second.binary_id, first.binary_id);
        assert!(!second.facts.is_elf);
    }
}
