//! Lazy memory with real QEMU under TCG: a guest whose RAM is a shared file is
//! suspended with `x-ignore-shared` (device state only), then resumed by a new QEMU
//! whose `mem-path` is the RAM file on an mbank-memfs mount, its chunks fetched on
//! first access from the saved RAM file. The guest must go on (its in-memory counter
//! continues, the checksum of a random region it filled is the same) having fetched
//! fewer chunks than the RAM holds when it first answers.
//!
//! `lazy_resume_bench` (ignored; `scripts/bench-lazymem.sh`) prints the numbers of
//! ARCHITECTURE.md's "Lazy memory: evaluation": the lazy and the eager path over a
//! modelled link, for several chunk sizes. Only counts are asserted, never times.

#[path = "../../mbank/tests/common/guest.rs"]
mod guest;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mbank_memfs::{Counters, FetchError, Fetcher, Layout, MemImage, MemMount, MountOptions};
use mbank_vm::qmp::Qmp;
use mbank_vm::thp::HugePageAdvice;
use serde_json::json;

const RAM_MIB: u64 = 256;
/// A hang guard only.
const TIMEOUT: Duration = Duration::from_secs(120);

/// A QEMU whose serial console is on its stdin/stdout, with a QMP socket.
struct Vm {
    child: Child,
    stdin: ChildStdin,
    serial: Arc<Mutex<String>>,
    qmp: Qmp,
}

