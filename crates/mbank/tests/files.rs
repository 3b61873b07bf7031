//! Files from a version without booting it, through the real binary: `ls`, `cat`,
//! `restore`, `diff` and `mount` on ext4 disks with a GPT or an MBR (made here with
//! mkfs.ext4 -d and sfdisk), and `rename`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Bank;

const DISK_MIB: u64 = 16;
const PART_MIB: u64 = 12;

fn need(tools: &[&str]) {
    for t in tools {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{t} is missing: run scripts/setup.sh");
    }
}

fn sh(c: &mut Command) {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A 16 MiB disk image with a partition table (`label`: gpt or dos) whose first
/// partition (1 MiB in, 12 MiB) holds an ext4 file system made from `files` (or,
/// with `files` None, zeros).
fn disk(dir: &Path, name: &str, label: &str, files: Option<&[(&str, Vec<u8>)]>) -> PathBuf {
    let img = dir.join(format!("{name}.img"));
    let f = fs::File::create(&img).unwrap();
    f.set_len(DISK_MIB << 20).unwrap();
    drop(f);
    let mut c = Command::new("sfdisk");
    c.arg("--quiet").arg(&img);
    c.stdin(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("label: {label}\nstart=2048, size={}\n", PART_MIB * 2048).as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    if let Some(files) = files {
        let root = dir.join(format!("{name}-root"));
        for (p, data) in files {
            let p = root.join(p.trim_start_matches('/'));
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, data).unwrap();
        }
        std::os::unix::fs::symlink("report.txt", root.join("home/u/latest")).unwrap();
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "offset=1048576", "-d"])
            .arg(&root)
            .arg(&img)
            .arg(format!("{PART_MIB}M")));
    }
    img
}

fn report() -> Vec<u8> {
    (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn v1_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("/etc/hostname", b"old-host\n".to_vec()),
        ("/home/u/report.txt", report()),
        ("/home/u/sub/a.txt", b"gone in v2\n".to_vec()),
        ("/home/u/same.txt", b"the same in both\n".to_vec()),
    ]
}

fn v2_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("/etc/hostname", b"new-host\n".to_vec()),
        ("/home/u/report.txt", report()),
        ("/home/u/new.txt", b"new in v2\n".to_vec()),
        ("/home/u/same.txt", b"the same in both\n".to_vec()),
    ]
}

struct Setup {
    bank: Bank,
    cache: PathBuf,
    v1: String,
    v2: String,
}

/// Two versions of alice/dev: v1 on a GPT disk, v2 on an MBR disk.
fn setup() -> Setup {
    need(&["sfdisk", "mkfs.ext4"]);
    let bank = Bank::new();
    let cache = bank.file("cache");
    let scratch = bank.file("img");
    fs::create_dir(&scratch).unwrap();
    let i1 = disk(&scratch, "v1", "gpt", Some(&v1_files()));
    let i2 = disk(&scratch, "v2", "dos", Some(&v2_files()));
    let v1 = bank.import("alice/dev", &i1, &[])["version"]
        .as_str()
        .unwrap()
        .to_string();
    let v2 = bank.import("alice/dev", &i2, &[])["version"]
        .as_str()
        .unwrap()
        .to_string();
    Setup {
        bank,
        cache,
        v1,
        v2,
    }
}

impl Setup {
    fn run(&self, args: &[&str]) -> common::Run {
        let mut a = vec!["--cache", self.cache.to_str().unwrap()];
        a.extend_from_slice(args);
        self.bank.run(&a)
    }
}

