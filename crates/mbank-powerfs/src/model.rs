//! The file system's state, with no FUSE in it: a volatile view and a durable one.
//!
//! Every operation changes the volatile view and records what it left unsynced; the
//! sync operations copy that part to the durable state; [`Model::cut`] freezes the
//! durable state (keeping a random part of what was unsynced, if asked) and makes
//! every later operation fail with `EIO`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// The unit of file data the model keeps and loses: 4 KiB, a page and a disk sector.
pub const PAGE: u64 = 4096;

/// The root directory's inode number (as FUSE numbers it).
pub const ROOT: u64 = 1;

type Page = Arc<[u8; PAGE as usize]>;

/// When a change to a directory becomes durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metadata {
    /// Only on fsync of that directory: what POSIX promises, and all a program may
    /// rely on.
    Posix,
    /// On any fsync, fdatasync or directory fsync in the file system, for every
    /// directory: as on a journaling file system (ext4, XFS) whose one journal commits
    /// every earlier namespace change with the fsync.
    Journal,
}

/// How the file system behaves.
#[derive(Clone, Debug)]
pub struct Options {
    pub metadata: Metadata,
    /// At a cut, keep each unsynced page, file size and directory with probability
    /// 1/2, drawn from this seed (a disk's cache writes back some of what it holds
    /// before the power goes). `None`: lose everything unsynced.
    pub keep_unsynced: Option<u64>,
    /// Cut by itself when this many changing or syncing operations have run (the one
    /// that would be number `cut_after + 1` fails): a cut at an exact point.
    pub cut_after: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            metadata: Metadata::Posix,
            keep_unsynced: None,
            cut_after: None,
        }
    }
}

/// A regular file's data: pages (absent = zeros) and a size, volatile and durable.
#[derive(Default)]
struct FileData {
    pages: BTreeMap<u64, Page>,
    size: u64,
    durable: BTreeMap<u64, Page>,
    durable_size: u64,
    /// Pages whose volatile content may differ from the durable one.
    unsynced: BTreeSet<u64>,
}

#[derive(Default)]
struct DirData {
    entries: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
    unsynced: bool,
}

enum Body {
    File(FileData),
    Dir(DirData),
}

/// What `stat` shows of an inode.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub dir: bool,
    pub size: u64,
    /// Bytes of data held (pages present).
    pub allocated: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

struct Inode {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    ctime: SystemTime,
    /// Volatile names (directories count their own).
    nlink: u32,
}

/// The whole file system.
pub struct Model {
    opts: Options,
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    cut: bool,
    /// Changing and syncing operations so far (for [`Options::cut_after`]).
    ops: u64,
    /// Directories with unsynced entries, for [`Metadata::Journal`] syncs.
    dirty_dirs: BTreeSet<u64>,
}

/// What an operation returns: an errno on failure.
pub type Res<T> = Result<T, i32>;

fn zero_page() -> Page {
    Arc::new([0u8; PAGE as usize])
}

