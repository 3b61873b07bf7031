//! A bank whose chunks are in S3: a 3-node Garage cluster (replication factor 3) from
//! `scripts/garage.sh`, driven through the real `mbank` binary. The catalog stays in
//! the bank directory. Fails (does not skip) when Garage is not installed: run
//! `scripts/setup.sh`.

mod common;
#[path = "common/garage.rs"]
mod garage;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Bank, random_bytes};
use garage::Cluster;
use mbank_core::ChunkId;
use mbank_store::ChunkStore;

const CS: usize = 256 << 10;
const KEY_ID: &str = "AWS_ACCESS_KEY_ID";
const SECRET: &str = "AWS_SECRET_ACCESS_KEY";

/// An 8 MiB image of 32 chunks of 256 KiB: 16 distinct non-zero chunks, 8 repeats of
/// them and 8 zero chunks (4 in the middle, 4 at the end as a hole).
fn image(seed: u64) -> (Vec<u8>, Vec<Vec<u8>>) {
    let distinct: Vec<Vec<u8>> = (0..16).map(|i| random_bytes(CS, seed * 100 + i)).collect();
    let mut img = Vec::with_capacity(32 * CS);
    for c in &distinct[..8] {
        img.extend_from_slice(c); // 0..8
    }
    for c in &distinct[..4] {
        img.extend_from_slice(c); // 8..12: repeats
    }
    img.resize(16 * CS, 0); // 12..16: zeros
    for c in &distinct[8..] {
        img.extend_from_slice(c); // 16..24
    }
    for _ in 0..4 {
        img.extend_from_slice(&distinct[8]); // 24..28: one chunk four times
    }
    img.resize(32 * CS, 0); // 28..32: zeros
    (img, distinct)
}

/// Writes `data` to `path`, leaving its zero tail as a hole.
fn write_sparse(path: &Path, data: &[u8]) {
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    fs::write(path, &data[..end]).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(data.len() as u64)
        .unwrap();
}