impl Vm {
    /// Starts the test guest's `shell` job with its RAM on `mem_path`; with
    /// `incoming`, stopped and waiting for `migrate-incoming`.
    fn start(
        dir: &Path,
        name: &str,
        mem_path: &Path,
        incoming: bool,
        advice: HugePageAdvice,
    ) -> Vm {
        let g = guest::Guest::build();
        let qmp_path = dir.join(format!("{name}.qmp"));
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m"])
            .arg(format!("{RAM_MIB}M"))
            .args(["-nodefaults", "-no-reboot", "-display", "none"])
            .args(["-serial", "stdio"])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=ram,share=on,mem-path={},size={RAM_MIB}M",
                mem_path.display()
            ))
            .args(["-machine", "memory-backend=ram"])
            .arg("-kernel")
            .arg(&g.kernel)
            .arg("-initrd")
            .arg(&g.initrd)
            .args(["-append", "console=ttyS0 panic=-1 mbank.job=shell"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if incoming {
            c.args(["-S", "-incoming", "defer"]);
        }
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: apply only calls prctl(2) between fork and exec.
        unsafe {
            c.pre_exec(move || advice.apply());
        }
        let mut child = c.spawn().expect("cannot start qemu-system-x86_64");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let serial = Arc::new(Mutex::new(String::new()));
        let s = serial.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                s.lock().unwrap().push_str(&text);
            }
        });
        let qmp = Qmp::connect(&qmp_path, Duration::from_secs(30)).expect("QMP");
        Vm {
            child,
            stdin,
            serial,
            qmp,
        }
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to the serial console");
        self.stdin.flush().unwrap();
    }

    /// The complete console lines holding `marker`: a line still being written is left
    /// out (a full run once read half of an md5sum from one).
    fn lines(&self, marker: &str) -> Vec<String> {
        let s = self.serial.lock().unwrap();
        let complete = s.rfind('\n').map_or("", |end| &s[..end]);
        complete
            .lines()
            .filter(|l| l.contains(marker))
            .map(str::to_string)
            .collect()
    }

    /// Waits until `count` lines hold `marker`; returns what follows the marker on
    /// the last one.
    fn wait(&mut self, marker: &str, count: usize) -> String {
        let t = Instant::now();
        loop {
            let l = self.lines(marker);
            if l.len() >= count {
                let last = &l[count - 1];
                let at = last.find(marker).unwrap() + marker.len();
                return last[at..].trim().to_string();
            }
            if t.elapsed() > TIMEOUT || self.child.try_wait().unwrap().is_some() {
                panic!(
                    "no {count}× {marker} on the console:\n{}",
                    self.serial.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `cmd` in the guest's shell and returns what it printed after `MBANK-<tag>`.
    /// The marker is split on the typed line, so the console's echo never matches.
    fn ask(&mut self, tag: &str, cmd: &str) -> String {
        let marker = format!("MBANK-{tag}");
        let n = self.lines(&marker).len();
        self.say(&format!("{cmd} | sed \"s/^/MBANK-\"\"{tag} /\""));
        self.wait(&marker, n + 1)
    }

    fn migration_done(&mut self) {
        let t = Instant::now();
        loop {
            let (status, _, err) = self.qmp.migration().unwrap();
            match status.as_str() {
                "completed" => return,
                "failed" | "cancelled" => panic!("migration {status}: {err:?}"),
                _ if t.elapsed() > TIMEOUT => panic!("migration still {status}"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn ignore_shared(&mut self) {
        self.qmp
            .execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
            )
            .unwrap();
    }

    /// `stop`, then the device state (only: RAM is shared) into `state`; QEMU quits.
    fn suspend(mut self, state: &Path) {
        self.ignore_shared();
        self.qmp.execute("stop", None).unwrap();
        self.qmp
            .execute(
                "migrate",
                Some(json!({"uri": format!("exec:cat > {}", state.display())})),
            )
            .unwrap();
        self.migration_done();
        let _ = self.qmp.execute("quit", None);
        self.child.wait().unwrap();
    }

    /// Loads the device state from `state` and continues the guest.
    fn resume(&mut self, state: &Path) {
        self.ignore_shared();
        self.qmp
            .execute(
                "migrate-incoming",
                Some(json!({"uri": format!("exec:cat {}", state.display())})),
            )
            .unwrap();
        self.migration_done();
        self.qmp.execute("cont", None).unwrap();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A suspended guest: its RAM file, its device state, what it computed before.
struct Saved {
    ram: PathBuf,
    state: PathBuf,
    sum: String,
    counter: u64,
}

/// Boots the guest, fills `random_mib` MiB of its memory (a file in its RAM-backed
/// root) with random bytes, starts an in-memory counter and suspends it.
fn suspend_a_guest(dir: &Path, random_mib: u64) -> Saved {
    let ram = dir.join("saved-ram");
    File::create(&ram).unwrap().set_len(RAM_MIB << 20).unwrap();
    let mut vm = Vm::start(dir, "source", &ram, false, HugePageAdvice::Keep);
    vm.wait("shell; exit it to power off", 1);
    // The shell may not read the console yet: ask until it answers (bounded).
    let mut up = false;
    for n in 1..=60 {
        vm.say("echo MBANK-\"\"UP");
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(1) {
            if !vm.lines("MBANK-UP").is_empty() {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if up {
            break;
        }
        assert!(n < 60, "the guest's shell never answered");
    }
    vm.say("(i=0; while :; do i=$((i+1)); echo $i > /c; sleep 0.1; done) &");
    let sum = vm.ask(
        "SUM",
        &format!(
            "dd if=/dev/urandom of=/r.bin bs=1M count={random_mib} 2>/dev/null; md5sum /r.bin"
        ),
    );
    let counter = vm.ask("COUNT", "cat /c").parse::<u64>().unwrap();
    let state = dir.join("device-state");
    vm.suspend(&state);
    Saved {
        ram,
        state,
        sum,
        counter,
    }
}

/// Reads chunks from the saved RAM file, over a modelled link of `rate` bytes/s
/// (one link: concurrent fetches queue behind each other), counting them.
struct FileFetcher {
    file: File,
    layout: Layout,
    rate: Option<f64>,
    link_free_at: Mutex<Instant>,
    fetches: AtomicU64,
}

impl FileFetcher {
    fn new(ram: &Path, layout: Layout, rate: Option<f64>) -> Arc<FileFetcher> {
        Arc::new(FileFetcher {
            file: File::open(ram).unwrap(),
            layout,
            rate,
            link_free_at: Mutex::new(Instant::now()),
            fetches: AtomicU64::new(0),
        })
    }
}

impl Fetcher for FileFetcher {
    fn fetch(&self, chunk: usize) -> Result<Vec<u8>, FetchError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let mut buf = vec![0; self.layout.chunk_len(chunk)];
        self.file
            .read_exact_at(&mut buf, chunk as u64 * self.layout.chunk_size as u64)
            .map_err(|e| FetchError::new(format!("reading the saved RAM: {e}")))?;
        if let Some(rate) = self.rate {
            let done = {
                let mut free = self.link_free_at.lock().unwrap();
                let start = (*free).max(Instant::now());
                *free = start + Duration::from_secs_f64(buf.len() as f64 / rate);
                *free
            };
            std::thread::sleep(done.saturating_duration_since(Instant::now()));
        }
        Ok(buf)
    }
}

/// Which chunks of the saved RAM hold anything but zeros.
fn index(ram: &Path, layout: Layout) -> Vec<bool> {
    let f = File::open(ram).unwrap();
    let mut buf = vec![0; layout.chunk_size as usize];
    (0..layout.chunks())
        .map(|i| {
            let b = &mut buf[..layout.chunk_len(i)];
            f.read_exact_at(b, i as u64 * layout.chunk_size as u64)
                .unwrap();
            b.iter().any(|&x| x != 0)
        })
        .collect()
}

/// What one resume measured.
#[derive(Debug)]
struct Resumed {
    nonzero_chunks: u64,
    /// From the start of QEMU (lazy) or of the fetch (eager) until `cont` returned.
    to_cont: Duration,
    /// ... until the guest answered a command on its console.
    to_answer: Duration,
    at_cont: Option<Counters>,
    at_answer: Option<Counters>,
    /// The FUSE read requests (offset, length) until the guest answered.
    reads_at_answer: Option<Vec<(u64, u32)>>,
    /// The guest checksumming its whole random region right after the resume, then
    /// again (warm).
    cold_sum: Duration,
    warm_sum: Duration,
    after_sum: Option<Counters>,
    /// After 4 MiB more written by the guest, `stop` and an fsync of the RAM file.
    after_write: Option<Counters>,
    counter_at_answer: u64,
    counter_later: u64,
    sum: String,
}

/// Resumes `saved` lazily from an mbank-memfs mount, or eagerly (every non-zero
/// chunk fetched into a plain file first).
fn resume(
    dir: &Path,
    saved: &Saved,
    chunk_size: u32,
    rate: Option<f64>,
    lazy: bool,
    advice: HugePageAdvice,
) -> Resumed {
    let layout = Layout {
        size: RAM_MIB << 20,
        chunk_size,
    };
    let nonzero = index(&saved.ram, layout);
    let nonzero_chunks = nonzero.iter().filter(|&&b| b).count() as u64;
    let fetcher = FileFetcher::new(&saved.ram, layout, rate);
    let run = dir.join(format!(
        "run-{}-{chunk_size}-{}-{advice:?}",
        if lazy { "lazy" } else { "eager" },
        rate.unwrap_or(0.0)
    ));
    std::fs::create_dir(&run).unwrap();
    let mnt = run.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let t0 = Instant::now();
    let (mount, mem_path) = if lazy {
        let image =
            MemImage::create(layout, &nonzero, &run.join("overlay"), fetcher.clone()).unwrap();
        let opts = MountOptions {
            readahead: std::env::var("MBANK_LAZYMEM_READAHEAD_KIB")
                .ok()
                .map(|k| k.parse::<u32>().unwrap() << 10),
            ..MountOptions::default()
        };
        let m = MemMount::mount(&mnt, Arc::new(image), opts).unwrap();
        let p = m.file().to_path_buf();
        (Some(m), p)
    } else {
        // Eager: the whole RAM fetched (four at a time, over the same link) first.
        let p = run.join("ram");
        let f = File::create(&p).unwrap();
        f.set_len(layout.size).unwrap();
        let next = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if i >= layout.chunks() {
                            break;
                        }
                        if nonzero[i] {
                            let b = fetcher.fetch(i).unwrap();
                            f.write_all_at(&b, i as u64 * chunk_size as u64).unwrap();
                        }
                    }
                });
            }
        });
        (None, p)
    };
    let counters = || mount.as_ref().map(|m| m.image().counters());
    let mut vm = Vm::start(&run, "dest", &mem_path, true, advice);
    vm.resume(&saved.state);
    let to_cont = t0.elapsed();
    let at_cont = counters();
    let counter_at_answer = vm.ask("ALIVE", "cat /c").parse::<u64>().unwrap();
    let to_answer = t0.elapsed();
    let at_answer = counters();
    let reads_at_answer = mount.as_ref().map(|m| m.image().read_log());
    let t = Instant::now();
    let sum = vm.ask("SUM", "md5sum /r.bin");
    let cold_sum = t.elapsed();
    let t = Instant::now();
    let again = vm.ask("SUM", "md5sum /r.bin");
    let warm_sum = t.elapsed();
    assert_eq!(sum, again);
    let after_sum = counters();
    let counter_later = vm.ask("COUNT", "cat /c").parse::<u64>().unwrap();
    vm.ask(
        "WROTE",
        "dd if=/dev/urandom of=/w.bin bs=1M count=4 2>/dev/null; echo",
    );
    vm.qmp.execute("stop", None).unwrap();
    if let Some(m) = &mount {
        m.sync().unwrap();
    }
    let after_write = counters();
    drop(vm);
    if let Some(m) = mount {
        m.unmount().unwrap();
    }
    Resumed {
        nonzero_chunks,
        to_cont,
        to_answer,
        at_cont,
        at_answer,
        reads_at_answer,
        cold_sum,
        warm_sum,
        after_sum,
        after_write,
        counter_at_answer,
        counter_later,
        sum,
    }
}

/// The read requests as "N × size" groups, largest first, and the bytes they asked.
fn read_sizes(reads: &[(u64, u32)]) -> String {
    let mut by: std::collections::BTreeMap<u32, usize> = Default::default();
    for &(_, len) in reads {
        *by.entry(len).or_default() += 1;
    }
    let total: u64 = reads.iter().map(|&(_, l)| l as u64).sum();
    let groups: Vec<String> = by
        .iter()
        .rev()
        .map(|(len, n)| format!("{n} × {} KiB", len >> 10))
        .collect();
    format!("{} ({:.1} MiB)", groups.join(", "), mib(total))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

#[test]
fn a_lazily_resumed_guest_goes_on_with_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let saved = suspend_a_guest(dir.path(), 64);
    let state_bytes = std::fs::metadata(&saved.state).unwrap().len();
    assert!(
        state_bytes < 4 << 20,
        "with x-ignore-shared the stream holds device state only, not RAM: {state_bytes} bytes"
    );
    let r = resume(
        dir.path(),
        &saved,
        64 << 10,
        None,
        true,
        HugePageAdvice::Ignore,
    );
    eprintln!("{r:#?}");
    let at_cont = r.at_cont.as_ref().unwrap();
    let at_answer = r.at_answer.as_ref().unwrap();
    assert!(
        at_cont.chunks_fetched <= at_answer.chunks_fetched
            && at_cont.chunks_fetched < r.nonzero_chunks / 4,
        "loading the device state fetched {} of {} non-zero chunks",
        at_cont.chunks_fetched,
        r.nonzero_chunks
    );
    assert!(
        at_answer.chunks_fetched < r.nonzero_chunks,
        "the guest answered only after {} of {} non-zero chunks were fetched",
        at_answer.chunks_fetched,
        r.nonzero_chunks
    );
    assert!(
        at_answer.chunks_fetched > 0,
        "a running guest touches memory"
    );
    assert_eq!(at_answer.fetch_errors, 0, "{:?}", at_answer.last_error);
    // With QEMU's MADV_HUGEPAGE ignored a fault reads the file system's read-ahead
    // window (one 64 KiB chunk) around it; under the advice the kernel reads 4 MiB in
    // 1 MiB requests.
    assert!(
        at_answer.largest_read <= 64 << 10,
        "a fault read {} bytes at once: the kernel's huge-page read-around?",
        at_answer.largest_read
    );
    // The guest's memory is the one it had: its counter goes on, its random region
    // has the same checksum (read whole, so those chunks were fetched).
    assert!(r.counter_at_answer >= saved.counter, "{r:?}");
    assert!(r.counter_later > r.counter_at_answer, "{r:?}");
    assert_eq!(r.sum, saved.sum);
    let after_sum = r.after_sum.as_ref().unwrap();
    assert!(
        after_sum.bytes_fetched >= 64 << 20,
        "checksumming 64 MiB fetched only {} bytes",
        after_sum.bytes_fetched
    );
    // Pages the guest dirtied come back as writes once the file is synced.
    let w = r.after_write.as_ref().unwrap();
    assert!(w.writes > 0 && w.dirty_chunks > 0, "{w:?}");
    assert!(w.dirty_chunks < w.chunks, "{w:?}");
}

/// The numbers of ARCHITECTURE.md's "Lazy memory: evaluation" (scripts/bench-lazymem.sh).
/// Env: MBANK_LAZYMEM_RANDOM_MIB (default 128), MBANK_LAZYMEM_CHUNKS (KiB, comma
/// separated; default 64,256,2048), MBANK_LAZYMEM_RATES (Mbit/s, 0 = unlimited;
/// default 0,1000,100).
#[test]
#[ignore = "a benchmark: scripts/bench-lazymem.sh"]
fn lazy_resume_bench() {
    let list = |var: &str, default: &str| -> Vec<u64> {
        std::env::var(var)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .map(|s| s.trim().parse().unwrap())
            .collect()
    };
    let random = list("MBANK_LAZYMEM_RANDOM_MIB", "128")[0];
    let chunks = list("MBANK_LAZYMEM_CHUNKS", "64,256,2048");
    let rates = list("MBANK_LAZYMEM_RATES", "0,1000,100");
    let advices: Vec<HugePageAdvice> = std::env::var("MBANK_LAZYMEM_ADVICE")
        .unwrap_or_else(|_| "ignore".into())
        .split(',')
        .map(|s| match s.trim() {
            "keep" => HugePageAdvice::Keep,
            "thp-disable" => HugePageAdvice::ThpDisable,
            "ignore" => HugePageAdvice::Ignore,
            x => panic!("MBANK_LAZYMEM_ADVICE: {x}? (keep, thp-disable, ignore)"),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let saved = suspend_a_guest(dir.path(), random);
    let nz = |cs| {
        index(
            &saved.ram,
            Layout {
                size: RAM_MIB << 20,
                chunk_size: cs,
            },
        )
    };
    println!(
        "guest: {RAM_MIB} MiB RAM, {random} MiB random; device state {} bytes; non-zero RAM at 4 KiB pages: {:.1} MiB",
        std::fs::metadata(&saved.state).unwrap().len(),
        mib(nz(4096).iter().filter(|&&b| b).count() as u64 * 4096)
    );
    println!(
        "| path | huge-page advice | chunk | link | to cont | to answer | fetched at answer | waited at answer | FUSE reads at answer | cold sum | warm sum | fetched after sum | dirty chunks after 4 MiB |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &rate in &rates {
        let link = if rate == 0 {
            "local".to_string()
        } else {
            format!("{rate} Mbit/s")
        };
        let r = (rate > 0).then(|| rate as f64 * 1e6 / 8.0);
        for (&kib, &advice) in chunks
            .iter()
            .flat_map(|k| advices.iter().map(move |a| (k, a)))
        {
            let cs = (kib << 10) as u32;
            let x = resume(dir.path(), &saved, cs, r, true, advice);
            assert_eq!(x.sum, saved.sum);
            let a = x.at_answer.as_ref().unwrap();
            let s = x.after_sum.as_ref().unwrap();
            let w = x.after_write.as_ref().unwrap();
            println!(
                "| lazy | {advice:?} | {kib} KiB | {link} | {:.2} s | {:.2} s | {:.1} MiB ({} of {} chunks) | {} | {} | {:.2} s | {:.2} s | {:.1} MiB | {} ({:.1} MiB) |",
                x.to_cont.as_secs_f64(),
                x.to_answer.as_secs_f64(),
                mib(a.bytes_fetched),
                a.chunks_fetched,
                x.nonzero_chunks,
                a.faults_waited,
                read_sizes(x.reads_at_answer.as_deref().unwrap_or(&[])),
                x.cold_sum.as_secs_f64(),
                x.warm_sum.as_secs_f64(),
                mib(s.bytes_fetched),
                w.dirty_chunks,
                mib(w.dirty_chunks * cs as u64),
            );
        }
        let cs = (chunks[chunks.len() / 2] << 10) as u32;
        let x = resume(dir.path(), &saved, cs, r, false, HugePageAdvice::Keep);
        assert_eq!(x.sum, saved.sum);
        println!(
            "| eager | Keep | {} KiB | {link} | {:.2} s | {:.2} s | {:.1} MiB (all {} chunks) | - | - | {:.2} s | {:.2} s | - | - |",
            cs >> 10,
            x.to_cont.as_secs_f64(),
            x.to_answer.as_secs_f64(),
            mib(x.nonzero_chunks * cs as u64),
            x.nonzero_chunks,
            x.cold_sum.as_secs_f64(),
            x.warm_sum.as_secs_f64(),
        );
    }
}