impl Model {
    pub fn new(opts: Options) -> Model {
        let now = SystemTime::now();
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT,
            Inode {
                body: Body::Dir(DirData::default()),
                perm: 0o755,
                uid: 0,
                gid: 0,
                mtime: now,
                ctime: now,
                nlink: 2,
            },
        );
        Model {
            opts,
            inodes,
            next_ino: ROOT + 1,
            cut: false,
            ops: 0,
            dirty_dirs: BTreeSet::new(),
        }
    }

    /// Cuts by itself after `n` more changing or syncing operations (see
    /// [`Options::cut_after`]).
    pub fn cut_after(&mut self, n: u64) {
        self.opts.cut_after = Some(self.ops + n);
    }

    /// True once the power was cut.
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Changing and syncing operations that ran.
    pub fn ops(&self) -> u64 {
        self.ops
    }

    /// Fails with EIO after a cut. For operations that only look.
    pub fn alive(&self) -> Res<()> {
        if self.cut { Err(libc::EIO) } else { Ok(()) }
    }

    /// Counts a changing or syncing operation; cuts first if it is one too many.
    fn step(&mut self) -> Res<()> {
        self.alive()?;
        if self.opts.cut_after.is_some_and(|n| self.ops >= n) {
            self.cut();
            return Err(libc::EIO);
        }
        self.ops += 1;
        Ok(())
    }

    fn inode(&self, ino: u64) -> Res<&Inode> {
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn inode_mut(&mut self, ino: u64) -> Res<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn file_mut(&mut self, ino: u64) -> Res<&mut FileData> {
        let i = self.inode_mut(ino)?;
        i.mtime = SystemTime::now();
        i.ctime = i.mtime;
        match &mut i.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(libc::EISDIR),
        }
    }

    fn dir(&self, ino: u64) -> Res<&DirData> {
        match &self.inode(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(libc::ENOTDIR),
        }
    }

    /// The directory's entries change: mark it unsynced.
    fn dir_mut(&mut self, ino: u64) -> Res<&mut DirData> {
        self.dirty_dirs.insert(ino);
        let i = self.inode_mut(ino)?;
        i.mtime = SystemTime::now();
        i.ctime = i.mtime;
        match &mut i.body {
            Body::Dir(d) => {
                d.unsynced = true;
                Ok(d)
            }
            Body::File(_) => Err(libc::ENOTDIR),
        }
    }

    pub fn attr(&self, ino: u64) -> Res<Attr> {
        self.alive()?;
        let i = self.inode(ino)?;
        let (dir, size, allocated) = match &i.body {
            Body::File(f) => (false, f.size, f.pages.len() as u64 * PAGE),
            Body::Dir(d) => (true, d.entries.len() as u64, 0),
        };
        Ok(Attr {
            ino,
            dir,
            size,
            allocated,
            perm: i.perm,
            uid: i.uid,
            gid: i.gid,
            nlink: i.nlink,
            mtime: i.mtime,
            ctime: i.ctime,
        })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Res<Attr> {
        self.alive()?;
        let ino = *self.dir(parent)?.entries.get(name).ok_or(libc::ENOENT)?;
        self.attr(ino)
    }

    /// The volatile entries of a directory: (name, inode, is a directory).
    pub fn list(&self, ino: u64) -> Res<Vec<(OsString, u64, bool)>> {
        self.alive()?;
        let d = self.dir(ino)?;
        Ok(d.entries
            .iter()
            .map(|(n, &i)| {
                let dir = matches!(self.inodes.get(&i).map(|x| &x.body), Some(Body::Dir(_)));
                (n.clone(), i, dir)
            })
            .collect())
    }

    /// Creates a file or directory `name` in `parent`.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        dir: bool,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Res<Attr> {
        self.step()?;
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = SystemTime::now();
        let body = if dir {
            Body::Dir(DirData::default())
        } else {
            Body::File(FileData::default())
        };
        self.inodes.insert(
            ino,
            Inode {
                body,
                perm,
                uid,
                gid,
                mtime: now,
                ctime: now,
                nlink: if dir { 2 } else { 1 },
            },
        );
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        if dir {
            self.inode_mut(parent)?.nlink += 1;
        }
        self.attr(ino)
    }

    /// Removes `name` from `parent`: a file (`dir` false) or an empty directory.
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Res<()> {
        self.step()?;
        let ino = *self.dir(parent)?.entries.get(name).ok_or(libc::ENOENT)?;
        match (&self.inode(ino)?.body, dir) {
            (Body::Dir(d), true) if !d.entries.is_empty() => return Err(libc::ENOTEMPTY),
            (Body::Dir(_), false) => return Err(libc::EISDIR),
            (Body::File(_), true) => return Err(libc::ENOTDIR),
            _ => {}
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.unlinked(ino);
        if dir {
            self.inode_mut(parent)?.nlink -= 1;
        }
        Ok(())
    }

    /// One volatile name of `ino` is gone. Its data stays: a durable name may still
    /// point at it, and open descriptors may still use it.
    fn unlinked(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.nlink = i.nlink.saturating_sub(1);
        }
    }

    /// Renames `parent/name` to `newparent/newname`, replacing a file or empty
    /// directory there. `noreplace`: fail with EEXIST instead.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
    ) -> Res<()> {
        self.step()?;
        let ino = *self.dir(parent)?.entries.get(name).ok_or(libc::ENOENT)?;
        let moving_dir = matches!(self.inode(ino)?.body, Body::Dir(_));
        self.dir(newparent)?;
        if let Some(&old) = self.dir(newparent)?.entries.get(newname) {
            if old == ino {
                return Ok(());
            }
            if noreplace {
                return Err(libc::EEXIST);
            }
            match (&self.inode(old)?.body, moving_dir) {
                (Body::Dir(d), true) if !d.entries.is_empty() => return Err(libc::ENOTEMPTY),
                (Body::Dir(_), false) => return Err(libc::EISDIR),
                (Body::File(_), true) => return Err(libc::ENOTDIR),
                _ => {}
            }
            self.unlinked(old);
            if moving_dir {
                self.inode_mut(newparent)?.nlink -= 1;
            }
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.dir_mut(newparent)?
            .entries
            .insert(newname.to_owned(), ino);
        if moving_dir && parent != newparent {
            self.inode_mut(parent)?.nlink -= 1;
            self.inode_mut(newparent)?.nlink += 1;
        }
        Ok(())
    }

    pub fn set_perm(&mut self, ino: u64, perm: u16) -> Res<()> {
        self.alive()?;
        self.inode_mut(ino)?.perm = perm;
        Ok(())
    }

    pub fn set_owner(&mut self, ino: u64, uid: Option<u32>, gid: Option<u32>) -> Res<()> {
        self.alive()?;
        let i = self.inode_mut(ino)?;
        i.uid = uid.unwrap_or(i.uid);
        i.gid = gid.unwrap_or(i.gid);
        Ok(())
    }

    pub fn read(&self, ino: u64, off: u64, len: u32) -> Res<Vec<u8>> {
        self.alive()?;
        let f = match &self.inode(ino)?.body {
            Body::File(f) => f,
            Body::Dir(_) => return Err(libc::EISDIR),
        };
        let end = (off + len as u64).min(f.size);
        let mut out = vec![0u8; end.saturating_sub(off) as usize];
        let mut at = off;
        while at < end {
            let (p, o) = (at / PAGE, at % PAGE);
            let n = (PAGE - o).min(end - at);
            if let Some(page) = f.pages.get(&p) {
                let dst = (at - off) as usize;
                out[dst..dst + n as usize].copy_from_slice(&page[o as usize..(o + n) as usize]);
            }
            at += n;
        }
        Ok(out)
    }

    pub fn write(&mut self, ino: u64, off: u64, data: &[u8]) -> Res<()> {
        self.step()?;
        let f = self.file_mut(ino)?;
        let end = off + data.len() as u64;
        let mut at = off;
        while at < end {
            let (p, o) = (at / PAGE, at % PAGE);
            let n = (PAGE - o).min(end - at);
            let page = f.pages.entry(p).or_insert_with(zero_page);
            let src = (at - off) as usize;
            Arc::make_mut(page)[o as usize..(o + n) as usize]
                .copy_from_slice(&data[src..src + n as usize]);
            f.unsynced.insert(p);
            at += n;
        }
        f.size = f.size.max(end);
        Ok(())
    }

    /// Zeros `[off, end)` inside the file (a punched hole; the size stays). Whole pages
    /// are dropped, found through the maps, so a huge range costs only its pages.
    fn zero_range(f: &mut FileData, off: u64, end: u64) {
        let zero_part = |f: &mut FileData, p: u64, a: u64, b: u64| {
            if let Some(page) = f.pages.get_mut(&p) {
                Arc::make_mut(page)[a as usize..b as usize].fill(0);
            }
            f.unsynced.insert(p);
        };
        let (first, last) = (off / PAGE, end.div_ceil(PAGE));
        if !off.is_multiple_of(PAGE) || end - off < PAGE {
            zero_part(f, first, off % PAGE, (end - first * PAGE).min(PAGE));
        }
        if !end.is_multiple_of(PAGE) && last - 1 > first {
            zero_part(f, last - 1, 0, end % PAGE);
        }
        let whole = off.div_ceil(PAGE)..end / PAGE;
        if whole.start < whole.end {
            let gone: Vec<u64> = f
                .pages
                .range(whole.clone())
                .chain(f.durable.range(whole))
                .map(|(&p, _)| p)
                .collect();
            for p in gone {
                f.pages.remove(&p);
                f.unsynced.insert(p);
            }
        }
    }

    pub fn truncate(&mut self, ino: u64, size: u64) -> Res<()> {
        self.step()?;
        let f = self.file_mut(ino)?;
        if size < f.size {
            let end = f.size.next_multiple_of(PAGE);
            Self::zero_range(f, size, end);
        }
        f.size = size;
        Ok(())
    }

    /// fallocate: `punch` zeros a range and keeps the size (PUNCH_HOLE|KEEP_SIZE);
    /// otherwise (mode 0) the file grows to cover the range.
    pub fn fallocate(&mut self, ino: u64, off: u64, len: u64, punch: bool) -> Res<()> {
        self.step()?;
        let f = self.file_mut(ino)?;
        if punch {
            let end = (off + len).min(f.size);
            if off < end {
                Self::zero_range(f, off, end);
            }
        } else {
            f.size = f.size.max(off + len);
        }
        Ok(())
    }

    /// fsync/fdatasync of a file: its data and size become durable (and, with
    /// [`Metadata::Journal`], every directory's entries).
    pub fn sync_file(&mut self, ino: u64) -> Res<()> {
        self.step()?;
        match &mut self.inode_mut(ino)?.body {
            Body::File(f) => Self::sync_pages(f, |_| true),
            Body::Dir(d) => Self::sync_entries(d),
        }
        if self.opts.metadata == Metadata::Journal {
            self.sync_all_dirs();
        }
        Ok(())
    }

    /// fsync of a directory: its entries become durable (with [`Metadata::Journal`],
    /// every directory's).
    pub fn sync_dir(&mut self, ino: u64) -> Res<()> {
        self.step()?;
        match &mut self.inode_mut(ino)?.body {
            Body::Dir(d) => Self::sync_entries(d),
            Body::File(f) => Self::sync_pages(f, |_| true),
        }
        self.dirty_dirs.remove(&ino);
        if self.opts.metadata == Metadata::Journal {
            self.sync_all_dirs();
        }
        Ok(())
    }

    /// Everything becomes durable (a clean shutdown, or `sync`).
    pub fn sync_all(&mut self) -> Res<()> {
        self.alive()?;
        for i in self.inodes.values_mut() {
            match &mut i.body {
                Body::File(f) => Self::sync_pages(f, |_| true),
                Body::Dir(d) => Self::sync_entries(d),
            }
        }
        self.dirty_dirs.clear();
        Ok(())
    }

    fn sync_all_dirs(&mut self) {
        for ino in std::mem::take(&mut self.dirty_dirs) {
            if let Some(Inode {
                body: Body::Dir(d), ..
            }) = self.inodes.get_mut(&ino)
            {
                Self::sync_entries(d);
            }
        }
    }

    fn sync_entries(d: &mut DirData) {
        if d.unsynced {
            d.durable = d.entries.clone();
            d.unsynced = false;
        }
    }

    /// Makes the unsynced pages that `keep` chooses durable, and the size.
    fn sync_pages(f: &mut FileData, mut keep: impl FnMut(u64) -> bool) {
        for p in std::mem::take(&mut f.unsynced) {
            if !keep(p) {
                continue;
            }
            match f.pages.get(&p) {
                Some(page) => f.durable.insert(p, page.clone()),
                None => f.durable.remove(&p),
            };
        }
        f.durable_size = f.size;
    }

    /// Cuts the power: from now on every operation fails with EIO, and the durable
    /// state is final. With [`Options::keep_unsynced`], a random half of what was
    /// unsynced (pages, file sizes, whole directories) becomes durable first.
    pub fn cut(&mut self) {
        if self.cut {
            return;
        }
        self.cut = true;
        let Some(seed) = self.opts.keep_unsynced else {
            return;
        };
        let mut rng = XorShift::new(seed);
        let mut inos: Vec<u64> = self.inodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let i = self.inodes.get_mut(&ino).expect("listed");
            match &mut i.body {
                Body::File(f) => {
                    let old_size = f.durable_size;
                    Self::sync_pages(f, |_| rng.coin());
                    if rng.coin() {
                        f.durable_size = old_size;
                    }
                }
                Body::Dir(d) => {
                    if d.unsynced && rng.coin() {
                        Self::sync_entries(d);
                    }
                }
            }
        }
    }

    /// Writes the durable state under `to` (an existing, empty directory): what a
    /// reboot after the cut would find. Holes stay holes.
    pub fn dump(&self, to: &Path) -> io::Result<()> {
        self.dump_dir(ROOT, to, 0)
    }

    fn dump_dir(&self, ino: u64, to: &Path, depth: usize) -> io::Result<()> {
        let Some(Inode {
            body: Body::Dir(d), ..
        }) = self.inodes.get(&ino)
        else {
            return Ok(());
        };
        if depth > 64 {
            return Err(io::Error::other("directories nested over 64 deep"));
        }
        for (name, &child) in &d.durable {
            let path = to.join(name);
            match self.inodes.get(&child).map(|i| &i.body) {
                Some(Body::Dir(_)) => {
                    fs::create_dir(&path)?;
                    self.dump_dir(child, &path, depth + 1)?;
                }
                Some(Body::File(f)) => {
                    let out = fs::File::create(&path)?;
                    out.set_len(f.durable_size)?;
                    for (&p, page) in f.durable.range(..f.durable_size.div_ceil(PAGE)) {
                        let n = (f.durable_size - p * PAGE).min(PAGE) as usize;
                        out.write_all_at(&page[..n], p * PAGE)?;
                    }
                }
                None => {}
            }
        }
        Ok(())
    }
}

