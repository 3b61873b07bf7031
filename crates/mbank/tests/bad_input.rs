//! Bad input and hostile environments: every failure gives a clear message naming the
//! object, a non-zero exit, and leaves the bank as it was.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use common::{Bank, Run, Tmpfs, assert_same_bytes, mbank_run, require_tool, sh};
use serde_json::Value;

/// What must not change when a command fails before it reads any data.
struct Snapshot {
    catalog: Value,
    chunks: BTreeSet<String>,
    files: BTreeSet<PathBuf>,
}

/// A bank with one version of alice/dev.
fn bank_with_a_version() -> (Bank, PathBuf) {
    let bank = Bank::new();
    let img = bank.file("good.raw");
    common::write_image(&img, &common::random_bytes(256 << 10, 81), 256 << 10);
    bank.import("alice/dev", &img, &["--chunk-size", "16K"]);
    (bank, img)
}

fn snapshot(bank: &Bank) -> Snapshot {
    Snapshot {
        catalog: bank.catalog(),
        chunks: bank.chunk_files(),
        files: bank.all_files(),
    }
}

/// The catalog is unchanged and verify passes.
fn assert_catalog_unchanged(bank: &Bank, before: &Snapshot, r: &Run) {
    assert_eq!(bank.catalog(), before.catalog, "catalog changed by:\n{r}");
    bank.verify_ok();
    assert_eq!(
        bank.temp_files(),
        Vec::<PathBuf>::new(),
        "temp files left by:\n{r}"
    );
}

/// ... and no chunk file appeared or went, no file of any kind appeared.
fn assert_bank_unchanged(bank: &Bank, before: &Snapshot, r: &Run) {
    assert_catalog_unchanged(bank, before, r);
    assert_eq!(
        bank.chunk_files(),
        before.chunks,
        "chunk files changed by:\n{r}"
    );
    assert_eq!(
        bank.all_files(),
        before.files,
        "files in the bank changed by:\n{r}"
    );
}

fn import_args<'a>(machine: &'a str, image: &'a Path) -> Vec<&'a OsStr> {
    vec![OsStr::new("import"), OsStr::new(machine), image.as_os_str()]
}

#[test]
fn missing_image_file() {
    let (bank, _) = bank_with_a_version();
    let before = snapshot(&bank);
    let missing = bank.file("no-such-disk.raw");
    let r = bank.run(&import_args("alice/dev", &missing)).code(1);
    r.stderr_has(&["no-such-disk.raw"]);
    assert_bank_unchanged(&bank, &before, &r);
    // A new machine is not created by a failed import either.
    let r = bank.run(&import_args("bob/dev", &missing)).code(1);
    r.stderr_has(&["no-such-disk.raw"]);
    assert_bank_unchanged(&bank, &before, &r);
}

#[test]
fn text_file_is_not_an_image() {
    let (bank, _) = bank_with_a_version();
    let before = snapshot(&bank);
    let notes = bank.file("notes.txt");
    fs::write(
        &notes,
        "Shopping list:\n- milk\n- a new disk image\n".repeat(7),
    )
    .unwrap();
    let r = bank.run(&import_args("alice/dev", &notes)).code(1);
    r.stderr_has(&["notes.txt", "not a disk image"]);
    assert_bank_unchanged(&bank, &before, &r);
    // A directory is not an image either.
    let r = bank.run(&import_args("alice/dev", &bank.scratch)).code(1);
    r.stderr_has(&["scratch", "directory"]);
    assert_bank_unchanged(&bank, &before, &r);
    // Nor is an empty file.
    let empty = bank.file("empty.raw");
    fs::write(&empty, b"").unwrap();
    let r = bank.run(&import_args("alice/dev", &empty)).code(1);
    r.stderr_has(&["empty.raw", "empty"]);
    assert_bank_unchanged(&bank, &before, &r);
}

#[test]
fn truncated_qcow2_is_refused() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    let (bank, _) = bank_with_a_version();
    let q = bank.file("cut.qcow2");
    let qs = q.as_os_str();
    sh(
        "qemu-img",
        &[
            OsStr::new("create"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            qs,
            OsStr::new("8M"),
        ],
    );
    for cmd in [
        "write -P 0x11 0 1M",
        "write -P 0x22 3M 2M",
        "write -P 0x33 7M 512k",
    ] {
        sh(
            "qemu-io",
            &[
                OsStr::new("-f"),
                OsStr::new("qcow2"),
                OsStr::new("-c"),
                OsStr::new(cmd),
                qs,
            ],
        );
    }
    let f = fs::OpenOptions::new().write(true).open(&q).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 3).unwrap();
    drop(f);
    let before = snapshot(&bank);
    let tmpdir = bank.file("convert-tmp");
    fs::create_dir(&tmpdir).unwrap();
    let mut args = import_args("alice/dev", &q);
    args.extend([OsStr::new("--tmpdir"), tmpdir.as_os_str()]);
    let r = bank.run(&args).code(1);
    r.stderr_has(&["cut.qcow2", "qcow2"]);
    assert_bank_unchanged(&bank, &before, &r);
    assert_eq!(
        fs::read_dir(&tmpdir).unwrap().count(),
        0,
        "conversion temp file left"
    );
}

