//! What optbin needs to know about an ELF file, read through `object`.
//!
//! Two depths: [`sniff`] reads a few hundred bytes and is cheap enough for the exec path
//! (is it an ELF executable with a symbol table?); [`ElfFacts::read`] maps the whole file
//! and answers everything BOLT's applicability depends on, off the exec path.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use object::{Object, ObjectSection, ObjectSymbol, SectionKind};
use serde::{Deserialize, Serialize};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const SHT_SYMTAB: u32 = 2;

/// The cheap verdict of [`sniff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Not an ELF file at all (a script, data).
    NotElf,
    /// An ELF file optbin cannot work on: another class, byte order, machine or type.
    OtherElf,
    /// An x86-64 ELF executable or shared object.
    X86_64 { has_symtab: bool },
}

/// Reads the ELF header and the section headers only (two small reads).
pub fn sniff(file: &File) -> io::Result<Sniff> {
    let mut hdr = [0u8; 64];
    let n = read_up_to(file, &mut hdr, 0)?;
    if n < 64 || &hdr[..4] != ELF_MAGIC {
        return Ok(Sniff::NotElf);
    }
    // ELFCLASS64, little endian.
    if hdr[4] != 2 || hdr[5] != 1 {
        return Ok(Sniff::OtherElf);
    }
    let u16_at = |o: usize| u16::from_le_bytes([hdr[o], hdr[o + 1]]);
    let e_type = u16_at(16);
    let e_machine = u16_at(18);
    if e_machine != EM_X86_64 || (e_type != ET_EXEC && e_type != ET_DYN) {
        return Ok(Sniff::OtherElf);
    }
    let e_shoff = u64::from_le_bytes(hdr[40..48].try_into().unwrap());
    let e_shentsize = u16_at(58) as usize;
    let e_shnum = u16_at(60) as usize;
    if e_shoff == 0 || e_shnum == 0 || e_shentsize < 8 || e_shnum > 65_000 {
        return Ok(Sniff::X86_64 { has_symtab: false });
    }
    let mut table = vec![0u8; e_shentsize * e_shnum];
    let n = read_up_to(file, &mut table, e_shoff)?;
    let has_symtab = table[..n]
        .chunks_exact(e_shentsize)
        .any(|sh| u32::from_le_bytes(sh[4..8].try_into().unwrap()) == SHT_SYMTAB);
    Ok(Sniff::X86_64 { has_symtab })
}

fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Everything about a binary that decides whether and how BOLT can work on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ElfFacts {
    pub is_elf: bool,
    pub x86_64: bool,
    /// ET_DYN executable (position independent): samples need the load bias removed.
    pub pie: bool,
    /// Has a `.symtab` with function symbols (BOLT refuses binaries without).
    pub has_symbols: bool,
    pub function_symbols: u64,
    /// Has relocations for its code (`-Wl,--emit-relocs`): BOLT's relocation mode.
    pub has_relocs: bool,
    pub text_size: u64,
    /// Already processed by BOLT (it leaves a `.note.bolt_info` section).
    pub bolted: bool,
    pub build_id: Option<String>,
}

impl ElfFacts {
    /// Maps the file and reads its facts. Not for the exec path: it touches the whole
    /// symbol table.
    pub fn read(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: the mapping is read-only and private; a concurrent truncation of the file
        // could fault, which is why callers use files they own or that the system owns.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(Self::parse(&map))
    }

    pub fn parse(bytes: &[u8]) -> Self {
        let Ok(obj) = object::File::parse(bytes) else {
            return Self { is_elf: bytes.starts_with(ELF_MAGIC), ..Self::default() };
        };
        if obj.format() != object::BinaryFormat::Elf {
            return Self::default();
        }
        let x86_64 = obj.architecture() == object::Architecture::X86_64;
        let pie = obj.kind() == object::ObjectKind::Dynamic && obj.entry() != 0;
        let function_symbols =
            obj.symbols().filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 0).count()
                as u64;
        let text_size =
            obj.sections().filter(|s| s.kind() == SectionKind::Text).map(|s| s.size()).sum();
        let has_relocs = obj
            .sections()
            .any(|s| s.name().is_ok_and(|n| n == ".rela.text" || n.starts_with(".rela.text.")));
        let bolted = obj.section_by_name(".note.bolt_info").is_some();
        let build_id = obj.build_id().ok().flatten().map(hex::encode);
        Self {
            is_elf: true,
            x86_64,
            pie,
            has_symbols: function_symbols > 0 && obj.symbol_table().is_some(),
            function_symbols,
            has_relocs,
            text_size,
            bolted,
            build_id,
        }
    }
}

#[cfg(test)]
impl ElfFacts {
    /// A PIE x86-64 executable with symbols and no BOLT note, for tests.
    pub fn for_tests(text_size: u64, has_relocs: bool) -> Self {
        Self {
            is_elf: true,
            x86_64: true,
            pie: true,
            has_symbols: true,
            function_symbols: 10,
            has_relocs,
            text_size,
            bolted: false,
            build_id: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_tells_scripts_from_elf() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s");
        std::fs::write(&script, b"#!/bin/sh\necho hi\n").unwrap();
        assert_eq!(sniff(&File::open(&script).unwrap()).unwrap(), Sniff::NotElf);
        let exe = std::env::current_exe().unwrap();
        assert!(matches!(sniff(&File::open(exe).unwrap()).unwrap(), Sniff::X86_64 { .. }));
    }

    #[test]
    fn facts_of_the_test_binary() {
        let facts = ElfFacts::read(&std::env::current_exe().unwrap()).unwrap();
        assert!(facts.is_elf && facts.x86_64);
        assert!(facts.has_symbols, "test binaries keep their symbols");
        assert!(facts.text_size > 0);
        assert!(!facts.bolted);
    }
}