/// xorshift64*: enough for coin flips that a seed can replay.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn coin(&mut self) -> bool {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 63 == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(metadata: Metadata) -> Options {
        Options {
            metadata,
            ..Options::default()
        }
    }

    fn dumped(m: &Model) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        m.dump(d.path()).unwrap();
        d
    }

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn only_synced_data_and_names_survive_a_cut() {
        let mut m = Model::new(opts(Metadata::Posix));
        let f = m.create(ROOT, name("f"), false, 0o644, 0, 0).unwrap().ino;
        m.write(f, 0, b"synced").unwrap();
        m.sync_file(f).unwrap();
        m.write(f, 0, b"SYNCED and more").unwrap();
        // The name is not durable yet: the data alone survives nowhere.
        m.cut();
        assert!(fs::read_dir(dumped(&m).path()).unwrap().next().is_none());
        assert_eq!(m.write(f, 0, b"x"), Err(libc::EIO));
        assert_eq!(m.read(f, 0, 1), Err(libc::EIO));

        let mut m = Model::new(opts(Metadata::Posix));
        let f = m.create(ROOT, name("f"), false, 0o644, 0, 0).unwrap().ino;
        m.sync_dir(ROOT).unwrap();
        m.write(f, 0, b"synced").unwrap();
        m.sync_file(f).unwrap();
        m.write(f, 0, b"SYNCED and more").unwrap();
        let g = m.create(ROOT, name("g"), false, 0o644, 0, 0).unwrap().ino;
        m.write(g, 0, b"g").unwrap();
        m.sync_file(g).unwrap();
        m.cut();
        let d = dumped(&m);
        assert_eq!(fs::read(d.path().join("f")).unwrap(), b"synced");
        assert!(
            !d.path().join("g").exists(),
            "g's directory was never synced"
        );
    }

    #[test]
    fn a_journal_makes_every_name_durable_with_any_fsync() {
        let mut m = Model::new(opts(Metadata::Journal));
        let d1 = m.create(ROOT, name("d"), true, 0o755, 0, 0).unwrap().ino;
        let f = m.create(d1, name("f"), false, 0o644, 0, 0).unwrap().ino;
        let g = m.create(d1, name("g.tmp"), false, 0o644, 0, 0).unwrap().ino;
        m.write(g, 0, b"never synced").unwrap();
        m.rename(d1, name("g.tmp"), d1, name("g"), false).unwrap();
        m.write(f, 0, b"f").unwrap();
        m.sync_file(f).unwrap();
        m.cut();
        let d = dumped(&m);
        assert_eq!(fs::read(d.path().join("d/f")).unwrap(), b"f");
        // Renamed into place without a data fsync: the name, and no data.
        assert_eq!(fs::read(d.path().join("d/g")).unwrap(), b"");
        assert!(!d.path().join("d/g.tmp").exists());
    }

    #[test]
    fn the_atomic_replace_pattern_survives_and_a_torn_one_does_not() {
        let mut m = Model::new(opts(Metadata::Posix));
        let write_atomic = |m: &mut Model, data: &[u8], sync: bool| {
            let t = match m.lookup(ROOT, name("x.tmp")) {
                Ok(a) => a.ino,
                Err(_) => {
                    m.create(ROOT, name("x.tmp"), false, 0o644, 0, 0)
                        .unwrap()
                        .ino
                }
            };
            m.truncate(t, 0).unwrap();
            m.write(t, 0, data).unwrap();
            if sync {
                m.sync_file(t).unwrap();
            }
            m.rename(ROOT, name("x.tmp"), ROOT, name("x"), false)
                .unwrap();
            m.sync_dir(ROOT).unwrap();
        };
        write_atomic(&mut m, b"one", true);
        write_atomic(&mut m, b"two", true);
        let d = tempfile::tempdir().unwrap();
        // A cut now (the model dumps what a cut would leave).
        let mut snap = Model::new(opts(Metadata::Posix));
        write_atomic(&mut snap, b"two", true);
        snap.cut();
        snap.dump(d.path()).unwrap();
        assert_eq!(fs::read(d.path().join("x")).unwrap(), b"two");
        // Renamed over the old file before its data was synced: empty after a cut.
        write_atomic(&mut m, b"three", false);
        m.cut();
        assert_eq!(fs::read(dumped(&m).path().join("x")).unwrap(), b"");
    }

    #[test]
    fn keeping_part_of_the_unsynced_state_never_loses_what_was_synced() {
        let (mut kept, mut lost) = (0, 0);
        for seed in 0..32 {
            let mut m = Model::new(Options {
                keep_unsynced: Some(seed),
                ..opts(Metadata::Posix)
            });
            let f = m.create(ROOT, name("f"), false, 0o644, 0, 0).unwrap().ino;
            m.sync_dir(ROOT).unwrap();
            m.write(f, 0, &[1u8; 8 * PAGE as usize]).unwrap();
            m.sync_file(f).unwrap();
            m.write(f, 2 * PAGE, &[2u8; 4 * PAGE as usize]).unwrap();
            m.cut();
            let got = fs::read(dumped(&m).path().join("f")).unwrap();
            assert_eq!(got.len(), 8 * PAGE as usize, "seed {seed}");
            for (p, page) in got.chunks(PAGE as usize).enumerate() {
                let want1 = page.iter().all(|&b| b == 1);
                let want2 = (2..6).contains(&p) && page.iter().all(|&b| b == 2);
                assert!(want1 || want2, "seed {seed}: page {p} is torn or wrong");
                if (2..6).contains(&p) {
                    if want2 { kept += 1 } else { lost += 1 }
                }
            }
        }
        assert!(kept > 0 && lost > 0, "kept {kept}, lost {lost}");
    }

    #[test]
    fn cut_after_fails_that_operation_and_every_later_one() {
        let mut m = Model::new(Options {
            cut_after: Some(3),
            ..opts(Metadata::Posix)
        });
        let f = m.create(ROOT, name("f"), false, 0o644, 0, 0).unwrap().ino;
        m.sync_dir(ROOT).unwrap();
        m.write(f, 0, b"a").unwrap();
        assert_eq!(m.sync_file(f), Err(libc::EIO));
        assert!(m.is_cut());
        assert_eq!(m.ops(), 3);
        assert_eq!(m.attr(ROOT).err(), Some(libc::EIO));
        assert_eq!(fs::read(dumped(&m).path().join("f")).unwrap(), b"");
    }

    #[test]
    fn holes_truncation_and_sparse_files_cost_only_written_pages() {
        let mut m = Model::new(opts(Metadata::Posix));
        let f = m.create(ROOT, name("f"), false, 0o644, 0, 0).unwrap().ino;
        let big = 1u64 << 40;
        m.truncate(f, big).unwrap();
        m.write(f, big - 10, b"0123456789").unwrap();
        m.write(f, 5000, &[7u8; 10000]).unwrap();
        assert_eq!(m.attr(f).unwrap().allocated, 4 * PAGE);
        // Punch [6000, 13000): one whole page goes, two are zeroed in part.
        m.fallocate(f, 6000, 7000, true).unwrap();
        assert_eq!(m.attr(f).unwrap().allocated, 3 * PAGE);
        let r = m.read(f, 4990, 10030).unwrap();
        assert_eq!(&r[..10], &[0u8; 10]);
        assert_eq!(&r[10..1010], &[7u8; 1000][..]);
        assert!(r[1010..8010].iter().all(|&b| b == 0));
        assert_eq!(&r[8010..10010], &[7u8; 2000][..]);
        assert_eq!(m.read(f, big - 4, 100).unwrap(), b"6789");
        // Shrinking zeros the tail, so growing again shows zeros.
        m.truncate(f, 5005).unwrap();
        m.truncate(f, 6000).unwrap();
        assert_eq!(m.read(f, 5000, 10).unwrap(), [7, 7, 7, 7, 7, 0, 0, 0, 0, 0]);
        assert_eq!(m.attr(f).unwrap().allocated, PAGE);
    }

    #[test]
    fn names_refuse_what_posix_refuses() {
        let mut m = Model::new(opts(Metadata::Posix));
        let d = m.create(ROOT, name("d"), true, 0o755, 0, 0).unwrap().ino;
        m.create(d, name("f"), false, 0o644, 0, 0).unwrap();
        assert_eq!(
            m.create(d, name("f"), false, 0o644, 0, 0).err(),
            Some(libc::EEXIST)
        );
        assert_eq!(m.remove(ROOT, name("d"), true), Err(libc::ENOTEMPTY));
        assert_eq!(m.remove(ROOT, name("d"), false), Err(libc::EISDIR));
        m.create(ROOT, name("g"), false, 0o644, 0, 0).unwrap();
        assert_eq!(
            m.rename(ROOT, name("g"), d, name("f"), true),
            Err(libc::EEXIST)
        );
        m.rename(ROOT, name("g"), d, name("f"), false).unwrap();
        assert_eq!(m.list(d).unwrap().len(), 1);
        m.remove(d, name("f"), false).unwrap();
        m.remove(ROOT, name("d"), true).unwrap();
        assert!(m.list(ROOT).unwrap().is_empty());
    }
}