#[test]
fn bad_machine_names_are_refused() {
    let (bank, img) = bank_with_a_version();
    let before = snapshot(&bank);
    let long = format!("alice/{}", "x".repeat(10_000));
    for name in [
        "alice/..",
        "alice/../x",
        "alice/my dev",
        "../etc/passwd",
        "Alice/dev",
        &long,
    ] {
        let r = bank.run(&import_args(name, &img));
        let r = r.failed();
        let shown: String = name.chars().take(40).collect();
        r.stderr_has(&[&shown, "machine name"]);
        assert_bank_unchanged(&bank, &before, &r);
        // Reading commands refuse them the same way.
        let r = bank.run(&["log", name]).failed();
        r.stderr_has(&[&shown]);
        let r = bank
            .run(&[
                OsStr::new("export"),
                OsStr::new(name),
                bank.file("x.raw").as_os_str(),
            ])
            .failed();
        r.stderr_has(&[&shown]);
        assert!(!bank.file("x.raw").exists());
    }
    assert_bank_unchanged(&bank, &before, &bank.run(&["ls"]));
}

#[test]
fn bank_that_is_not_a_bank() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.raw");
    fs::write(&img, common::random_bytes(64 << 10, 82)).unwrap();
    // A directory with other things in it.
    let dir = tmp.path().join("photos");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("cat.jpg"), b"meow").unwrap();
    let before = common::all_files(&dir);
    // A directory that does not exist.
    let missing = tmp.path().join("nowhere");
    for bank in [&dir, &missing] {
        for args in [
            vec![
                OsStr::new("import"),
                OsStr::new("alice/dev"),
                img.as_os_str(),
            ],
            vec![OsStr::new("log"), OsStr::new("alice/dev")],
            vec![OsStr::new("ls")],
            vec![OsStr::new("verify")],
            vec![OsStr::new("gc")],
        ] {
            let mut full = vec![OsStr::new("--bank"), bank.as_os_str()];
            full.extend(args);
            let r = mbank_run(&full).code(1);
            let name = bank.file_name().unwrap().to_str().unwrap();
            r.stderr_has(&[name, "not a machine bank"]);
        }
    }
    assert_eq!(
        common::all_files(&dir),
        before,
        "mbank wrote into a non-bank"
    );
    assert!(!missing.exists(), "mbank created {}", missing.display());
    // No bank at all.
    let r = mbank_run(&["ls"]).code(1);
    r.stderr_has(&["--bank", "MBANK_BANK"]);
    // init refuses a non-empty directory and leaves it alone.
    let r = mbank_run(&[OsStr::new("--bank"), dir.as_os_str(), OsStr::new("init")]).code(1);
    r.stderr_has(&["photos", "not empty"]);
    assert_eq!(common::all_files(&dir), before);
}

#[test]
fn read_only_bank_refuses_writes_and_still_reads() {
    let mnt = Tmpfs::mount("64m");
    let bank = Bank::init_at(&mnt.dir.join("bank"), &mnt.outside);
    let img = bank.file("v1.raw");
    common::write_image(&img, &common::random_bytes(300 << 10, 83), 1 << 20);
    let v1 = bank.import("alice/dev", &img, &["--chunk-size", "4K"]);
    let before = snapshot(&bank);
    mnt.remount_read_only();
    let img2 = bank.file("v2.raw");
    fs::write(&img2, common::random_bytes(128 << 10, 84)).unwrap();
    let r = bank.run(&import_args("alice/dev", &img2)).code(1);
    r.stderr_has(&["read-only", "bank"]);
    // Reading works: log, ls, stats, export (to a writable place), verify.
    assert_eq!(bank.catalog(), before.catalog);
    bank.json(&["stats", "--json"]);
    bank.assert_exports("alice/dev", &img);
    bank.assert_exports(
        &format!("alice/dev@{}", &v1["version"].as_str().unwrap()[..8]),
        &img,
    );
    bank.verify_ok();
    // Other writing commands refuse clearly too.
    for args in [vec!["gc"], vec!["rm", "alice/dev"]] {
        let r = bank.run(&args).code(1);
        r.stderr_has(&["read-only"]);
    }
    assert_eq!(bank.chunk_files(), before.chunks);
    assert_eq!(bank.all_files(), before.files);
    assert_eq!(bank.catalog(), before.catalog);
}