#[test]
fn ls_cat_and_restore_read_an_older_version_of_an_ext4_disk() {
    let s = setup();
    let at1 = |p: &str| format!("alice/dev@{}:{p}", s.v1);
    // cat: the older version and the head differ.
    let r = s.run(&["cat", &at1("/etc/hostname")]).ok();
    assert_eq!(r.stdout, "old-host\n");
    let r = s.run(&["cat", "alice/dev:/etc/hostname"]).ok();
    assert_eq!(r.stdout, "new-host\n");
    let r = s
        .run(&["cat", &format!("alice/dev@{}:p1/home/u/same.txt", s.v1)])
        .ok();
    assert_eq!(r.stdout, "the same in both\n");

    // ls, as JSON.
    let v = s.run(&["ls", "--json", &at1("/home/u")]).ok().json();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["latest", "report.txt", "same.txt", "sub"]);
    let e = &v[1];
    assert_eq!(
        (e["type"].as_str(), e["size"].as_u64()),
        (Some("file"), Some(300_000))
    );
    assert_eq!(v[0]["target"], "report.txt");
    assert_eq!(v[3]["type"], "dir");

    // restore: a directory tree, then a file; an existing destination is refused.
    let dest = s.bank.file("restored");
    s.run(&["-q", "restore", &at1("/home/u"), dest.to_str().unwrap()])
        .ok();
    assert!(fs::read(dest.join("report.txt")).unwrap() == report());
    assert_eq!(fs::read(dest.join("sub/a.txt")).unwrap(), b"gone in v2\n");
    assert_eq!(
        fs::read_link(dest.join("latest")).unwrap(),
        Path::new("report.txt")
    );
    let file = s.bank.file("hostname");
    fs::write(&file, "mine\n").unwrap();
    s.run(&["restore", &at1("/etc/hostname"), file.to_str().unwrap()])
        .failed()
        .stderr_has(&["exists", "--force"]);
    assert_eq!(fs::read(&file).unwrap(), b"mine\n");
    s.run(&[
        "-q",
        "restore",
        "--force",
        &at1("/etc/hostname"),
        file.to_str().unwrap(),
    ])
    .ok();
    assert_eq!(fs::read(&file).unwrap(), b"old-host\n");

    // Clear errors: no such path, no such machine, no such version.
    s.run(&["cat", &at1("/etc/nope")])
        .failed()
        .stderr_has(&["no such file or directory", "p1/etc/nope"]);
    s.run(&["cat", &at1("/home")])
        .failed()
        .stderr_has(&["is a directory"]);
    s.run(&["cat", "alice/none:/etc/hostname"])
        .failed()
        .stderr_has(&["alice/none"]);
    s.run(&["cat", "alice/dev@ffffff:/etc/hostname"])
        .failed()
        .stderr_has(&["ffffff"]);
    s.run(&["cat", "alice/dev:p7/etc/hostname"])
        .failed()
        .stderr_has(&["no partition p7", "p1"]);
}

#[test]
fn a_disk_without_a_readable_file_system_is_named_with_what_was_found() {
    need(&["sfdisk"]);
    let bank = Bank::new();
    let cache = bank.file("cache");
    let scratch = bank.file("img");
    fs::create_dir(&scratch).unwrap();
    // Partition 1 holds zeros.
    let img = disk(&scratch, "empty", "dos", None);
    bank.import("alice/blank", &img, &[]);
    let c = cache.to_str().unwrap();
    bank.run(&["--cache", c, "ls", "alice/blank:/"])
        .failed()
        .stderr_has(&["p1", "0x83", "only zeros", "ext2/3/4"]);
    // An ext superblock over damaged metadata: named, with the library's reason.
    let mut bytes = fs::read(disk(&scratch, "bad", "dos", Some(&v1_files()))).unwrap();
    let sb = (1 << 20) + 1024;
    // Block count and first data block set to nonsense, magic kept.
    bytes[sb..sb + 8].fill(0xff);
    bytes[sb + 20..sb + 24].fill(0xff);
    let bad = scratch.join("bad2.img");
    fs::write(&bad, &bytes).unwrap();
    bank.import("alice/bad", &bad, &[]);
    bank.run(&["--cache", c, "cat", "alice/bad:p1/etc/hostname"])
        .failed()
        .stderr_has(&["p1", "ext2/3/4 superblock but cannot be read"]);
}

