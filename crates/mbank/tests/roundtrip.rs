//! Import then export gives back the same bytes: random raw images (a property test)
//! and a qcow2 image made by qemu-img/qemu-io.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::{Bank, Rng, assert_same_bytes, require_tool, sh};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const SECTOR: u64 = 512;

/// One piece of a generated image.
#[derive(Clone, Debug)]
enum Segment {
    /// `sectors` zero sectors.
    Zeros(u64),
    /// A block of `block_sectors` random sectors (from `seed`), repeated `times` times.
    Repeat {
        block_sectors: u64,
        times: u64,
        seed: u64,
    },
    /// `sectors` random sectors from `seed`.
    Random(u64, u64),
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        // Zero runs, from one sector to a few 64K chunks.
        (1u64..=400).prop_map(Segment::Zeros),
        (1u64..=16, 1u64..=12, any::<u64>()).prop_map(|(b, t, s)| Segment::Repeat {
            block_sectors: b,
            times: t,
            seed: s,
        }),
        (1u64..=160, any::<u64>()).prop_map(|(n, s)| Segment::Random(n, s)),
    ]
}

/// The image's bytes, and the ranges of it that are zero (written as holes when sparse).
fn build(segments: &[Segment]) -> (Vec<u8>, Vec<(u64, u64)>) {
    let mut img = Vec::new();
    let mut holes = Vec::new();
    for s in segments {
        match *s {
            Segment::Zeros(n) => {
                holes.push((img.len() as u64, n * SECTOR));
                img.resize(img.len() + (n * SECTOR) as usize, 0);
            }
            Segment::Repeat {
                block_sectors,
                times,
                seed,
            } => {
                let block = common::random_bytes((block_sectors * SECTOR) as usize, seed);
                for _ in 0..times {
                    img.extend_from_slice(&block);
                }
            }
            Segment::Random(n, seed) => {
                img.extend(common::random_bytes((n * SECTOR) as usize, seed));
            }
        }
    }
    (img, holes)
}

/// Writes the image either densely or with its zero runs as holes.
fn write_image(path: &Path, img: &[u8], holes: &[(u64, u64)], sparse: bool) {
    if !sparse {
        fs::write(path, img).unwrap();
        return;
    }
    let f = fs::File::create(path).unwrap();
    f.set_len(img.len() as u64).unwrap();
    let mut at = 0u64;
    for &(start, len) in holes.iter().chain(std::iter::once(&(img.len() as u64, 0))) {
        if start > at {
            f.write_all_at(&img[at as usize..start as usize], at)
                .unwrap();
        }
        at = at.max(start + len);
    }
}

/// Bytes of `img` in chunks that are not all zero, each rounded up to a 4 KiB block:
/// the most an export may allocate (plus a little file system metadata).
fn nonzero_chunk_bytes(img: &[u8], chunk: usize) -> u64 {
    img.chunks(chunk)
        .filter(|c| c.iter().any(|&b| b != 0))
        .map(|c| (c.len() as u64).div_ceil(4096) * 4096)
        .sum()
}

fn check_round_trip(
    bank: &Bank,
    case: usize,
    segments: &[Segment],
    chunk: u32,
    sparse: bool,
) -> Result<(), TestCaseError> {
    let (img, holes) = build(segments);
    let machine = format!("prop/case{case}");
    let input = bank.file(&format!("in{case}.raw"));
    write_image(&input, &img, &holes, sparse);
    let chunk_arg = format!("{}K", chunk / 1024);
    let r = bank.import(&machine, &input, &["--chunk-size", &chunk_arg]);
    let total = (img.len() as u64).div_ceil(chunk as u64);
    prop_assert_eq!(r["disk_size"].as_u64(), Some(img.len() as u64));
    prop_assert_eq!(r["chunk_size"].as_u64(), Some(chunk as u64));
    prop_assert_eq!(r["chunks_total"].as_u64(), Some(total));
    let zero_chunks = img
        .chunks(chunk as usize)
        .filter(|c| c.iter().all(|&b| b == 0))
        .count() as u64;
    prop_assert_eq!(r["chunks_zero"].as_u64(), Some(zero_chunks), "{}", r);

    let out = bank.file(&format!("out{case}.raw"));
    let got = bank.export(&machine, &out);
    assert_same_bytes(&got, &img, &format!("case {case}: export of {machine}"));
    // The export is sparse where the disk is zero.
    let allocated = fs::metadata(&out).unwrap().blocks() * 512;
    let limit = nonzero_chunk_bytes(&img, chunk as usize) + 64 * 1024;
    prop_assert!(
        allocated <= limit,
        "case {}: export allocates {} bytes, more than the {} its non-zero chunks need",
        case,
        allocated,
        limit
    );

    // The same image again stores nothing new.
    let r2 = bank.import(&machine, &input, &[]);
    prop_assert_eq!(r2["chunks_new"].as_u64(), Some(0), "{}", r2);
    prop_assert_eq!(r2["bytes_stored"].as_u64(), Some(0), "{}", r2);
    prop_assert_eq!(&r2["parent"], &r["version"]);
    prop_assert_eq!(r2["head_moved"].as_bool(), Some(true));
    let v2 = r2["version"].as_str().unwrap();
    bank.assert_exports(&format!("{machine}@{}", &v2[..8]), &input);
    fs::remove_file(&input).unwrap();
    fs::remove_file(&out).unwrap();
    Ok(())
}

