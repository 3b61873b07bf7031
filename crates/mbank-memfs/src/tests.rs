use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::*;

const CS: u32 = 4096 * 4;

/// Chunks kept in memory; counts fetches per chunk; can fail or hold fetches.
struct MemFetcher {
    chunks: Vec<Vec<u8>>,
    calls: Vec<AtomicUsize>,
    /// `fetch_many` calls, and the chunks each asked for.
    batches: Mutex<Vec<Vec<usize>>>,
    fail: AtomicBool,
    gate: Mutex<bool>,
    opened: Condvar,
}

impl MemFetcher {
    fn new(chunks: Vec<Vec<u8>>) -> Arc<MemFetcher> {
        Arc::new(MemFetcher {
            calls: chunks.iter().map(|_| AtomicUsize::new(0)).collect(),
            chunks,
            batches: Mutex::new(Vec::new()),
            fail: AtomicBool::new(false),
            gate: Mutex::new(true),
            opened: Condvar::new(),
        })
    }

    fn calls(&self, i: usize) -> usize {
        self.calls[i].load(Ordering::SeqCst)
    }

    fn total(&self) -> usize {
        self.calls.iter().map(|c| c.load(Ordering::SeqCst)).sum()
    }

    fn hold(&self, closed: bool) {
        *self.gate.lock().unwrap() = !closed;
        self.opened.notify_all();
    }
}

impl Fetcher for MemFetcher {
    fn fetch(&self, chunk: usize) -> Result<Vec<u8>, FetchError> {
        self.calls[chunk].fetch_add(1, Ordering::SeqCst);
        let mut open = self.gate.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(FetchError::new(format!("chunk {chunk}: the bank is away")));
        }
        Ok(self.chunks[chunk].clone())
    }

    fn fetch_many(&self, chunks: &[usize]) -> Vec<Result<Vec<u8>, FetchError>> {
        self.batches.lock().unwrap().push(chunks.to_vec());
        chunks.iter().map(|&c| self.fetch(c)).collect()
    }
}

/// An image of `n` chunks where chunk i is filled with byte i+1, except the ones in
/// `zero`, which are zero and elided.
fn image(
    n: usize,
    zero: &[usize],
    short_last: bool,
) -> (tempfile::TempDir, Arc<MemImage>, Arc<MemFetcher>) {
    let size = n as u64 * CS as u64 - if short_last { 4096 } else { 0 };
    let layout = Layout {
        size,
        chunk_size: CS,
    };
    let chunks: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let b = if zero.contains(&i) { 0 } else { i as u8 + 1 };
            vec![b; layout.chunk_len(i)]
        })
        .collect();
    let nonzero: Vec<bool> = (0..n).map(|i| !zero.contains(&i)).collect();
    let f = MemFetcher::new(chunks);
    let dir = tempfile::tempdir().unwrap();
    let img = MemImage::create(layout, &nonzero, &dir.path().join("overlay"), f.clone()).unwrap();
    (dir, Arc::new(img), f)
}

#[test]
fn zero_chunks_read_as_zeros_without_a_fetch() {
    let (_d, img, f) = image(4, &[1, 2], false);
    let buf = img.read(CS as u64, 2 * CS).unwrap();
    assert_eq!(buf.len(), 2 * CS as usize);
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(f.total(), 0);
    let c = img.counters();
    assert_eq!(
        (c.chunks_fetched, c.faults_waited, c.chunks_ready),
        (0, 0, 2)
    );
}

#[test]
fn a_read_fetches_its_absent_chunks_in_one_batch() {
    let (_d, img, f) = image(8, &[2], false);
    img.read(5 * CS as u64, CS).unwrap();
    // A fault's read-around: chunks 0..8, of which 2 is zero and 5 is there already.
    let buf = img.read(0, 8 * CS).unwrap();
    assert_eq!(buf[3 * CS as usize], 4);
    assert_eq!(
        *f.batches.lock().unwrap(),
        vec![vec![5], vec![0, 1, 3, 4, 6, 7]]
    );
    assert_eq!(f.total(), 7, "every chunk fetched once");
    assert_eq!(img.counters().chunks_fetched, 7);
}

#[test]
fn a_chunk_is_fetched_once_and_reads_span_chunks() {
    let (_d, img, f) = image(4, &[2], false);
    // Across the boundary of chunks 0 and 1.
    let buf = img.read(CS as u64 - 10, 20).unwrap();
    assert_eq!(&buf[..10], &[1; 10]);
    assert_eq!(&buf[10..], &[2; 10]);
    let again = img.read(CS as u64 - 10, 20).unwrap();
    assert_eq!(buf, again);
    assert_eq!(
        (f.calls(0), f.calls(1), f.calls(2), f.calls(3)),
        (1, 1, 0, 0)
    );
    let c = img.counters();
    assert_eq!(c.chunks_fetched, 2);
    assert_eq!(c.bytes_fetched, 2 * CS as u64);
    assert_eq!(c.faults_waited, 2);
    assert_eq!(c.dirty_chunks, 0);
}