/// Garage answers a listing from a read quorum of replicas, each filtering deleted
/// objects on its own, so a replica that has not yet heard of a delete can show the
/// object for a moment after the delete succeeded (a read of the object itself is
/// consistent). A count after deletes is therefore waited for, up to a deadline.
fn assert_listing_settles_at(store: &dyn ChunkStore, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = store.stats().unwrap().chunks;
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the store still lists {n} chunks, not {want}, a minute after the deletes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ids(chunks: &[Vec<u8>]) -> Vec<ChunkId> {
    chunks.iter().map(|c| ChunkId::of(c)).collect()
}

#[test]
fn bank_with_its_chunks_in_a_three_node_garage_cluster() {
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{:>6.1} s  {what}", t0.elapsed().as_secs_f64());
    let cluster = Cluster::start();
    phase("cluster started");
    let s3 = cluster.store();
    let url = cluster.store_url();
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let mut bank = Bank::at(&tmp.path().join("bank"), &scratch);
    // Whatever AWS key the developer's environment holds is not the cluster's.
    bank.env = vec![(KEY_ID.into(), None), (SECRET.into(), None)];
    let with_env = |bank: &Bank, secret: &str| {
        let mut b = Bank::at(&bank.path, &bank.scratch);
        b.env = vec![
            (KEY_ID.into(), Some(cluster.key_id().into())),
            (SECRET.into(), Some(secret.into())),
        ];
        b
    };

    // No credentials anywhere: the error names both places they may come from.
    bank.run(&["init", "--store", &url]).failed().stderr_has(&[
        KEY_ID,
        SECRET,
        "s3-credentials",
        "0600",
    ]);
    // A wrong secret: the error names the bucket, an endpoint, and what to check.
    with_env(&bank, &"0".repeat(64))
        .run(&["init", "--store", &url])
        .failed()
        .stderr_has(&[
            "s3://mbank?endpoint=",
            &cluster.endpoints()[0],
            "HTTP 403",
            "refused the credentials from the environment",
        ]);
    // A bucket that does not exist.
    let nobucket = url.replace("s3://mbank?", "s3://nosuchbucket?");
    with_env(&bank, cluster.secret())
        .run(&["init", "--store", &nobucket])
        .failed()
        .stderr_has(&["nosuchbucket"]);
    // No node answering: named, with what to do (after the store's retries).
    let dead = "s3://mbank?endpoint=http://127.0.0.1:9&region=garage";
    with_env(&bank, cluster.secret())
        .run(&["init", "--store", dead])
        .failed()
        .stderr_has(&["http://127.0.0.1:9", "are up and reachable"]);
    // A malformed URL is bad usage.
    bank.run(&["init", "--store", "s3://mbank?region=garage"])
        .code(2)
        .stderr_has(&["no endpoint", "s3://BUCKET?endpoint="]);
    assert!(
        !bank.path.join("MBANK").exists(),
        "failed inits made no bank"
    );
    phase("init errors");

    // Init with the key from the environment.
    let r = with_env(&bank, cluster.secret())
        .run(&["init", "--store", &url])
        .ok();
    assert!(r.stderr.contains(&url), "{r}");
    let marker = fs::read_to_string(bank.path.join("MBANK")).unwrap();
    assert!(marker.starts_with("MBANK-BANK 2\n"), "{marker}");
    assert!(marker.contains(&format!("\nstore {url}\n")), "{marker}");
    assert!(!marker.contains(cluster.secret()) && !marker.contains(cluster.key_id()));
    assert!(bank.path.join("catalog.db").is_file());
    assert!(!bank.path.join("chunks").exists(), "no local chunk store");

    // From now on the key comes from the bank's credentials file, which must be private.
    let creds = bank.path.join("s3-credentials");
    fs::write(
        &creds,
        format!("key_id={}\nsecret={}\n", cluster.key_id(), cluster.secret()),
    )
    .unwrap();
    fs::set_permissions(&creds, fs::Permissions::from_mode(0o644)).unwrap();
    bank.run(&["ls"])
        .failed()
        .stderr_has(&["s3-credentials", "mode 0644", "chmod 600"]);
    fs::set_permissions(&creds, fs::Permissions::from_mode(0o600)).unwrap();
    bank.run(&["ls"]).ok();
    phase("init");

    // Import: zero chunks are not stored, repeats once.
    let (img, distinct) = image(1);
    let img_path = bank.file("a.raw");
    write_sparse(&img_path, &img);
    let r = bank.import("alice/disk", &img_path, &["--chunk-size", "256K"]);
    assert_eq!(r["chunks_total"], 32, "{r}");
    assert_eq!(r["chunks_zero"], 8, "{r}");
    assert_eq!(
        r["chunks_new"].as_u64().unwrap() + r["chunks_dedup"].as_u64().unwrap(),
        24,
        "{r}"
    );
    assert_eq!(
        s3.stats().unwrap().chunks,
        16,
        "distinct chunks in the bucket"
    );
    for id in ids(&distinct) {
        assert!(s3.touch(&id).unwrap(), "chunk {id} is in the bucket");
    }
    assert!(!bank.path.join("chunks").exists(), "no local chunk store");
    bank.assert_exports("alice/disk", &img_path);
    phase("import and export");

    // A second bank cannot take the same bucket.
    let other = Bank::at(&tmp.path().join("other"), &scratch);
    with_env(&other, cluster.secret())
        .run(&["init", "--store", &url])
        .failed()
        .stderr_has(&["already holds chunks", "a bucket of its own"]);

    // A second machine sharing all but two chunks.
    let mut img2 = img.clone();
    let changed = [random_bytes(CS, 901), random_bytes(CS, 902)];
    img2[..CS].copy_from_slice(&changed[0]);
    img2[CS..2 * CS].copy_from_slice(&changed[1]);
    let img2_path = bank.file("b.raw");
    write_sparse(&img2_path, &img2);
    let r = bank.import("bob/disk", &img2_path, &["--chunk-size", "256K"]);
    assert_eq!(r["chunks_new"], 2, "{r}");
    let st = bank.json(&["stats", "--json"]);
    assert_eq!(st["store"], url.as_str(), "{st}");
    assert_eq!(st["chunks"], 18, "{st}");
    assert_eq!(st["chunks_referenced"], 18, "{st}");
    assert_eq!(st["machines"], 2, "{st}");
    let text = bank.run(&["stats"]).ok();
    assert!(
        text.stdout.contains(&format!("store               {url}")),
        "{text}"
    );
    let v = bank.verify_ok();
    assert_eq!(v["chunks_checked"], 18, "{v}");

    // GC keeps everything referenced ...
    let g = bank.gc();
    assert_eq!(g["chunks_referenced"], 18, "{g}");
    assert_eq!(g["chunks_deleted"], 0, "{g}");
    assert_eq!(s3.stats().unwrap().chunks, 18);
    // ... and deletes what no version needs any more, once it is older than the cutoff.
    bank.run(&["rm", "bob/disk"]).ok();
    std::thread::sleep(Duration::from_millis(2500));
    let g = bank.gc();
    assert_eq!(g["chunks_referenced"], 16, "{g}");
    assert_eq!(g["chunks_deleted"], 2, "{g}");
    assert_listing_settles_at(&s3, 16);
    for id in ids(&changed) {
        assert!(!s3.touch(&id).unwrap(), "bob's own chunk {id} was deleted");
    }
    bank.assert_exports("alice/disk", &img_path);
    bank.verify_ok();
    phase("verify and gc");

    // One node down (the first endpoint): import and export go on.
    cluster.stop_node(1);
    phase("node 1 stopped");
    let (img3, _) = image(3);
    let img3_path = bank.file("c.raw");
    write_sparse(&img3_path, &img3);
    let r = bank.import("carol/disk", &img3_path, &["--chunk-size", "256K"]);
    assert_eq!(r["chunks_zero"], 8, "{r}");
    bank.assert_exports("carol/disk", &img3_path);
    bank.assert_exports("alice/disk", &img_path);
    let v = bank.verify_ok();
    assert_eq!(v["chunks_checked"], 32, "{v}");
    phase("import, export and verify with node 1 down");

    // The node comes back; the bank still reads everything.
    cluster.start_node(1);
    phase("node 1 back");
    bank.assert_exports("carol/disk", &img3_path);
    let st = bank.json(&["stats", "--json"]);
    assert_eq!(st["chunks"], 32, "{st}");

    // The bank directory holds the catalog, the credentials, the GC locks (empty
    // files) and the records of the last gc and verify (small JSON), and no chunk.
    let mut names: Vec<String> = fs::read_dir(&bank.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("catalog.db-"))
        .collect();
    names.sort();
    names.retain(|n| {
        let record = n.starts_with("last-") && n.ends_with(".json");
        if record {
            let len = fs::metadata(bank.path.join(n)).unwrap().len();
            assert!(len < 4096, "{n} is {len} bytes, not a small record");
        }
        !record
    });
    assert_eq!(names, ["MBANK", "catalog.db", "locks", "s3-credentials"]);
    for lock in fs::read_dir(bank.path.join("locks")).unwrap() {
        assert_eq!(lock.unwrap().metadata().unwrap().len(), 0);
    }
    phase("done");
}
