//! The command-line contract: the bank from MBANK_BANK, the JSON documents' keys,
//! `rm`, version prefixes, exit codes.

mod common;

use std::ffi::OsStr;
use std::fs;

use common::{Bank, mbank, run_cmd};
use serde_json::Value;

/// Asserts `v` is an object holding every key in `keys` (more keys are fine).
fn has_keys(v: &Value, keys: &[&str], what: &str) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not an object: {v}"));
    for k in keys {
        assert!(obj.contains_key(*k), "{what} has no key {k:?}: {v}");
    }
}

fn is_version_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

#[test]
fn bank_from_environment() {
    let bank = Bank::new();
    let img = bank.file("d.raw");
    fs::write(&img, common::random_bytes(64 << 10, 91)).unwrap();
    let env_run = |args: &[&OsStr]| {
        let mut c = mbank();
        c.env("MBANK_BANK", &bank.path).args(args);
        run_cmd(c)
    };
    let r = env_run(&[
        OsStr::new("import"),
        OsStr::new("alice/dev"),
        img.as_os_str(),
    ])
    .ok();
    // Without --json, import prints the version id and nothing else on stdout.
    let v = r.stdout.trim();
    assert!(is_version_id(v), "{r}");
    assert_eq!(r.stdout, format!("{v}\n"));
    let ls = env_run(&[OsStr::new("ls"), OsStr::new("--json")])
        .ok()
        .json();
    assert_eq!(ls[0]["machine"], "alice/dev");
    assert_eq!(ls[0]["head"], v);
    // --bank wins over the environment.
    let other = tempfile::tempdir().unwrap();
    let r = env_run(&[
        OsStr::new("--bank"),
        other.path().as_os_str(),
        OsStr::new("ls"),
    ])
    .code(1);
    r.stderr_has(&["not a machine bank"]);
}