#[test]
fn reads_stop_at_the_end_and_the_last_chunk_may_be_short() {
    let (_d, img, f) = image(3, &[], true);
    let size = img.layout().size;
    assert_eq!(img.layout().chunk_len(2), CS as usize - 4096);
    let buf = img.read(size - 100, 4096).unwrap();
    assert_eq!(buf, vec![3; 100]);
    assert!(img.read(size, 4096).unwrap().is_empty());
    assert_eq!(f.total(), 1);
}

#[test]
fn readers_of_one_chunk_share_one_fetch() {
    let (_d, img, f) = image(2, &[], false);
    f.hold(true);
    let readers: Vec<_> = (0..4)
        .map(|k| {
            let img = img.clone();
            std::thread::spawn(move || img.read(k * 4096, 4096).unwrap())
        })
        .collect();
    // Wait (bounded by the readers, not by time) until the one fetch is in flight and
    // every reader waits for it.
    while img.counters().faults_waited < 4 {
        std::thread::yield_now();
    }
    f.hold(false);
    for r in readers {
        assert_eq!(r.join().unwrap(), vec![1; 4096]);
    }
    assert_eq!(f.calls(0), 1);
    assert_eq!(img.counters().chunks_fetched, 1);
}

#[test]
fn a_partial_write_merges_with_the_base_and_a_whole_one_fetches_nothing() {
    let (_d, img, f) = image(4, &[3], false);
    img.write(CS as u64 + 100, &[9; 10]).unwrap();
    assert_eq!(
        f.calls(1),
        1,
        "a partial write fetches the rest of its chunk"
    );
    let buf = img.read(CS as u64, CS).unwrap();
    assert_eq!(&buf[..100], &[2; 100]);
    assert_eq!(&buf[100..110], &[9; 10]);
    assert_eq!(&buf[110..], &vec![2; CS as usize - 110][..]);

    img.write(2 * CS as u64, &vec![7; CS as usize]).unwrap();
    assert_eq!(f.calls(2), 0, "a whole-chunk write needs no fetch");
    assert_eq!(img.read_chunk(2).unwrap(), vec![7; CS as usize]);

    // A write into a zero chunk: the rest stays zero, nothing fetched.
    img.write(3 * CS as u64 + 5, &[1]).unwrap();
    let z = img.read_chunk(3).unwrap();
    assert_eq!(z.iter().filter(|&&b| b != 0).count(), 1);
    assert_eq!(f.calls(3), 0);

    assert_eq!(img.dirty_chunks(), vec![1, 2, 3]);
    let c = img.counters();
    assert_eq!((c.dirty_chunks, c.chunks_fetched, c.writes), (3, 1, 3));
    img.sync().unwrap();
}

#[test]
fn a_write_spanning_chunks_marks_each_dirty() {
    let (_d, img, f) = image(3, &[], false);
    img.write(CS as u64 - 1, &[0xAA; 2]).unwrap();
    assert_eq!(img.dirty_chunks(), vec![0, 1]);
    assert_eq!((f.calls(0), f.calls(1), f.calls(2)), (1, 1, 0));
    assert!(
        img.write(3 * CS as u64 - 1, &[1, 2]).is_err(),
        "past the end"
    );
}

#[test]
fn a_failed_fetch_names_the_chunk_and_a_retry_succeeds() {
    let (_d, img, f) = image(3, &[], false);
    f.fail.store(true, Ordering::SeqCst);
    let e = img.read(2 * CS as u64, 10).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("memory chunk 2"), "{msg}");
    assert!(msg.contains("the bank is away"), "{msg}");
    let c = img.counters();
    assert_eq!((c.fetch_errors, c.chunks_fetched), (1, 0));
    assert!(c.last_error.unwrap().contains("chunk 2"));
    f.fail.store(false, Ordering::SeqCst);
    assert_eq!(img.read(2 * CS as u64, 10).unwrap(), vec![3; 10]);
    assert_eq!(f.calls(2), 2);
}