#[test]
fn diff_lists_chunks_and_the_files_added_removed_and_changed() {
    let s = setup();
    let v = s
        .run(&[
            "diff",
            "--json",
            &format!("alice/dev@{}", s.v1),
            &format!("alice/dev@{}", s.v2),
        ])
        .ok()
        .json();
    assert!(v["chunks_differ"].as_u64().unwrap() > 0, "{v}");
    assert!(v["bytes_differ"].as_u64().unwrap() > 0, "{v}");
    let p = &v["partitions"][0];
    assert_eq!(p["partition"], "p1");
    let list = |k: &str| -> Vec<String> {
        p[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(list("added"), ["/home/u/new.txt"], "{v}");
    assert_eq!(list("removed"), ["/home/u/sub", "/home/u/sub/a.txt"], "{v}");
    assert_eq!(list("changed"), ["/etc/hostname"], "{v}");
    // A version against itself: nothing differs, no file is read.
    let v = s
        .run(&[
            "diff",
            "--json",
            &format!("alice/dev@{}", s.v1),
            &format!("alice/dev@{}", s.v1),
        ])
        .ok()
        .json();
    assert_eq!(v["chunks_differ"], 0);
    assert_eq!(v["partitions"].as_array().unwrap().len(), 0);
}

#[test]
fn rename_keeps_history_and_is_refused_during_a_session() {
    let s = setup();
    let before: Vec<String> = s
        .bank
        .log("alice/dev")
        .iter()
        .map(|v| v["version"].as_str().unwrap().to_string())
        .collect();
    let mut a = s.bank.attach(&s.cache, "alice/dev", &["--read-only"]);
    s.run(&["rename", "alice/dev", "alice/work"])
        .failed()
        .stderr_has(&["session", "alice/dev"]);
    a.signal(libc::SIGTERM);
    a.wait().ok();
    s.run(&["rename", "alice/dev", "bob/dev"])
        .failed()
        .stderr_has(&["keeps the owner", "create bob/dev --from alice/dev"]);
    s.run(&["rename", "alice/dev", "alice/work"]).ok();
    let after: Vec<String> = s
        .bank
        .log("alice/work")
        .iter()
        .map(|v| v["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(after, before);
    s.run(&["log", "alice/dev"])
        .failed()
        .stderr_has(&["alice/dev"]);
    let r = s
        .run(&["cat", &format!("alice/work@{}:/etc/hostname", s.v1)])
        .ok();
    assert_eq!(r.stdout, "old-host\n");
    s.bank.verify_ok();
}

struct Mounted {
    child: std::process::Child,
    dir: PathBuf,
}

impl Mounted {
    fn start(s: &Setup, version: &str, name: &str) -> Mounted {
        let dir = s.bank.file(name);
        fs::create_dir(&dir).unwrap();
        let mut c = s.bank.cmd();
        c.arg("--cache")
            .arg(&s.cache)
            .arg("mount")
            .arg(version)
            .arg(&dir);
        c.stdout(std::process::Stdio::null());
        c.stderr(fs::File::create(s.bank.file(&format!("{name}.stderr"))).unwrap());
        let mut child = c.spawn().unwrap();
        let start = std::time::Instant::now();
        while !dir.join("disk.raw").exists() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "mount ended ({st}): {}",
                    fs::read_to_string(s.bank.file(&format!("{name}.stderr"))).unwrap()
                );
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "not mounted after 60 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Mounted { child, dir }
    }

    /// SIGTERM, then the process must end by itself, having unmounted.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(r, 0);
        let start = std::time::Instant::now();
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "mount did not end after SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(st.success(), "mount ended with {st}");
        assert!(!self.dir.join("disk.raw").exists(), "still mounted");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let path = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: umount2 reads the NUL-terminated path, which lives across the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[test]
fn mount_shows_an_older_version_as_a_disk_image_and_its_files() {
    if !Path::new("/dev/fuse").exists() {
        panic!("/dev/fuse is missing: mount needs FUSE");
    }
    let s = setup();
    let v1 = format!("alice/dev@{}", s.v1);
    let m = Mounted::start(&s, &v1, "mnt");
    assert_eq!(
        fs::read(m.dir.join("p1/etc/hostname")).unwrap(),
        b"old-host\n"
    );
    assert!(fs::read(m.dir.join("p1/home/u/report.txt")).unwrap() == report());
    assert_eq!(
        fs::read_link(m.dir.join("p1/home/u/latest")).unwrap(),
        Path::new("report.txt")
    );
    let mut names: Vec<String> = fs::read_dir(m.dir.join("p1/home/u"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["latest", "report.txt", "same.txt", "sub"]);
    // The whole disk, as the image imported.
    let want = fs::read(s.bank.file("img/v1.img")).unwrap();
    assert!(
        fs::read(m.dir.join("disk.raw")).unwrap() == want,
        "disk.raw differs"
    );
    // Read-only.
    assert!(fs::write(m.dir.join("p1/etc/hostname"), "x").is_err());
    // A second mount of the same version, beside the first, over the same cache.
    let m2 = Mounted::start(&s, &v1, "mnt2");
    assert_eq!(
        fs::read(m2.dir.join("p1/etc/hostname")).unwrap(),
        b"old-host\n"
    );
    m2.stop();
    m.stop();
}
