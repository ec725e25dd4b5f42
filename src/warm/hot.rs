//! Where a file's hot code is packed together. BOLT in relocation mode (the mode optbin
//! uses when the binary has relocations) writes the functions it lays out into a new
//! `.text` section, hottest first (`-reorder-functions`), moves their cold blocks out to
//! `.text.cold`, and keeps the original code as `.bolt.org.text`. The new `.text` of such a
//! variant is its packed hot code: the warmer reads those pages back before any other.
//!
//! Only the ELF header, the section headers and the section-name table are read (a few
//! pages at the end of the file), never the symbol table: BOLT's `__hot_start`/`__hot_end`
//! symbols would bound the hot functions more tightly, but reading a large binary's symbol
//! table would pull megabytes into the page cache that no run needs. The warmer only ever
//! reads back pages runs touched, so within `.text` those are the hot ones anyway.
//! In non-relocation mode BOLT rewrites functions in place and packs nothing: no range.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;

/// The byte range of `path` holding a BOLT variant's packed hot code (its new `.text`), or
/// `None` for anything else (not ELF, not a BOLT relocation-mode output).
pub fn packed_hot_text(path: &Path) -> io::Result<Option<Range<u64>>> {
    use object::read::elf::{FileHeader, SectionHeader};
    use object::{LittleEndian, elf};

    let file = File::open(path)?;
    let cache = object::ReadCache::new(&file);
    let Ok(header) = elf::FileHeader64::<LittleEndian>::parse(&cache) else { return Ok(None) };
    let endian = LittleEndian;
    if !header.is_little_endian() {
        return Ok(None);
    }
    let Ok(sections) = header.sections(endian, &cache) else { return Ok(None) };
    let mut text = None;
    let (mut original_text, mut bolt_note) = (false, false);
    for section in sections.iter() {
        let Ok(name) = sections.section_name(endian, section) else { continue };
        match name {
            b".text" => text = section.file_range(endian),
            b".bolt.org.text" => original_text = true,
            b".note.bolt_info" => bolt_note = true,
            _ => {}
        }
    }
    Ok(match text {
        Some((offset, size)) if original_text && bolt_note && size > 0 => {
            Some(offset..offset + size)
        }
        _ => None,
    })
}

/// The pages (of `page_size` bytes) that hold any byte of `bytes`.
pub fn pages_of(bytes: &Range<u64>, page_size: u64) -> Range<usize> {
    let start = bytes.start / page_size;
    let end = bytes.end.div_ceil(page_size);
    start as usize..end.max(start) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges_cover_whole_pages() {
        assert_eq!(pages_of(&(0x200000..0x200162), 4096), 512..513);
        assert_eq!(pages_of(&(4095..4097), 4096), 0..2);
        assert_eq!(pages_of(&(8192..8192), 4096), 2..2);
    }

    #[test]
    fn an_ordinary_binary_or_a_script_has_no_packed_hot_text() {
        // This test program is an ELF with a `.text` but no BOLT sections.
        let exe = std::env::current_exe().unwrap();
        assert_eq!(packed_hot_text(&exe).unwrap(), None);
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert_eq!(packed_hot_text(&script).unwrap(), None);
        assert!(packed_hot_text(&dir.path().join("missing")).is_err());
    }
}