#[test]
fn a_fetch_of_the_wrong_length_is_refused() {
    struct Short;
    impl Fetcher for Short {
        fn fetch(&self, _chunk: usize) -> Result<Vec<u8>, FetchError> {
            Ok(vec![1; 100])
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout {
        size: CS as u64,
        chunk_size: CS,
    };
    let img = MemImage::create(layout, &[true], &dir.path().join("o"), Arc::new(Short)).unwrap();
    let msg = img.read(0, 10).unwrap_err().to_string();
    assert!(msg.contains("returned 100 bytes"), "{msg}");
}

#[test]
fn a_layout_that_does_not_fit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = MemFetcher::new(vec![]);
    let bad = |size, chunk_size, n: usize, name: &str| {
        MemImage::create(
            Layout { size, chunk_size },
            &vec![true; n],
            &dir.path().join(name),
            f.clone(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    assert!(bad(1 << 20, 3000, 1, "a").contains("power of two"));
    assert!(bad(1000, 4096, 1, "b").contains("multiple of 4096"));
    assert!(bad(1 << 20, 4096, 3, "c").contains("need 256"));
}

#[test]
fn prefetch_fills_ahead_and_a_fault_after_it_waits_for_nothing() {
    let (_d, img, f) = image(3, &[], false);
    img.prefetch(1).unwrap();
    img.prefetch(99).unwrap();
    assert_eq!(img.read(CS as u64, 1).unwrap(), vec![2]);
    let c = img.counters();
    assert_eq!((c.prefetched, c.faults_waited, c.chunks_fetched), (1, 0, 1));
    assert_eq!(f.total(), 1);
}

#[test]
fn faults_are_recorded_in_order_and_a_prefetch_of_many_is_one_batch() {
    let (_d, img, f) = image(6, &[], false);
    img.read(4 * CS as u64, 1).unwrap();
    img.read(CS as u64, 1).unwrap();
    img.read(4 * CS as u64 + 1, 1).unwrap();
    // A prefetch is no fault; it fetches only what is absent, in one batch.
    img.prefetch_many(&[0, 1, 2, 99]).unwrap();
    assert_eq!(img.fault_order(), vec![4, 1]);
    assert_eq!(f.batches.lock().unwrap().last().unwrap(), &vec![0, 2]);
    img.read(0, 1).unwrap();
    let c = img.counters();
    assert_eq!((c.prefetched, c.faults_waited, c.chunks_fetched), (2, 2, 4));
    assert_eq!(img.fault_order(), vec![4, 1]);
}

#[test]
fn reads_are_logged_with_their_offsets_and_the_largest_is_counted() {
    let (_d, img, _f) = image(8, &[], false);
    img.read(CS as u64 + 4096, 4096).unwrap();
    img.read(0, 3 * CS).unwrap();
    img.read(5 * CS as u64, CS).unwrap();
    assert_eq!(
        img.read_log(),
        vec![(CS as u64 + 4096, 4096), (0, 3 * CS), (5 * CS as u64, CS)]
    );
    let c = img.counters();
    assert_eq!((c.reads, c.largest_read), (3, 3 * CS as u64));
}

#[test]
fn writes_mark_chunks_changed_until_taken_and_a_mark_can_be_given_back() {
    let (_d, img, _f) = image(200, &[], false);
    assert!(img.take_changed().is_empty());
    img.write(CS as u64 - 1, &[0xAA; 2]).unwrap();
    img.write(130 * CS as u64, &[0xBB; 8]).unwrap();
    assert!(img.is_changed(130) && !img.is_changed(2));
    assert_eq!(img.take_changed(), vec![0, 1, 130]);
    assert!(img.take_changed().is_empty(), "taken once");
    assert_eq!(img.dirty_chunks(), vec![0, 1, 130], "dirty stays");
    img.mark_changed(7);
    img.mark_changed(10_000);
    img.write(199 * CS as u64, &[1]).unwrap();
    assert_eq!(img.take_changed(), vec![7, 199]);
}

/// Reads that follow each other fetch a growing window ahead in the same batch; a
/// read elsewhere does not; the chunks read ahead are no faults.
#[test]
fn sequential_faults_read_ahead_in_one_batch_and_a_jump_does_not() {
    let (_d, img, f) = image(200, &[], false);
    let cs = CS as u64;
    img.read(0, CS).unwrap(); // first read: no window yet
    assert_eq!(f.total(), 1);
    img.read(cs, CS).unwrap(); // sequential: 1 ahead
    assert_eq!((f.calls(1), f.calls(2)), (1, 1));
    img.read(3 * cs, CS).unwrap(); // chunk 2 was read ahead; 3 sequential: 2 ahead
    assert_eq!(
        (f.calls(3), f.calls(4), f.calls(5), f.calls(6)),
        (1, 1, 1, 0)
    );
    let c = img.counters();
    assert_eq!((c.faults_waited, c.read_ahead), (3, 3), "{c:?}");
    // Chunks 4 and 5 are there: no fetch; then 6 misses, sequential: 4 ahead.
    img.read(4 * cs, 2 * CS).unwrap();
    img.read(6 * cs, CS).unwrap();
    assert_eq!(
        (7..=10).map(|i| f.calls(i)).collect::<Vec<_>>(),
        [1, 1, 1, 1]
    );
    assert_eq!(f.calls(11), 0);
    // A jump: no read-ahead.
    img.read(100 * cs, CS).unwrap();
    assert_eq!((f.calls(100), f.calls(101)), (1, 0));
    assert_eq!(img.counters().read_ahead, 7);
    // Every byte as the base has it.
    assert!(img.read(5 * cs, CS).unwrap().iter().all(|&b| b == 6));
}
