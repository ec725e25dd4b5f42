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
/// The most section headers [`sniff`] reads: ELF's own limit without the extended count
/// (a real binary has a few dozen). Bounds what an untrusted header can make us read: the
/// table is at most 65,535 x 64 bytes (4 MiB), and never more than the file holds.
const MAX_SNIFFED_SECTIONS: u32 = 0xffff;

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

/// Reads the ELF header and the section headers only, through `object`'s ELF reader over
/// a read cache (it reads exactly the ranges it is asked for, bounds-checked against the
/// file's size). A section table the header claims but that is larger than
/// [`MAX_SNIFFED_SECTIONS`] entries or runs past the end of the file counts as "no
/// symbol table": such a file is never served.
pub fn sniff(file: &File) -> io::Result<Sniff> {
    use object::read::elf::{FileHeader, SectionHeader};
    use object::{LittleEndian, elf};

    let mut magic = [0u8; 4];
    if read_up_to(file, &mut magic, 0)? < magic.len() || &magic != ELF_MAGIC {
        return Ok(Sniff::NotElf);
    }
    let cache = object::ReadCache::new(file);
    // Parses only ELFCLASS64 files; `is_little_endian` below refuses big-endian ones.
    let Ok(header) = elf::FileHeader64::<LittleEndian>::parse(&cache) else {
        return Ok(Sniff::OtherElf);
    };
    let endian = LittleEndian;
    if !header.is_little_endian()
        || header.e_machine(endian) != elf::EM_X86_64
        || !matches!(header.e_type(endian), elf::ET_EXEC | elf::ET_DYN)
    {
        return Ok(Sniff::OtherElf);
    }
    let within_bounds = header.shnum(endian, &cache).is_ok_and(|n| n <= MAX_SNIFFED_SECTIONS);
    let has_symtab = within_bounds
        && header
            .section_headers(endian, &cache)
            .is_ok_and(|s| s.iter().any(|sh| sh.sh_type(endian) == elf::SHT_SYMTAB));
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

    /// An x86-64 ELF header (64 bytes) with the given section table fields.
    fn header(shoff: u64, shentsize: u16, shnum: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(ELF_MAGIC);
        h[4] = 2; // ELFCLASS64
        h[5] = 1; // little endian
        h[6] = 1; // EV_CURRENT
        h[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
        h[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        h[20..24].copy_from_slice(&1u32.to_le_bytes());
        h[40..48].copy_from_slice(&shoff.to_le_bytes());
        h[52..54].copy_from_slice(&64u16.to_le_bytes());
        h[58..60].copy_from_slice(&shentsize.to_le_bytes());
        h[60..62].copy_from_slice(&shnum.to_le_bytes());
        h
    }

    fn sniff_bytes(bytes: &[u8]) -> Sniff {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, bytes).unwrap();
        sniff(&File::open(&path).unwrap()).unwrap()
    }

    #[test]
    fn sniff_never_trusts_the_section_table_size() {
        // Claims 65,535 entries of 65,535 bytes (4 GiB) in a 64-byte file: no allocation of
        // that size, no symbol table.
        assert_eq!(sniff_bytes(&header(64, 0xffff, 0xffff)), Sniff::X86_64 { has_symtab: false });
        // Claims a table past the end of the file.
        assert_eq!(sniff_bytes(&header(1 << 40, 64, 10)), Sniff::X86_64 { has_symtab: false });
        // A real table of two entries, the second a SHT_SYMTAB.
        let mut bytes = header(64, 64, 2);
        let mut symtab = vec![0u8; 128];
        symtab[64 + 4..64 + 8].copy_from_slice(&2u32.to_le_bytes());
        bytes.extend_from_slice(&symtab);
        assert_eq!(sniff_bytes(&bytes), Sniff::X86_64 { has_symtab: true });
        // Truncated, 32-bit, big-endian, other machine.
        assert_eq!(sniff_bytes(&bytes[..40]), Sniff::OtherElf);
        let mut class32 = bytes.clone();
        class32[4] = 1;
        assert_eq!(sniff_bytes(&class32), Sniff::OtherElf);
        let mut big = bytes.clone();
        big[5] = 2;
        assert_eq!(sniff_bytes(&big), Sniff::OtherElf);
        let mut arm = bytes.clone();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert_eq!(sniff_bytes(&arm), Sniff::OtherElf);
        assert_eq!(sniff_bytes(b"\x7fEL"), Sniff::NotElf);
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
