//! Fuzzing of the parsers that read bytes someone else wrote: control commands (any user's
//! write to `.optbin/control` reaches the parser before the root check's answer matters to
//! the grammar), the ELF sniff on the lookup path and the facts read from a binary, the
//! fdata profiles that instrumented runs write into a directory every user can write to,
//! the no_lbr fdata sample count, `/proc/PID/maps` lines (paths are chosen by users), and
//! the proc-connector datagrams.
//!
//! `cargo fuzz` needs a nightly toolchain, which CI machines do not have, so these are
//! proptest properties over byte strategies: random bytes, and mutations (bit flips,
//! overwritten words with edge values, insertions, deletions, truncations) of the seed
//! inputs under `integration/fuzz/corpus/TARGET/` (keep adding inputs there). Each target
//! checks that the parser never panics or hangs, and where the input is well-formed,
//! that it decodes exactly what was encoded.
//!
//! Bounded for the test suite: a fixed seed and `OPTBIN_FUZZ_CASES` cases per target
//! (default 1000). For a longer, exploratory run:
//! `OPTBIN_FUZZ_CASES=200000 OPTBIN_FUZZ_SEED=$RANDOM cargo test --release --test fuzz`.
//! A failure found is saved in `integration/fuzz/regressions/TARGET.txt` (commit it) and
//! tried first on every later run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, RngSeed};

use optbin::control::command::{self, Command};
use optbin::elf::{ElfFacts, Sniff, sniff};
use optbin::measure::proc_connector::{ProcEvent, parse_datagram};
use optbin::profile::fdata::{EdgeProfile, MAX_COUNT};

const DEFAULT_CASES: u32 = 1000;
const DEFAULT_SEED: u64 = 0x0f_2026_1202;

fn cases() -> u32 {
    std::env::var("OPTBIN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES)
}

/// A fixed seed (the same cases every run) unless OPTBIN_FUZZ_SEED says otherwise; failures
/// persisted to `regressions` (a path relative to the package root, where cargo runs tests).
fn config(regressions: &'static str) -> ProptestConfig {
    let seed =
        std::env::var("OPTBIN_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_SEED);
    ProptestConfig {
        cases: cases(),
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(regressions))),
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    }
}

/// The seed inputs of `target` under integration/fuzz/corpus/.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let inputs: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!inputs.is_empty(), "empty corpus {}", dir.display());
    inputs
}

/// One edit of a seed input.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        value: u8,
    },
    /// Overwrites 4 bytes with a value that often breaks length and count fields.
    SetWord {
        at: usize,
        value: u32,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
    /// Repeats a slice (duplicated lines, records, headers).
    Duplicate {
        at: usize,
        len: usize,
    },
}

fn any_mutation() -> impl Strategy<Value = Mutation> {
    let edge_words = prop_oneof![
        Just(0u32),
        Just(1),
        Just(0x7f),
        Just(0xff),
        Just(0xffff),
        Just(0x7fff_ffff),
        Just(0x8000_0000),
        Just(u32::MAX),
        any::<u32>(),
    ];
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        (any::<usize>(), edge_words).prop_map(|(at, value)| Mutation::SetWord { at, value }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..64).prop_map(|(at, len)| Mutation::Delete { at, len }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), 1usize..64).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
    ]
}

fn apply(input: &mut Vec<u8>, m: &Mutation) {
    let n = input.len();
    let pos = |at: usize| if n == 0 { 0 } else { at % n };
    match m {
        Mutation::FlipBit { at, bit } if n > 0 => input[pos(*at)] ^= 1 << bit,
        Mutation::SetByte { at, value } if n > 0 => input[pos(*at)] = *value,
        Mutation::SetWord { at, value } if n >= 4 => {
            let p = pos(*at).min(n - 4);
            input[p..p + 4].copy_from_slice(&value.to_le_bytes());
        }
        Mutation::Insert { at, bytes } => {
            let p = if n == 0 { 0 } else { at % (n + 1) };
            input.splice(p..p, bytes.iter().copied());
        }
        Mutation::Delete { at, len } if n > 0 => {
            let p = pos(*at);
            input.drain(p..(p + len).min(n));
        }
        Mutation::Truncate { at } => input.truncate(if n == 0 { 0 } else { at % n }),
        Mutation::Duplicate { at, len } if n > 0 => {
            let p = pos(*at);
            let slice: Vec<u8> = input[p..(p + len).min(n)].to_vec();
            input.splice(p..p, slice);
        }
        _ => {}
    }
}