#[test]
fn json_documents_have_the_documented_keys() {
    let bank = Bank::new();
    let img = bank.file("d.raw");
    common::write_image(&img, &common::random_bytes(100 << 10, 92), 28 << 10);
    let r = bank.import("alice/dev", &img, &["--chunk-size", "4K"]);
    has_keys(
        &r,
        &[
            "machine",
            "version",
            "parent",
            "head_moved",
            "head",
            "format",
            "disk_size",
            "chunk_size",
            "bytes_read",
            "chunks_total",
            "chunks_zero",
            "chunks_new",
            "chunks_dedup",
            "bytes_stored",
            "seconds",
        ],
        "import --json",
    );
    let v = r["version"].as_str().unwrap();
    assert!(is_version_id(v));
    assert_eq!(r["machine"], "alice/dev");
    assert_eq!(r["parent"], Value::Null);
    assert_eq!(r["head"], v);
    assert_eq!(r["format"], "raw");
    assert_eq!(r["disk_size"], 128 << 10);
    assert_eq!(r["chunk_size"], 4096);
    assert_eq!(r["chunks_total"], 32);
    assert_eq!(r["chunks_zero"], 7);
    assert_eq!(r["chunks_new"], 25);
    assert_eq!(r["chunks_dedup"], 0);
    assert!(r["bytes_stored"].as_u64().unwrap() > 0);

    let ls = bank.json(&["ls", "--json"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    has_keys(
        &ls[0],
        &[
            "machine",
            "versions",
            "head",
            "disk_size",
            "chunk_size",
            "created_ms",
            "updated_ms",
        ],
        "ls --json",
    );
    assert_eq!(ls[0]["versions"], 1);
    assert_eq!(ls[0]["head"], v);
    assert_eq!(ls[0]["disk_size"], 128 << 10);
    assert_eq!(ls[0]["chunk_size"], 4096);

    let log = bank.log("alice/dev");
    assert_eq!(log.len(), 1);
    has_keys(
        &log[0],
        &[
            "version",
            "machine",
            "parent",
            "head",
            "created_ms",
            "disk_size",
            "chunk_size",
            "stats",
        ],
        "log --json",
    );
    assert_eq!(log[0]["version"], v);
    assert_eq!(log[0]["head"], true);
    has_keys(
        &log[0]["stats"],
        &["chunks_total", "chunks_zero", "chunks_new", "bytes_stored"],
        "log --json stats",
    );
    assert_eq!(log[0]["stats"]["chunks_new"], 25);

    let out = bank.file("out.raw");
    let e = bank.json(&[
        OsStr::new("-q"),
        OsStr::new("export"),
        OsStr::new("--json"),
        OsStr::new("alice/dev"),
        out.as_os_str(),
    ]);
    has_keys(
        &e,
        &[
            "machine",
            "version",
            "path",
            "disk_size",
            "chunks_read",
            "chunks_zero",
        ],
        "export --json",
    );
    assert_eq!(e["version"], v);
    assert_eq!(e["chunks_read"], 25);
    assert_eq!(fs::read(&out).unwrap(), fs::read(&img).unwrap());

    let ver = bank.verify_ok();
    has_keys(
        &ver,
        &[
            "versions",
            "chunks_checked",
            "damaged_chunks",
            "damaged_indexes",
        ],
        "verify --json",
    );
    assert_eq!(ver["chunks_checked"], 25);
    let gc = bank.gc();
    has_keys(
        &gc,
        &[
            "versions",
            "chunks_referenced",
            "chunks_deleted",
            "temp_files_deleted",
            "live_writers",
            "stale_writers_removed",
        ],
        "gc --json",
    );
    assert_eq!(gc["chunks_referenced"], 25);
    assert_eq!(gc["chunks_deleted"], 0);
    let st = bank.json(&["stats", "--json"]);
    has_keys(
        &st,
        &[
            "machines",
            "versions",
            "chunks",
            "bytes_stored",
            "logical_bytes",
            "chunks_referenced",
        ],
        "stats --json",
    );
    assert_eq!(st["chunks"], 25);
    assert_eq!(st["machines"], 1);
}

#[test]
fn rm_version_moves_head_back_and_rm_machine_forgets_it() {
    let bank = Bank::new();
    let imgs: Vec<_> = (0..3)
        .map(|i| {
            let p = bank.file(&format!("v{i}.raw"));
            // Each version shares its first 64K with the others and adds 64K of its own.
            let mut d = common::random_bytes(64 << 10, 100);
            d.extend(common::random_bytes(64 << 10, 101 + i));
            fs::write(&p, d).unwrap();
            p
        })
        .collect();
    let ids: Vec<String> = imgs
        .iter()
        .map(|p| {
            bank.import("alice/dev", p, &["--chunk-size", "4K"])["version"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let other = bank.file("bob.raw");
    fs::write(&other, common::random_bytes(32 << 10, 200)).unwrap();
    bank.import("bob/dev", &other, &[]);
    let chunks_all = bank.json(&["stats", "--json"])["chunks"].as_u64().unwrap();

    // Removing the head moves it to the removed version's parent.
    let rm = bank.json(&["-q", "rm", "--json", &format!("alice/dev@{}", &ids[2][..8])]);
    assert_eq!(rm["removed"], serde_json::json!([ids[2]]), "{rm}");
    assert_eq!(rm["head"], ids[1], "{rm}");
    assert_eq!(bank.head("alice/dev").as_deref(), Some(&*ids[1]));
    assert_eq!(bank.log("alice/dev").len(), 2);
    bank.assert_exports("alice/dev", &imgs[1]);
    // The removed version is gone: its prefix no longer resolves.
    let r = bank
        .run(&[
            OsStr::new("export"),
            OsStr::new(&format!("alice/dev@{}", &ids[2][..8])),
            bank.file("gone.raw").as_os_str(),
        ])
        .code(1);
    r.stderr_has(&[&ids[2][..8]]);
    // Removing a version that is not the head leaves the head alone.
    let rm = bank.json(&["-q", "rm", "--json", &format!("alice/dev@{}", &ids[0][..8])]);
    assert_eq!(rm["head"], ids[1], "{rm}");
    assert_eq!(bank.head("alice/dev").as_deref(), Some(&*ids[1]));

    // gc frees the removed versions' own chunks (16 each), and only those.
    bank.age_chunks();
    let gc = bank.gc();
    assert_eq!(gc["chunks_deleted"], 32, "{gc}");
    let chunks_after = bank.json(&["stats", "--json"])["chunks"].as_u64().unwrap();
    assert_eq!(chunks_after, chunks_all - 32);
    bank.verify_ok();
    bank.assert_exports("alice/dev", &imgs[1]);

    // Removing the machine forgets it and all its versions.
    let rm = bank.json(&["-q", "rm", "--json", "alice/dev"]);
    assert_eq!(rm["removed"], serde_json::json!([ids[1]]), "{rm}");
    let ls = bank.json(&["ls", "--json"]);
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["machine"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bob/dev"]);
    let r = bank.run(&["log", "alice/dev"]).code(1);
    r.stderr_has(&["alice/dev"]);
    bank.age_chunks();
    bank.gc();
    let st = bank.json(&["stats", "--json"]);
    assert_eq!(st["chunks"], chunks_all - 64, "{st}");
    assert_eq!(st["machines"], 1);
    bank.verify_ok();
    bank.assert_exports("bob/dev", &other);
    // rm of a machine that does not exist fails and says so.
    let r = bank.run(&["rm", "alice/dev"]).code(1);
    r.stderr_has(&["alice/dev"]);
}

#[test]
fn version_prefixes() {
    let bank = Bank::new();
    let a = bank.file("a.raw");
    let b = bank.file("b.raw");
    fs::write(&a, common::random_bytes(32 << 10, 110)).unwrap();
    fs::write(&b, common::random_bytes(32 << 10, 111)).unwrap();
    let va = bank.import("alice/dev", &a, &[])["version"]
        .as_str()
        .unwrap()
        .to_string();
    let vb = bank.import("alice/dev", &b, &[])["version"]
        .as_str()
        .unwrap()
        .to_string();
    // 8 digits, all 32, and upper case all name the version.
    let upper = va[..8].to_ascii_uppercase();
    for prefix in [&va[..8], &va[..], upper.as_str(), &va[..4]] {
        if prefix.len() == 4 && vb.starts_with(prefix) {
            continue; // 1 in 65536: the short prefix is ambiguous
        }
        bank.assert_exports(&format!("alice/dev@{prefix}"), &a);
    }
    bank.assert_exports(&format!("alice/dev@{}", &vb[..8]), &b);
    bank.assert_exports("alice/dev", &b);
    // A prefix no version has: a clear error naming it.
    let unknown = (0..)
        .map(|i: u32| format!("{i:08x}"))
        .find(|p| !va.starts_with(p.as_str()) && !vb.starts_with(p.as_str()))
        .unwrap();
    let out = bank.file("never.raw");
    let r = bank
        .run(&[
            OsStr::new("export"),
            OsStr::new(&format!("alice/dev@{unknown}")),
            out.as_os_str(),
        ])
        .code(1);
    r.stderr_has(&[&unknown, "alice/dev", "no version"]);
    assert!(!out.exists());
    // Not hex, or too short: bad usage.
    for bad in ["alice/dev@xyz12345", "alice/dev@abc", "alice/dev@"] {
        let r = bank
            .run(&[OsStr::new("export"), OsStr::new(bad), out.as_os_str()])
            .code(2);
        r.stderr_has(&["version"]);
    }
    // A machine that does not exist.
    let r = bank
        .run(&[
            OsStr::new("export"),
            OsStr::new("carol/dev"),
            out.as_os_str(),
        ])
        .code(1);
    r.stderr_has(&["carol/dev"]);
    assert!(!out.exists());
}

#[test]
fn usage_errors_exit_2() {
    let bank = Bank::new();
    let img = bank.file("d.raw");
    fs::write(&img, vec![1u8; 4096]).unwrap();
    for args in [
        vec!["frobnicate"],
        vec!["import", "alice/dev"],
        vec![
            "import",
            "alice/dev",
            img.to_str().unwrap(),
            "--chunk-size",
            "3K",
        ],
        vec![
            "import",
            "alice/dev",
            img.to_str().unwrap(),
            "--chunk-size",
            "8M",
        ],
        vec![
            "import",
            "alice/dev",
            img.to_str().unwrap(),
            "--level",
            "30",
        ],
        vec![
            "import",
            "alice/dev",
            img.to_str().unwrap(),
            "--format",
            "iso",
        ],
    ] {
        let r = bank.run(&args).code(2);
        assert!(!r.stderr.is_empty());
    }
    assert_eq!(bank.json(&["ls", "--json"]), serde_json::json!([]));
    assert!(bank.chunk_files().is_empty());
}

/// `export` refuses to replace an existing file without --force (which keeps the old
/// file until the export is complete), writes through a symlink instead of replacing
/// it, and writes into a device in place.
#[test]
fn export_refuses_an_existing_file_without_force_and_writes_through_symlinks() {
    let bank = Bank::new();
    let img = bank.file("d.raw");
    fs::write(
        &img,
        (0..64 * 1024u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    bank.import("alice/dev", &img, &[]);
    let out = bank.file("out.raw");
    fs::write(&out, b"precious").unwrap();
    let r = bank.run(&[
        OsStr::new("export"),
        OsStr::new("alice/dev"),
        out.as_os_str(),
    ]);
    r.failed().stderr_has(&["exists", "--force"]);
    assert_eq!(
        fs::read(&out).unwrap(),
        b"precious",
        "the file is untouched"
    );

    // Through a symlink: the link stays a link, the file it names gets the disk.
    let link = bank.file("link.raw");
    std::os::unix::fs::symlink("out.raw", &link).unwrap();
    bank.run(&[
        OsStr::new("export"),
        OsStr::new("alice/dev"),
        link.as_os_str(),
    ])
    .failed()
    .stderr_has(&["exists"]);
    bank.run(&[
        OsStr::new("export"),
        OsStr::new("alice/dev"),
        link.as_os_str(),
        OsStr::new("--force"),
    ])
    .ok();
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read(&out).unwrap(), fs::read(&img).unwrap());
    // A dangling link: the file it names is made.
    let dangling = bank.file("dangling.raw");
    std::os::unix::fs::symlink("made.raw", &dangling).unwrap();
    bank.run(&[
        OsStr::new("export"),
        OsStr::new("alice/dev"),
        dangling.as_os_str(),
    ])
    .ok();
    assert!(
        fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        fs::read(bank.file("made.raw")).unwrap(),
        fs::read(&img).unwrap()
    );
    // A device is written in place, no --force needed.
    bank.run(&["export", "alice/dev", "/dev/null"]).ok();
}

/// `import -` reads the image from standard input (qcow2 too), leaves no temp file,
/// and names standard input in its errors.
#[test]
fn import_reads_standard_input() {
    let bank = Bank::new();
    let img = bank.file("d.raw");
    let mut data = vec![0u8; 1 << 20];
    for (i, b) in data[300_000..700_000].iter_mut().enumerate() {
        *b = (i % 253) as u8 + 1;
    }
    fs::write(&img, &data).unwrap();
    let tmp = bank.file("tmp");
    fs::create_dir(&tmp).unwrap();
    let import = |machine: &str, input: &std::path::Path| {
        let mut c = bank.cmd();
        c.args(["import", "--json", machine, "-", "--tmpdir"])
            .arg(&tmp)
            .stdin(fs::File::open(input).unwrap());
        run_cmd(c)
    };
    let r = import("alice/dev", &img).ok();
    assert_eq!(r.json()["disk_size"], 1 << 20, "{r}");
    bank.assert_exports("alice/dev", &img);
    let qcow = bank.file("d.qcow2");
    let q = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&img)
        .arg(&qcow)
        .status()
        .unwrap();
    assert!(q.success());
    let r = import("alice/q", &qcow).ok();
    assert_eq!(r.json()["format"], "qcow2", "{r}");
    bank.assert_exports("alice/q", &img);
    let odd = bank.file("odd");
    fs::write(&odd, b"not a disk").unwrap();
    import("alice/odd", &odd)
        .failed()
        .stderr_has(&["standard input", "512-byte sectors"]);
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "no temp file is left"
    );
}

/// `-j 0` is refused as a usage error; sizes take decimals (`1.5G`) but not a fraction
/// of a byte.
#[test]
fn zero_jobs_are_refused_and_sizes_take_decimals() {
    let bank = Bank::new();
    bank.run(&["-j", "0", "ls"])
        .code(2)
        .stderr_has(&["at least 1"]);
    let r = bank.json(&["create", "alice/pc", "--disk-size", "1.5M", "--json"]);
    assert_eq!(r["disk_size"], 3 << 19, "{r}");
    bank.run(&["create", "alice/pc2", "--disk-size", "0.3"])
        .code(2)
        .stderr_has(&["whole number of bytes"]);
}

/// `attach --socket-mode/--socket-owner` give the socket its mode and group as it
/// appears; bad values are usage errors.
#[test]
fn attach_gives_its_socket_the_mode_and_owner_asked_for() {
    use std::os::unix::fs::MetadataExt;
    let bank = Bank::new();
    let img = bank.file("d.raw");
    fs::write(&img, vec![7u8; 64 * 1024]).unwrap();
    bank.import("alice/dev", &img, &[]);
    let cache = bank.file("cache");
    let a = bank.attach(
        &cache,
        "alice/dev",
        &["--socket-mode", "660", "--socket-owner", ":1"],
    );
    let md = fs::metadata(&a.socket).unwrap();
    assert_eq!(md.mode() & 0o777, 0o660, "{md:?}");
    assert_eq!(md.gid(), 1, "{md:?}");
    drop(a);
    for bad in [
        vec!["--socket-mode", "999"],
        vec!["--socket-owner", "no-such-user-here"],
        vec!["--socket-owner", ":"],
    ] {
        let mut args = vec!["attach", "alice/dev", "--socket", "/nonexistent/x.sock"];
        args.extend(bad);
        bank.run(&args).code(2);
    }
}

/// The libvirt domain of docs/libvirt.md is valid for libvirt: its schema
/// (virt-xml-validate) and its test driver, which parses and defines it.
#[test]
fn the_libvirt_example_is_a_valid_domain() {
    common::require_tool("virt-xml-validate", "libvirt-clients");
    let doc = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/libvirt.md"
    ))
    .unwrap();
    let start = doc.find("```xml\n").expect("an XML block") + 7;
    let xml = &doc[start..start + doc[start..].find("```").unwrap()];
    assert!(xml.contains("transport='unix'"), "{xml}");
    let bank = Bank::new();
    let f = bank.file("domain.xml");
    fs::write(&f, xml).unwrap();
    let mut c = std::process::Command::new("virt-xml-validate");
    c.arg(&f).arg("domain");
    run_cmd(c).ok();
    let mut c = std::process::Command::new("virsh");
    c.args(["-c", "test:///default", "define"]).arg(&f);
    let r = run_cmd(c).ok();
    assert!(r.stdout.contains("alice-dev"), "{r}");
}

/// A global option shows in the help of the commands it applies to only (and is still
/// accepted by the others, so scripts and MBANK_* settings keep working).
#[test]
fn global_options_show_only_where_they_apply() {
    let help = |args: &[&str]| {
        let mut c = mbank();
        c.args(args).arg("--help");
        run_cmd(c).ok().stdout
    };
    let log = help(&["log"]);
    for absent in ["--cache", "--cache-size", "--jobs"] {
        assert!(!log.contains(absent), "log --help shows {absent}:\n{log}");
    }
    assert!(log.contains("--bank") && log.contains("--quiet"), "{log}");
    let attach = help(&["attach"]);
    for present in ["--cache", "--cache-size", "--jobs", "--bank"] {
        assert!(
            attach.contains(present),
            "attach --help lacks {present}:\n{attach}"
        );
    }
    let completions = help(&["completions"]);
    assert!(!completions.contains("--bank"), "{completions}");
    assert!(help(&["admin", "user", "add"]).contains("--bank"));
    let bank = Bank::new();
    bank.run(&["log", "nobody/none", "--cache", "/nonexistent", "-j", "2"])
        .failed()
        .stderr_has(&["no machine named nobody/none"]);
}
