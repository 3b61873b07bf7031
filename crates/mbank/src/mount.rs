//! `mbank mount user/name[@VERSION] DIR`: a read-only FUSE view of a version.
//!
//! `DIR/disk.raw` is the whole disk as an image file, and `DIR/pN/` the files of each
//! partition whose file system `files.rs` can read, all served lazily through the
//! station cache ([`VersionDisk`]): a second mount of the same version, or an attach,
//! finds the chunks the first fetched. Same FUSE crate as `mbank-memfs` (`fuser`, its
//! pure-Rust mount, no libfuse). `ext4-view`'s `Ext4` is single-threaded (`Rc`), so the
//! file systems live on one worker thread that the FUSE threads hand closures to;
//! `disk.raw` is read on the FUSE threads directly. Ends (unmounting) on SIGINT or
//! SIGTERM.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use ext4_view::{Ext4, FileType as ExtType, Metadata};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};
use mbank_bank::Bank;
use mbank_core::MachineRef;
use mbank_station::Station;

use crate::files::{Partition, VersionDisk, open_fs, partitions};

/// A version does not change: the kernel may keep what it learnt.
const TTL: Duration = Duration::from_secs(3600);
const ROOT: u64 = 1;
const RAW: u64 = 2;
const RAW_NAME: &str = "disk.raw";

type Job = Box<dyn FnOnce(&[Ext4]) + Send>;

/// A node: the root, `disk.raw`, or a path in partition `part` (index into `parts`).
#[derive(Clone, PartialEq, Eq, Hash)]
struct Node {
    part: usize,
    path: String,
}

#[derive(Default)]
struct Nodes {
    by_ino: HashMap<u64, Node>,
    by_node: HashMap<Node, u64>,
    next: u64,
}

struct VersionFs {
    disk: Arc<VersionDisk>,
    parts: Vec<Partition>,
    jobs: Mutex<mpsc::Sender<Job>>,
    nodes: Mutex<Nodes>,
    uid: u32,
    gid: u32,
    made: SystemTime,
}

fn time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

impl VersionFs {
    /// Runs `f` on the worker thread that owns the file systems.
    fn on_fs<R: Send + 'static>(&self, f: impl FnOnce(&[Ext4]) -> R + Send + 'static) -> Option<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |fs| {
            let _ = tx.send(f(fs));
        });
        self.jobs.lock().ok()?.send(job).ok()?;
        rx.recv().ok()
    }

    fn ino(&self, node: Node) -> u64 {
        let mut n = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = n.by_node.get(&node) {
            return *i;
        }
        let i = n.next;
        n.next += 1;
        n.by_ino.insert(i, node.clone());
        n.by_node.insert(node, i);
        i
    }

    fn node(&self, ino: u64) -> Option<Node> {
        let n = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        n.by_ino.get(&ino).cloned()
    }

    fn plain(&self, ino: u64, kind: FileType, size: u64, perm: u16) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.made,
            mtime: self.made,
            ctime: self.made,
            crtime: self.made,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn ext_attr(ino: u64, m: &Metadata) -> FileAttr {
        let kind = match m.file_type() {
            ExtType::Directory => FileType::Directory,
            ExtType::Regular => FileType::RegularFile,
            ExtType::Symlink => FileType::Symlink,
            ExtType::BlockDevice => FileType::BlockDevice,
            ExtType::CharacterDevice => FileType::CharDevice,
            ExtType::Fifo => FileType::NamedPipe,
            ExtType::Socket => FileType::Socket,
        };
        let t = time(m.modified().seconds());
        FileAttr {
            ino: INodeNo(ino),
            size: m.len(),
            blocks: m.len().div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm: m.mode() & 0o7777,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: m.uid(),
            gid: m.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        match ino {
            ROOT => return Ok(self.plain(ROOT, FileType::Directory, 0, 0o555)),
            RAW => return Ok(self.plain(RAW, FileType::RegularFile, self.disk.size(), 0o444)),
            _ => {}
        }
        let node = self.node(ino).ok_or(Errno::ENOENT)?;
        self.on_fs(move |fs| {
            fs[node.part]
                .symlink_metadata(node.path.as_str())
                .map(|m| Self::ext_attr(ino, &m))
                .map_err(|_| Errno::ENOENT)
        })
        .unwrap_or(Err(Errno::EIO))
    }

    fn child(parent: &str, name: &str) -> String {
        if parent == "/" {
            format!("/{name}")
        } else {
            format!("{parent}/{name}")
        }
    }

    /// A directory's entries: (name, node, kind).
    fn entries(&self, ino: u64) -> Result<Vec<(String, Option<Node>, FileType)>, Errno> {
        if ino == ROOT {
            let mut v = vec![(RAW_NAME.to_string(), None, FileType::RegularFile)];
            for (k, p) in self.parts.iter().enumerate() {
                let node = Node {
                    part: k,
                    path: "/".into(),
                };
                v.push((p.name.clone(), Some(node), FileType::Directory));
            }
            return Ok(v);
        }
        let node = self.node(ino).ok_or(Errno::ENOENT)?;
        self.on_fs(move |fs| {
            let mut v = Vec::new();
            let dir = fs[node.part]
                .read_dir(node.path.as_str())
                .map_err(|_| Errno::ENOTDIR)?;
            for d in dir {
                let d = d.map_err(|_| Errno::EIO)?;
                let name = d.file_name().display().to_string();
                if name == "." || name == ".." {
                    continue;
                }
                let kind = match d.file_type() {
                    Ok(ExtType::Directory) => FileType::Directory,
                    Ok(ExtType::Symlink) => FileType::Symlink,
                    _ => FileType::RegularFile,
                };
                let path = Self::child(&node.path, &name);
                v.push((
                    name,
                    Some(Node {
                        part: node.part,
                        path,
                    }),
                    kind,
                ));
            }
            Ok(v)
        })
        .unwrap_or(Err(Errno::EIO))
    }
}