/// Random bytes, or a seed input of `corpus` with a few mutations.
fn fuzz_input(corpus: Vec<Vec<u8>>, max_random: usize) -> impl Strategy<Value = Vec<u8>> {
    let mutated = (0..corpus.len(), proptest::collection::vec(any_mutation(), 0..6)).prop_map(
        move |(i, mutations)| {
            let mut input = corpus[i].clone();
            for m in &mutations {
                apply(&mut input, m);
            }
            input
        },
    );
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..max_random),
        3 => mutated,
    ]
}

/// Runs `f` and fails if it takes longer than `limit` (a parser that loops or does work
/// out of proportion to its input).
fn bounded<T>(what: &str, limit: Duration, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    assert!(took < limit, "{what} took {took:?}");
    out
}

// ---- control commands ----------------------------------------------------------------

const VERBS: [&str; 6] = ["pin", "unpin", "exclude", "include", "optimize", "reset"];

fn check_command(bytes: &[u8]) -> Result<(), TestCaseError> {
    let parsed =
        bounded("parsing a control write", Duration::from_secs(1), || command::parse(bytes));
    if let Ok(cmd) = parsed {
        let name = cmd.name();
        prop_assert!(!name.is_empty(), "{cmd:?} from {bytes:?}");
        prop_assert!(!name.chars().any(char::is_whitespace), "{cmd:?} from {bytes:?}");
        // What was accepted has one canonical text, which parses back to the same command.
        let canonical = cmd.to_string();
        prop_assert_eq!(command::parse(canonical.as_bytes()), Ok(cmd.clone()), "{}", canonical);
        let with_newline = format!("{canonical}\n");
        prop_assert_eq!(command::parse(with_newline.as_bytes()), Ok(cmd));
    }
    Ok(())
}

fn valid_command() -> impl Strategy<Value = (Command, String)> {
    let name = prop_oneof!["[a-z][a-z0-9_+-]{0,15}", "/[a-z]{1,8}(/[a-z][a-z0-9_+-]{0,8}){1,3}",];
    (0..VERBS.len() + 1, name).prop_map(|(v, name)| {
        let cmd = match v {
            0 => Command::Pin { name, target: optbin::policy::Pin::Original },
            1 => Command::Pin { name, target: optbin::policy::Pin::Bolted },
            2 => Command::Unpin { name },
            3 => Command::Exclude { name },
            4 => Command::Include { name },
            5 => Command::Optimize { name },
            _ => Command::Reset { name },
        };
        let text = cmd.to_string();
        (cmd, text)
    })
}

proptest! {
    #![proptest_config(config("integration/fuzz/regressions/control.txt"))]

    #[test]
    fn control_commands_never_panic_and_round_trip(bytes in fuzz_input(corpus("control"), 96)) {
        check_command(&bytes)?;
    }

    #[test]
    fn well_formed_control_commands_parse_to_what_they_say((cmd, text) in valid_command()) {
        prop_assert_eq!(command::parse(text.as_bytes()), Ok(cmd.clone()));
        prop_assert_eq!(command::parse(format!("{text}\n").as_bytes()), Ok(cmd));
    }
}

// ---- ELF sniff and facts ---------------------------------------------------------------

/// Seed ELF files: the corpus plus two small programs compiled here (symbols, and
/// stripped), so the seeds match the toolchain that builds the users' programs.
fn elf_seeds() -> Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let src = dir.path().join("p.c");
            std::fs::write(
                &src,
                "int f(int x){return x*3;}\nint main(int c,char**v){return f(c);}\n",
            )
            .unwrap();
            let mut seeds = corpus("elf");
            for (name, flags) in [("sym", &["-Wl,--emit-relocs"][..]), ("stripped", &["-s"][..])] {
                let out = dir.path().join(name);
                let ok = std::process::Command::new("gcc")
                    .args(["-O1", "-o"])
                    .arg(&out)
                    .arg(&src)
                    .args(flags)
                    .status()
                    .expect("running gcc");
                assert!(ok.success());
                seeds.push(std::fs::read(&out).unwrap());
            }
            seeds
        })
        .clone()
}

fn check_elf(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(bytes).unwrap();
    let sniffed = bounded("sniffing", Duration::from_secs(2), || sniff(&file));
    let facts = bounded("reading ELF facts", Duration::from_secs(5), || ElfFacts::parse(bytes));
    match sniffed {
        Ok(Sniff::NotElf) => prop_assert!(!facts.x86_64, "{facts:?}"),
        Ok(Sniff::X86_64 { .. }) => prop_assert!(bytes.starts_with(b"\x7fELF")),
        Ok(Sniff::OtherElf) | Err(_) => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(config("integration/fuzz/regressions/elf.txt"))]

    #[test]
    fn the_elf_sniff_and_facts_never_panic(bytes in fuzz_input(elf_seeds(), 256)) {
        check_elf(&bytes)?;
    }
}