#[test]
fn random_images_round_trip_byte_for_byte_and_reimport_stores_nothing() {
    let bank = Bank::new();
    let strategy = (
        prop::collection::vec(segment(), 1..8),
        prop::sample::select(vec![4096u32, 16384, 65536]),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        max_shrink_iters: 64,
        ..Config::default()
    });
    let case = std::cell::Cell::new(0usize);
    let lengths = std::cell::RefCell::new(Vec::new());
    runner
        .run(&strategy, |(segments, chunk, sparse)| {
            let n = case.get();
            case.set(n + 1);
            lengths.borrow_mut().push((build(&segments).0.len(), chunk));
            check_round_trip(&bank, n, &segments, chunk, sparse)
        })
        .unwrap();
    let lengths = lengths.into_inner();
    let mut odd_lengths = 0;
    for (len, chunk) in &lengths {
        if len % *chunk as usize != 0 {
            odd_lengths += 1;
        }
    }
    // The generator must exercise a short last chunk, or the test proves little.
    assert!(
        odd_lengths > 0,
        "no generated image had a partial last chunk: {lengths:?}"
    );
    bank.verify_ok();
}

#[test]
fn mostly_zero_image_exports_sparse() {
    let bank = Bank::new();
    // 16 MiB disk with 3 small islands of data, one of them in the short last chunk.
    let size = (16 << 20) + 3 * 512;
    let mut img = vec![0u8; size];
    let mut rng = Rng::new(7);
    for at in [4096usize, 9 << 20, size - 1024] {
        rng.fill(&mut img[at..at + 1000]);
    }
    let input = bank.file("mostly-zero.raw");
    fs::write(&input, &img).unwrap();
    let r = bank.import("alice/sparse", &input, &["--chunk-size", "16K"]);
    assert_eq!(r["chunks_total"], 1025);
    assert_eq!(r["chunks_zero"], 1022, "{r}");
    assert_eq!(r["chunks_new"], 3, "{r}");
    let out = bank.file("mostly-zero.out");
    let got = bank.export("alice/sparse", &out);
    assert_same_bytes(&got, &img, "export");
    let md = fs::metadata(&out).unwrap();
    assert_eq!(md.len(), size as u64);
    assert!(
        md.blocks() * 512 <= 3 * 16384 + 64 * 1024,
        "export of a 16 MiB disk with 3 non-zero 16K chunks allocates {} bytes",
        md.blocks() * 512
    );
    // Export to standard output gives the same bytes too.
    let mut c = bank.cmd();
    c.args(["-q", "export", "alice/sparse", "-"]);
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "export to -: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_same_bytes(&o.stdout, &img, "export to standard output");
}

fn qemu_io(image: &Path, cmd: &str) {
    sh(
        "qemu-io",
        &[
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-c"),
            OsStr::new(cmd),
            image.as_os_str(),
        ],
    );
}

#[test]
fn qcow2_image_round_trips() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    let bank = Bank::new();
    let q = bank.file("in.qcow2");
    // 8 MiB + 3 sectors: the disk size is not a multiple of the chunk size.
    sh(
        "qemu-img",
        &[
            OsStr::new("create"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            q.as_os_str(),
            OsStr::new(&((8u64 << 20) + 1536).to_string()),
        ],
    );
    qemu_io(&q, "write -P 0xab 1M 256k");
    qemu_io(&q, "write -P 0xcd 3M 1M");
    qemu_io(&q, "write -P 0x01 5000k 3k");
    qemu_io(&q, "write -P 0xef 8M 1536");
    qemu_io(&q, "write -z 3200k 64k"); // zeros inside the 0xcd run
    let r = bank.import("alice/q", &q, &["--chunk-size", "16K"]);
    assert_eq!(r["format"], "qcow2", "{r}");
    assert_eq!(r["disk_size"], (8u64 << 20) + 1536, "{r}");
    let out = bank.file("out.raw");
    bank.export("alice/q", &out);
    let cmp = common::run_cmd({
        let mut c = std::process::Command::new("qemu-img");
        c.args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&q)
            .arg(&out);
        c
    });
    assert_eq!(
        cmp.code,
        Some(0),
        "qemu-img compare says the export differs:\n{cmp}"
    );
    // And the same data as a raw import dedups completely.
    let raw = bank.file("same.raw");
    fs::copy(&out, &raw).unwrap();
    let r2 = bank.import("alice/q", &raw, &[]);
    assert_eq!(r2["format"], "raw");
    assert_eq!(r2["chunks_new"], 0, "{r2}");
    // The conversion's temp file is gone (it goes to --tmpdir).
    let tmpdir = bank.file("qtmp");
    fs::create_dir(&tmpdir).unwrap();
    bank.run(&[
        OsStr::new("-q"),
        OsStr::new("import"),
        OsStr::new("alice/q"),
        q.as_os_str(),
        OsStr::new("--tmpdir"),
        tmpdir.as_os_str(),
    ])
    .ok();
    assert_eq!(fs::read_dir(&tmpdir).unwrap().count(), 0);
    bank.verify_ok();
}

/// Export to a FIFO (as to /dev/null or any device) writes the disk into it in order
/// and leaves it a FIFO: a temp file renamed onto it would replace it.
#[test]
fn export_to_a_fifo_writes_into_it_and_keeps_it() {
    use std::os::unix::fs::FileTypeExt;
    let bank = Bank::new();
    let mut img = vec![0u8; 3 << 20];
    Rng::new(7).fill(&mut img[..(1 << 20) + 5]);
    let p = bank.file("img.raw");
    fs::write(&p, &img).unwrap();
    bank.import("alice/dev", &p, &[]);
    let fifo = bank.file("out.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let reader = std::thread::spawn({
        let fifo = fifo.clone();
        move || fs::read(&fifo).unwrap()
    });
    bank.run(&[
        OsStr::new("-q"),
        OsStr::new("export"),
        OsStr::new("alice/dev"),
        fifo.as_os_str(),
    ])
    .ok();
    assert_same_bytes(&reader.join().unwrap(), &img, "what came out of the FIFO");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}