impl Filesystem for VersionFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let ino = if parent.0 == ROOT {
            if name == RAW_NAME {
                Some(RAW)
            } else {
                self.parts.iter().position(|p| p.name == name).map(|k| {
                    self.ino(Node {
                        part: k,
                        path: "/".into(),
                    })
                })
            }
        } else {
            self.node(parent.0).map(|n| {
                self.ino(Node {
                    part: n.part,
                    path: Self::child(&n.path, name),
                })
            })
        };
        match ino.map(|i| self.attr(i)) {
            Some(Ok(a)) => reply.entry(&TTL, &a, Generation(0)),
            Some(Err(e)) => reply.error(e),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let Some(node) = self.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let r = self.on_fs(move |fs| {
            fs[node.part]
                .read_link(node.path.as_str())
                .map(|t| t.as_ref().to_vec())
                .map_err(|_| Errno::EINVAL)
        });
        match r.unwrap_or(Err(Errno::EIO)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.attr(ino.0) {
            Ok(a) if a.kind == FileType::RegularFile => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Ok(_) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 == RAW {
            let n = (size as u64).min(self.disk.size().saturating_sub(offset)) as usize;
            let mut buf = vec![0u8; n];
            return match self.disk.read_at(offset, &mut buf) {
                Ok(()) => reply.data(&buf),
                Err(e) => {
                    crate::out::say(&format!("mount: {e}"));
                    reply.error(Errno::EIO)
                }
            };
        }
        let Some(node) = self.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let r = self.on_fs(move |fs| -> Result<Vec<u8>, String> {
            let mut f = fs[node.part]
                .open(node.path.as_str())
                .map_err(|e| e.to_string())?;
            let len = f.metadata().len();
            if offset >= len {
                return Ok(Vec::new());
            }
            f.seek_to(offset).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; (size as u64).min(len - offset) as usize];
            let mut got = 0;
            while got < buf.len() {
                match f.read_bytes(&mut buf[got..]).map_err(|e| e.to_string())? {
                    0 => break,
                    n => got += n,
                }
            }
            buf.truncate(got);
            Ok(buf)
        });
        match r {
            Some(Ok(d)) => reply.data(&d),
            Some(Err(e)) => {
                crate::out::say(&format!("mount: {e}"));
                reply.error(Errno::EIO)
            }
            None => reply.error(Errno::EIO),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.entries(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let dots = [
            (".".to_string(), ino.0, FileType::Directory),
            ("..".to_string(), ROOT, FileType::Directory),
        ];
        let all = dots
            .into_iter()
            .chain(entries.into_iter().map(|(name, node, kind)| {
                let i = node.map_or(RAW, |n| self.ino(n));
                (name, i, kind)
            }));
        for (k, (name, i, kind)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), k as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Mounts version `r` on `dir` until SIGINT or SIGTERM, then unmounts.
pub fn run(
    bank: &Bank,
    station: &Station,
    r: &MachineRef,
    dir: &Path,
    say: &dyn Fn(String),
) -> Result<()> {
    if !dir.is_dir() {
        bail!(
            "{} is not a directory: make an empty directory to mount on",
            dir.display()
        );
    }
    let (_, disk) = VersionDisk::open(bank, station, r)?;
    let disk = Arc::new(disk);
    let all = partitions(&disk)?;
    // The file systems, opened on the worker thread that owns them.
    let (jtx, jrx) = mpsc::channel::<Job>();
    let (otx, orx) = mpsc::channel();
    let wdisk = disk.clone();
    std::thread::Builder::new()
        .name("mount-fs".into())
        .spawn(move || {
            let mut fss = Vec::new();
            let mut readable = Vec::new();
            let mut skipped = Vec::new();
            for p in all {
                match open_fs(&wdisk, &p) {
                    Ok(fs) => {
                        fss.push(fs);
                        readable.push(p);
                    }
                    Err(e) => skipped.push(e.to_string()),
                }
            }
            let _ = otx.send((readable, skipped));
            while let Ok(job) = jrx.recv() {
                job(&fss);
            }
        })
        .context("cannot start the mount's file system thread")?;
    let (parts, skipped) = orx
        .recv()
        .context("the mount's file system thread failed")?;
    for s in skipped {
        say(format!("not shown: {s}"));
    }
    // SAFETY: getuid and getgid only read the process's credentials.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut nodes = Nodes {
        next: 3,
        ..Default::default()
    };
    for k in 0..parts.len() {
        let node = Node {
            part: k,
            path: "/".into(),
        };
        let i = nodes.next;
        nodes.next += 1;
        nodes.by_ino.insert(i, node.clone());
        nodes.by_node.insert(node, i);
    }
    let names: Vec<String> = parts.iter().map(|p| p.name.clone()).collect();
    let what = disk.what.clone();
    let fs = VersionFs {
        disk,
        parts,
        jobs: Mutex::new(jtx),
        nodes: Mutex::new(nodes),
        uid,
        gid,
        made: SystemTime::now(),
    };
    // The signal listeners are set up before the mount exists, so a signal sent once
    // it does always unmounts.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal watcher")?;
    let stop = {
        let _in_rt = rt.enter();
        crate::attach::shutdown_signal()
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("mbank:{what}")),
        fuser::MountOption::Subtype("mbank".into()),
        fuser::MountOption::RO,
    ];
    config.n_threads = Some(4);
    let session = fuser::spawn_mount(fs, dir, &config).map_err(|e| {
        anyhow::anyhow!(
            "cannot mount {what} on {}: {e} (it needs /dev/fuse, and root or fusermount3)",
            dir.display()
        )
    })?;
    say(format!(
        "{what} mounted read-only on {}: {RAW_NAME}{}; Ctrl-C or SIGTERM unmounts",
        dir.display(),
        names.iter().map(|n| format!(", {n}/")).collect::<String>()
    ));
    rt.block_on(stop);
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: umount2 reads the NUL-terminated path, which lives across the call.
    let r = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    let err = (r != 0).then(std::io::Error::last_os_error);
    drop(session);
    if let Some(e) = err {
        bail!("cannot unmount {}: {e}", dir.display());
    }
    say(format!("unmounted {}", dir.display()));
    Ok(())
}