// ---- fdata profiles ------------------------------------------------------------------

fn check_fdata_text(bytes: &[u8]) -> Result<(), TestCaseError> {
    let text = String::from_utf8_lossy(bytes);
    let mut p = EdgeProfile::default();
    let _ = bounded("parsing fdata", Duration::from_secs(1), || p.add_text(&text));
    let _ = optbin::bolt::perf2bolt::fdata_samples(&text);
    // Whatever was accepted writes out as a profile that parses back to itself.
    let mut out = Vec::new();
    p.write(&mut out).unwrap();
    let again = EdgeProfile::merge([String::from_utf8(out).unwrap().as_str()]);
    prop_assert_eq!(again.ok(), Some(p));
    Ok(())
}

type Location = (bool, String, u64);

/// Few distinct locations, so that edges repeat within and across runs and their counts
/// add up; now and then a name of the shapes BOLT writes.
fn location() -> impl Strategy<Value = Location> {
    let name = prop_oneof![
        4 => prop_oneof![Just("main".to_string()), Just("hot_loop".to_string())],
        1 => "[A-Za-z_][A-Za-z0-9_.$/]{0,12}",
    ];
    (any::<bool>(), name, prop_oneof![4 => 0u64..3, 1 => 0u64..0x10_0000])
}

fn loc_text((is_sym, name, off): &Location) -> String {
    format!("{} {name} {off:x}", u8::from(*is_sym))
}

proptest! {
    #![proptest_config(config("integration/fuzz/regressions/fdata.txt"))]

    #[test]
    fn fdata_profiles_never_panic_and_round_trip(bytes in fuzz_input(corpus("fdata"), 200)) {
        check_fdata_text(&bytes)?;
    }

    /// Edges written by instrumented runs add up by edge, whatever their counts: a file in
    /// the instrumentation directory (which any user can write to) cannot wrap a count nor
    /// make one the catalog would store as negative (found by this target: they wrapped).
    #[test]
    fn instrumentation_profiles_sum_by_edge(
        runs in proptest::collection::vec(
            proptest::collection::vec(
                (location(), location(), prop_oneof![0u64..1000, any::<u64>()],
                 prop_oneof![0u64..100_000, any::<u64>()]),
                0..12,
            ),
            1..4,
        )
    ) {
        let mut expected: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
        let texts: Vec<String> = runs
            .iter()
            .map(|edges| {
                let mut text = String::new();
                for (from, to, m, c) in edges {
                    let key = (loc_text(from), loc_text(to));
                    let e = expected.entry(key.clone()).or_default();
                    e.0 = e.0.saturating_add(*m).min(MAX_COUNT);
                    e.1 = e.1.saturating_add(*c).min(MAX_COUNT);
                    text.push_str(&format!("{} {} {m} {c}\n", key.0, key.1));
                }
                text
            })
            .collect();
        let merged = EdgeProfile::merge(texts.iter().map(String::as_str)).unwrap();
        prop_assert_eq!(merged.edges, expected);
    }
}

// ---- /proc/PID/maps ------------------------------------------------------------------

proptest! {
    #![proptest_config(config("integration/fuzz/regressions/maps.txt"))]

    #[test]
    fn proc_maps_lines_never_panic(bytes in fuzz_input(corpus("maps"), 200)) {
        let text = String::from_utf8_lossy(&bytes);
        let maps = bounded("parsing maps", Duration::from_secs(1), || {
            optbin::profile::procmaps::parse_maps(&text)
        });
        // An executable line of the kernel's format always gives its mapping, whatever
        // its path (which users choose).
        let _ = maps;
        let path: String = text.chars().filter(|c| *c != '\n').take(40).collect();
        let line = format!("7f0000000000-7f0000001000 r-xp 00000000 08:01 42   {path}");
        let parsed = optbin::profile::procmaps::parse_maps(&line);
        prop_assert_eq!(parsed.len(), 1, "{}", line);
        prop_assert_eq!((parsed[0].start, parsed[0].end), (0x7f00_0000_0000, 0x7f00_0000_1000));
    }
}

// ---- proc connector ------------------------------------------------------------------

const CN_IDX_PROC: u32 = 1;
const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;

