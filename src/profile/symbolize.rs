//! File offset -> virtual address -> (function symbol, offset in the function), from the
//! ELF program headers and `.symtab`, read through `object`.
//!
//! Attribution works from file offsets (`ip - map_start + pgoff`), so the PIE load bias
//! never enters: `vaddr = offset - p_offset + p_vaddr` of the PT_LOAD holding the offset.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use object::read::elf::ElfFile64;
use object::{Object, ObjectSegment, ObjectSymbol, ObjectSymbolTable, SymbolKind};

/// Why a binary gets no profile.
pub const STRIPPED: &str = "stripped: no .symtab";

/// One PT_LOAD: file bytes `[offset, offset+filesz)` are mapped at `vaddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    pub offset: u64,
    pub filesz: u64,
    pub vaddr: u64,
}

/// A function symbol covering `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSymbol {
    pub start: u64,
    pub end: u64,
    pub name: Arc<str>,
}

/// A binary's address-to-function map.
#[derive(Debug, Clone)]
pub struct Symbolizer {
    loads: Vec<LoadSegment>,
    /// Sorted by start; one entry per start address (aliases folded).
    functions: Vec<FunctionSymbol>,
}

impl Symbolizer {
    /// Reads `path`; `Ok(Err(reason))` when the file can have no profile (stripped, not
    /// ELF), `Err` when it could not be read.
    pub fn from_file(path: &Path) -> anyhow::Result<Result<Self, String>> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: read-only private mapping; see `ElfFacts::read` for the truncation caveat.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", path.display()))?;
        Ok(Self::from_bytes(&map))
    }

    /// Parses an ELF image; `Err(reason)` when it can have no profile.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let elf = ElfFile64::<object::Endianness>::parse(bytes)
            .map_err(|e| format!("not a 64-bit ELF file: {e}"))?;
        let Some(symtab) = elf.symbol_table() else { return Err(STRIPPED.to_string()) };
        let loads = elf
            .segments()
            .map(|s| {
                let (offset, filesz) = s.file_range();
                LoadSegment { offset, filesz, vaddr: s.address() }
            })
            .filter(|s| s.filesz > 0)
            .collect();
        // (start, end, preference, name): preference orders aliases at one address.
        let mut raw: Vec<(u64, u64, u8, &str)> = symtab
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0 && s.is_definition())
            .filter_map(|s| {
                let name = s.name().ok().filter(|n| !n.is_empty())?;
                let rank = if s.is_weak() {
                    1
                } else if s.is_global() {
                    0
                } else {
                    2
                };
                Some((s.address(), s.address() + s.size(), rank, name))
            })
            .collect();
        if raw.is_empty() {
            return Err("no function symbols in .symtab".to_string());
        }
        raw.sort();
        raw.dedup_by_key(|f| f.0);
        let functions = raw
            .into_iter()
            .map(|(start, end, _, name)| FunctionSymbol { start, end, name: name.into() })
            .collect();
        Ok(Self { loads, functions })
    }

    /// Builds a symbolizer from parts (tests, synthetic inputs). `functions` need not be
    /// sorted; aliases keep the first given.
    pub fn from_parts(loads: Vec<LoadSegment>, mut functions: Vec<FunctionSymbol>) -> Self {
        functions.sort_by_key(|f| f.start);
        functions.dedup_by_key(|f| f.start);
        Self { loads, functions }
    }

    pub fn function_count(&self) -> usize {
        self.functions.len()
    }

    /// The virtual address that file offset `offset` is loaded at.
    pub fn offset_to_vaddr(&self, offset: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|l| offset >= l.offset && offset - l.offset < l.filesz)
            .map(|l| offset - l.offset + l.vaddr)
    }

    /// The function containing `vaddr`, and the offset into it.
    pub fn function_at(&self, vaddr: u64) -> Option<(&Arc<str>, u64)> {
        let idx = self.functions.partition_point(|f| f.start <= vaddr).checked_sub(1)?;
        let f = &self.functions[idx];
        (vaddr < f.end).then(|| (&f.name, vaddr - f.start))
    }

    /// File offset -> (function, offset in function).
    pub fn symbolize_offset(&self, offset: u64) -> Option<(&Arc<str>, u64)> {
        self.function_at(self.offset_to_vaddr(offset)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(start: u64, end: u64, name: &str) -> FunctionSymbol {
        FunctionSymbol { start, end, name: name.into() }
    }

    #[test]
    fn offsets_map_through_the_load_segment_to_functions() {
        // A PIE-like layout: text at file offset 0x1000 is loaded at vaddr 0x1000; data at
        // file offset 0x2e00 is loaded at 0x3e00.
        let s = Symbolizer::from_parts(
            vec![
                LoadSegment { offset: 0, filesz: 0x2000, vaddr: 0 },
                LoadSegment { offset: 0x2e00, filesz: 0x200, vaddr: 0x3e00 },
            ],
            vec![f(0x1100, 0x1180, "hot"), f(0x1000, 0x1040, "main"), f(0x1000, 0x1040, "alias")],
        );
        assert_eq!(s.function_count(), 2);
        assert_eq!(s.offset_to_vaddr(0x2e10), Some(0x3e10));
        assert_eq!(s.offset_to_vaddr(0x2100), None);
        let (name, off) = s.symbolize_offset(0x1123).unwrap();
        assert_eq!((&**name, off), ("hot", 0x23));
        assert_eq!(&**s.symbolize_offset(0x1000).unwrap().0, "main");
        assert!(s.symbolize_offset(0x1050).is_none(), "gap between functions");
        assert!(s.symbolize_offset(0x1180).is_none(), "end is exclusive");
        assert!(s.symbolize_offset(0x10).is_none(), "before the first function");
    }

    #[test]
    fn reads_the_real_symbol_table_of_this_test_binary() {
        let exe = std::env::current_exe().unwrap();
        let bytes = std::fs::read(&exe).unwrap();
        let s = Symbolizer::from_bytes(&bytes).unwrap();
        assert!(s.function_count() > 100);
        // Find `main`'s file offset by hand and symbolize it back.
        let elf = ElfFile64::<object::Endianness>::parse(&*bytes).unwrap();
        let main = elf.symbols().find(|s| s.name() == Ok("main")).unwrap();
        let seg = elf
            .segments()
            .find(|g| main.address() >= g.address() && main.address() < g.address() + g.size())
            .unwrap();
        let offset = main.address() - seg.address() + seg.file_range().0;
        let (name, off) = s.symbolize_offset(offset + 1).unwrap();
        assert_eq!((&**name, off), ("main", 1));
    }

    #[test]
    fn refuses_non_elf_and_symbol_less_input() {
        assert!(
            Symbolizer::from_bytes(b"#!/bin/sh\n").unwrap_err().starts_with("not a 64-bit ELF")
        );
    }
}