#[test]
fn full_disk_import_fails_cleanly() {
    let mnt = Tmpfs::mount("8m");
    let bank = Bank::init_at(&mnt.dir.join("bank"), &mnt.outside);
    let small = bank.file("small.raw");
    common::write_image(&small, &common::random_bytes(256 << 10, 85), 256 << 10);
    let v1 = bank.import("alice/dev", &small, &["--chunk-size", "4K"]);
    let before = snapshot(&bank);
    let free_before = mnt.free_bytes();
    let big = bank.file("big.raw");
    fs::write(&big, common::random_bytes(32 << 20, 86)).unwrap();
    let r = bank.run(&import_args("alice/dev", &big)).code(1);
    r.stderr_has(&["no space"]);
    assert_eq!(bank.head("alice/dev").as_deref(), v1["version"].as_str());
    assert_catalog_unchanged(&bank, &before, &r);
    // GC frees whatever the failed import left; the bank is back where it was.
    bank.gc();
    assert_eq!(bank.chunk_files(), before.chunks);
    let stats = bank.json(&["stats", "--json"]);
    assert_eq!(stats["chunks"], before.chunks.len(), "{stats}");
    let free_after = mnt.free_bytes();
    assert!(
        free_after + (256 << 10) >= free_before,
        "space not freed: {free_before} bytes free before the import, {free_after} after gc"
    );
    // And the bank still works.
    let small2 = bank.file("small2.raw");
    fs::write(&small2, common::random_bytes(128 << 10, 87)).unwrap();
    let r2 = bank.import("alice/dev", &small2, &[]);
    assert_eq!(r2["parent"], v1["version"]);
    bank.assert_exports("alice/dev", &small2);
    bank.assert_exports(
        &format!("alice/dev@{}", &v1["version"].as_str().unwrap()[..8]),
        &small,
    );
    bank.verify_ok();
}

/// The chunks fit but the version's index does not: the disk fills up while the catalog
/// commits. The index of a sparse 1 GiB disk in 4K chunks is 8 MiB, on a 4 MiB disk.
#[test]
fn full_disk_at_catalog_commit_fails_cleanly() {
    let mnt = Tmpfs::mount("4m");
    let bank = Bank::init_at(&mnt.dir.join("bank"), &mnt.outside);
    let small = bank.file("small.raw");
    fs::write(&small, common::random_bytes(128 << 10, 88)).unwrap();
    let v1 = bank.import("alice/dev", &small, &["--chunk-size", "4K"]);
    let before = snapshot(&bank);
    let sparse = bank.file("sparse.raw");
    {
        let f = fs::File::create(&sparse).unwrap();
        f.set_len(1 << 30).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"one chunk of data", 123 << 20).unwrap();
    }
    let r = bank.run(&import_args("alice/dev", &sparse)).code(1);
    assert_eq!(bank.head("alice/dev").as_deref(), v1["version"].as_str());
    assert_catalog_unchanged(&bank, &before, &r);
    bank.gc();
    let small2 = bank.file("small2.raw");
    fs::write(&small2, common::random_bytes(64 << 10, 89)).unwrap();
    bank.import("alice/dev", &small2, &[]);
    bank.assert_exports("alice/dev", &small2);
    bank.verify_ok();
    // The message says what the user must fix, in the same words as a full disk while
    // storing chunks, and names the bank.
    r.stderr_has(&["no space"]);
    let bank_dir = bank.path.to_string_lossy().into_owned();
    assert!(
        r.stderr.lines().next().unwrap_or("").contains(&bank_dir),
        "the error does not name the bank {bank_dir}:\n{r}"
    );
}

#[test]
fn export_to_a_full_disk_leaves_no_partial_file() {
    let (bank, _) = bank_with_a_version();
    let img = bank.file("big.raw");
    fs::write(&img, common::random_bytes(12 << 20, 90)).unwrap();
    bank.import("alice/big", &img, &["--chunk-size", "64K"]);
    let mnt = Tmpfs::mount("4m");
    let free = mnt.free_bytes();
    let out = mnt.dir.join("big.out");
    let r = bank
        .run(&[
            OsStr::new("export"),
            OsStr::new("alice/big"),
            out.as_os_str(),
        ])
        .code(1);
    r.stderr_has(&["no space"]);
    assert!(!out.exists(), "a failed export left {}", out.display());
    let left = common::all_files(&mnt.dir);
    assert!(
        left.is_empty(),
        "a failed export left files behind: {left:?}"
    );
    assert!(
        mnt.free_bytes() >= free,
        "a failed export did not free its space"
    );
    // The bank is fine, and a smaller version fits.
    bank.verify_ok();
    let out = mnt.dir.join("small.out");
    let got = bank.export("alice/dev", &out);
    assert_same_bytes(&got, &fs::read(bank.file("good.raw")).unwrap(), "export");
}