/// One netlink message as the kernel sends it (include/uapi/linux/cn_proc.h).
fn nl_message(idx: u32, what: u32, ts: u64, fields: &[u32]) -> Vec<u8> {
    let mut ev = Vec::new();
    ev.extend_from_slice(&what.to_ne_bytes());
    ev.extend_from_slice(&1u32.to_ne_bytes());
    ev.extend_from_slice(&ts.to_ne_bytes());
    for f in fields {
        ev.extend_from_slice(&f.to_ne_bytes());
    }
    let total = 16 + 20 + ev.len();
    let mut m = Vec::new();
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&3u16.to_ne_bytes()); // NLMSG_DONE
    m.extend_from_slice(&[0u8; 10]);
    m.extend_from_slice(&idx.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // CN_VAL_PROC
    m.extend_from_slice(&[0u8; 8]);
    m.extend_from_slice(&(ev.len() as u16).to_ne_bytes());
    m.extend_from_slice(&[0u8; 2]);
    m.extend_from_slice(&ev);
    while m.len() % 4 != 0 {
        m.push(0);
    }
    m
}

/// An event and its encoding; `None`: a message the decoder must skip (another connector,
/// an event kind the measurer does not use).
fn any_message() -> impl Strategy<Value = (Option<ProcEvent>, Vec<u8>)> {
    let pid = 1i32..i32::MAX;
    prop_oneof![
        (pid.clone(), pid.clone(), any::<u64>()).prop_map(|(p, t, ts)| {
            let m = nl_message(CN_IDX_PROC, PROC_EVENT_FORK, ts, &[1, 1, p as u32, t as u32]);
            (Some(ProcEvent::Fork { child_pid: p, child_tgid: t, ts_ns: ts }), m)
        }),
        (pid.clone(), pid.clone(), any::<u64>()).prop_map(|(p, t, ts)| {
            let m = nl_message(CN_IDX_PROC, PROC_EVENT_EXEC, ts, &[p as u32, t as u32]);
            (Some(ProcEvent::Exec { pid: p, tgid: t, ts_ns: ts }), m)
        }),
        (pid.clone(), pid.clone(), any::<u32>(), any::<u64>()).prop_map(|(p, t, status, ts)| {
            let m = nl_message(CN_IDX_PROC, PROC_EVENT_EXIT, ts, &[p as u32, t as u32, status, 17]);
            (Some(ProcEvent::Exit { pid: p, tgid: t, status, ts_ns: ts }), m)
        }),
        (2u32..100, any::<u64>())
            .prop_map(|(idx, ts)| (None, nl_message(idx, PROC_EVENT_EXEC, ts, &[5, 5]))),
        (
            any::<u32>().prop_filter("a used kind", |w| {
                ![PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_EXIT].contains(w)
            }),
            any::<u64>()
        )
            .prop_map(|(what, ts)| (None, nl_message(CN_IDX_PROC, what, ts, &[1, 2, 3, 4]))),
    ]
}

fn proc_seeds() -> Vec<Vec<u8>> {
    let mut seeds = corpus("proc_connector");
    seeds.push(
        [
            nl_message(CN_IDX_PROC, PROC_EVENT_EXIT, 99, &[42, 42, 0x8b, 17, 1, 1]),
            nl_message(CN_IDX_PROC, PROC_EVENT_EXEC, 7, &[5, 5]),
            nl_message(CN_IDX_PROC, PROC_EVENT_FORK, 8, &[1, 1, 6, 6]),
        ]
        .concat(),
    );
    seeds
}

proptest! {
    #![proptest_config(config("integration/fuzz/regressions/proc_connector.txt"))]

    #[test]
    fn proc_connector_datagrams_never_panic(bytes in fuzz_input(proc_seeds(), 256)) {
        let mut out = Vec::new();
        bounded("decoding a datagram", Duration::from_secs(1), || parse_datagram(&bytes, &mut out));
        prop_assert!(out.len() <= bytes.len() / 36, "{} events from {} bytes", out.len(), bytes.len());
    }

    #[test]
    fn well_formed_datagrams_decode_to_their_events(
        messages in proptest::collection::vec(any_message(), 0..12)
    ) {
        let datagram: Vec<u8> = messages.iter().flat_map(|(_, m)| m.clone()).collect();
        let expected: Vec<ProcEvent> = messages.iter().filter_map(|(e, _)| *e).collect();
        let mut out = Vec::new();
        parse_datagram(&datagram, &mut out);
        prop_assert_eq!(out, expected);
    }
}
