//! From a binary file with sampled file offsets to a catalog-ready batch: identity (stat
//! key, then sha256, cached per key), ELF facts, and symbolization (cached per content).
//! Runs off the sampling thread: hashing a large binary takes a while, once.

use std::collections::HashMap;
use std::sync::Arc;

use super::attribute::{BinaryFile, FileCounts};
use super::symbolize::Symbolizer;
use crate::catalog::profiles::WindowBatch;
use crate::elf::ElfFacts;
use crate::identity::{ContentId, FileKey};

/// What is known about one file version.
#[derive(Clone)]
pub struct Identified {
    pub content: ContentId,
    pub size: u64,
    pub facts: ElfFacts,
    /// The symbolizer, or why the binary gets no profile.
    pub symbols: Result<Arc<Symbolizer>, String>,
}

/// Why a file's samples were dropped at identification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// The path no longer stats (deleted, unmounted).
    Gone(String),
    /// The file at the path is not the one the process mapped (replaced since).
    Replaced,
}

/// Caches identities per stat key, so each file version is hashed and parsed once.
#[derive(Default)]
pub struct Identifier {
    by_key: HashMap<FileKey, Identified>,
}

impl Identifier {
    pub fn identify(&mut self, file: &BinaryFile) -> Result<Identified, Dropped> {
        let key = FileKey::of(&file.path).map_err(|e| Dropped::Gone(e.to_string()))?;
        if let Some((dev, ino)) = file.mapped
            && (dev, ino) != (key.dev, key.ino)
        {
            return Err(Dropped::Replaced);
        }
        if let Some(known) = self.by_key.get(&key) {
            return Ok(known.clone());
        }
        let content = ContentId::of_file(&file.path).map_err(|e| Dropped::Gone(e.to_string()))?;
        let facts = ElfFacts::read(&file.path).unwrap_or_default();
        let symbols = match Symbolizer::from_file(&file.path) {
            Ok(Ok(s)) => Ok(Arc::new(s)),
            Ok(Err(reason)) => Err(reason),
            Err(e) => Err(format!("{e:#}")),
        };
        // Another key with the same content (a copy, a touch) shares the symbolizer.
        let symbols = self
            .by_key
            .values()
            .find(|i| i.content == content)
            .map(|i| i.symbols.clone())
            .unwrap_or(symbols);
        let id = Identified { content, size: key.size, facts, symbols };
        self.by_key.insert(key, id.clone());
        Ok(id)
    }

    /// Forgets everything (bounded memory: called when the cache grows large).
    pub fn clear(&mut self) {
        self.by_key.clear();
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Turns one binary's raw counts into a window batch, symbolizing offsets when possible.
pub fn to_batch(counts: &FileCounts, symbols: Option<&Symbolizer>) -> WindowBatch {
    let mut batch = WindowBatch {
        own_samples: counts.own_samples(),
        outside_samples: counts.outside,
        variant_samples: counts.variant,
        new_runs: counts.new_runs,
        ..Default::default()
    };
    let Some(sym) = symbols else { return batch };
    let mut per_site: HashMap<(Arc<str>, u64), u64> = HashMap::new();
    for (&offset, &count) in &counts.offsets {
        match sym.symbolize_offset(offset) {
            Some((name, off)) => *per_site.entry((Arc::clone(name), off)).or_default() += count,
            None => batch.unsymbolized += count,
        }
    }
    batch.samples = per_site.into_iter().map(|((n, o), c)| (n.to_string(), o, c)).collect();
    batch.samples.sort();
    for (&(from, to), &(count, mispreds)) in &counts.branches {
        if let (Some((f, fo)), Some((t, to_off))) =
            (sym.symbolize_offset(from), sym.symbolize_offset(to))
        {
            batch.branches.push((f.to_string(), fo, t.to_string(), to_off, mispreds, count));
        }
    }
    batch.branches.sort();
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::symbolize::{FunctionSymbol, LoadSegment};

    #[test]
    fn batches_symbolize_and_count_the_rest_as_unsymbolized() {
        let sym = Symbolizer::from_parts(
            vec![LoadSegment { offset: 0, filesz: 0x3000, vaddr: 0x400000 }],
            vec![FunctionSymbol { start: 0x401000, end: 0x401100, name: "hot".into() }],
        );
        let counts = FileCounts {
            offsets: [(0x1010, 5), (0x1020, 2), (0x2000, 1)].into(),
            branches: [((0x1010, 0x1020), (3, 1))].into(),
            outside: 4,
            variant: 0,
            new_runs: 1,
        };
        let b = to_batch(&counts, Some(&sym));
        assert_eq!(b.samples, vec![("hot".into(), 0x10, 5), ("hot".into(), 0x20, 2)]);
        assert_eq!(b.branches, vec![("hot".into(), 0x10, "hot".into(), 0x20, 1, 3)]);
        assert_eq!((b.own_samples, b.unsymbolized, b.outside_samples, b.new_runs), (8, 1, 4, 1));
        let refused = to_batch(&counts, None);
        assert!(refused.samples.is_empty());
        assert_eq!(refused.own_samples, 8);
    }

    #[test]
    fn identify_checks_the_mapped_inode_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"not elf").unwrap();
        let key = FileKey::of(&p).unwrap();
        let mut idf = Identifier::default();
        let file = BinaryFile { path: p.clone(), mapped: Some((key.dev, key.ino)) };
        let id = idf.identify(&file).unwrap();
        assert_eq!(id.content, ContentId::of_bytes(b"not elf"));
        assert!(id.symbols.unwrap_err().starts_with("not a 64-bit ELF"));
        assert_eq!(idf.len(), 1);
        let stale = BinaryFile { path: p, mapped: Some((key.dev, key.ino + 1)) };
        assert_eq!(idf.identify(&stale).err(), Some(Dropped::Replaced));
        let gone = BinaryFile { path: dir.path().join("nope"), mapped: None };
        assert!(matches!(idf.identify(&gone), Err(Dropped::Gone(_))));
    }
}
