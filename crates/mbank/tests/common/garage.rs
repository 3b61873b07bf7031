//! A Garage cluster (three nodes on 127.0.0.1, replication factor 3) for tests of
//! banks whose chunks are in S3, run by `scripts/garage.sh` in a temporary directory.
//! Garage must be installed already (`scripts/setup.sh` builds it once): a test that
//! needs it fails, rather than skips, when it is not.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mbank_store::{S3Config, S3Store};

/// Where `scripts/garage.sh install` puts the binary.
pub const GARAGE_BIN: &str = "/var/cache/mbank-dev/garage/bin/garage";

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/garage.sh")
}

/// Panics with what to do unless Garage is installed.
pub fn require_garage() {
    assert!(
        Path::new(GARAGE_BIN).is_file(),
        "this test needs Garage at {GARAGE_BIN}, and it is not there: run scripts/setup.sh \
         (it builds Garage once, which takes many minutes), then run the test again"
    );
}

/// Runs `garage.sh` with `args`, which must succeed; returns its standard output.
pub fn garage(args: &[&str]) -> String {
    let out = Command::new(script()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "garage.sh {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A running cluster; stopped when dropped, even when the test fails.
pub struct Cluster {
    dir: tempfile::TempDir,
    /// What `garage.sh start` printed: GARAGE_ENDPOINTS, AWS_ACCESS_KEY_ID, ...
    pub env: HashMap<String, String>,
}

impl Cluster {
    pub fn start() -> Cluster {
        require_garage();
        let dir = tempfile::tempdir().unwrap();
        let out = garage(&["start", dir.path().to_str().unwrap()]);
        let env = out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
            .collect();
        Cluster { dir, env }
    }

    /// Kills node `n` (1..3), as in a crash.
    pub fn stop_node(&self, n: u32) {
        garage(&[
            "stop-node",
            self.dir.path().to_str().unwrap(),
            &n.to_string(),
        ]);
    }

    /// Starts node `n` again; returns once it is healthy.
    pub fn start_node(&self, n: u32) {
        garage(&[
            "start-node",
            self.dir.path().to_str().unwrap(),
            &n.to_string(),
        ]);
    }

    /// Every node's S3 endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        self.env["GARAGE_ENDPOINTS"]
            .split_whitespace()
            .map(String::from)
            .collect()
    }

    pub fn bucket(&self) -> &str {
        &self.env["GARAGE_BUCKET"]
    }

    pub fn key_id(&self) -> &str {
        &self.env["AWS_ACCESS_KEY_ID"]
    }

    pub fn secret(&self) -> &str {
        &self.env["AWS_SECRET_ACCESS_KEY"]
    }

    /// The `--store` URL of the cluster's bucket, with every node's endpoint.
    pub fn store_url(&self) -> String {
        format!(
            "s3://{}?endpoint={}&region={}",
            self.bucket(),
            self.endpoints().join(","),
            self.env["GARAGE_REGION"]
        )
    }

    /// A store on the cluster's bucket, to look at what a bank put there.
    pub fn store(&self) -> S3Store {
        S3Store::new(S3Config::new(
            self.endpoints(),
            &self.env["GARAGE_REGION"],
            self.bucket(),
            self.key_id(),
            self.secret(),
        ))
        .unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["stop", self.dir.path().to_str().unwrap()])
            .status();
    }
}
