//! A lab network on this machine for tests: `scripts/lab-net.sh` makes the bank
//! server's and the stations' network namespaces, joined by a bridge, each station's
//! link shaped with `tc tbf` in both directions. [`Lab`] brings one up and tears it
//! down when dropped (also while a failing test unwinds); [`LabServer`] runs
//! `mbank serve` over TLS in the server's namespace and hands out clients that run
//! `mbank` in a station's namespace. Needs root, iproute2 and openssl (tests run as
//! root in CI; `scripts/setup.sh` installs the rest).
//!
//! A lab is named `mbt<pid>-<n>`: a test process killed before its drops ran leaves
//! namespaces that the next [`Lab::up`] removes (their pid is gone).
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::pki;
use crate::common::{BIN, Bank, require_root, run_cmd, run_with_input, serve_port};

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/lab-net.sh")
}

/// Runs `lab-net.sh ARGS`; panics with its output unless it succeeds.
fn lab_net(args: &[&str]) -> String {
    let mut c = Command::new(script());
    c.args(args).stdin(Stdio::null());
    let r = run_cmd(c);
    assert!(r.success(), "lab-net.sh failed:\n{r}");
    r.stdout
}

/// One lab, up until dropped.
pub struct Lab {
    pub name: String,
    pub server_ns: String,
    pub server_addr: String,
    /// The stations' namespaces (station 1 first).
    pub stations: Vec<String>,
    /// The shaped rate of every station's link, bit/s (0: not shaped).
    pub rate_bit: u64,
    /// With `--store garage`: the cluster's `init --store` URL and its key (variables
    /// for a command run in the server's namespace, where the cluster listens).
    pub garage: Option<Vec<(String, String)>>,
}

/// A tbf qdisc's settings and counters, as `tc -s -j qdisc` reports them.
#[derive(Debug, Clone, Copy)]
pub struct Tbf {
    /// The configured rate, bytes/s.
    pub rate: u64,
    /// Bytes and packets the qdisc sent.
    pub bytes: u64,
    pub packets: u64,
    /// How often a packet had to wait for tokens: the shaping at work.
    pub overlimits: u64,
}

impl Lab {
    /// A new lab of `stations` stations on `profile` (`1gbit`, `100mbit`, `none`).
    pub fn up(stations: usize, profile: &str) -> Lab {
        Lab::up_with(stations, profile, "dir")
    }

    /// [`Lab::up`] with the bank server's chunks in `store`: `dir` (the bank
    /// directory) or `garage` (a three-node Garage cluster in the server's namespace,
    /// which must be installed: `scripts/garage.sh install`).
    pub fn up_with(stations: usize, profile: &str, store: &str) -> Lab {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        require_root("a lab network (network namespaces)");
        remove_stale_labs();
        let name = format!(
            "mbt{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        // From here on, a panic drops the Lab, which removes what `up` made.
        let mut lab = Lab {
            name: name.clone(),
            server_ns: String::new(),
            server_addr: String::new(),
            stations: Vec::new(),
            rate_bit: 0,
            garage: None,
        };
        let out = lab_net(&[
            "up",
            "--name",
            &name,
            "--stations",
            &stations.to_string(),
            "--profile",
            profile,
            "--store",
            store,
        ]);
        // `up` prints the lab as shell assignments (VAR=value, quoted by `printf %q`:
        // a backslash before each character the shell would take specially).
        let var = |v: &str| -> String {
            let q = out
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{v}=")))
                .unwrap_or_else(|| panic!("lab-net.sh up did not print {v}:\n{out}"));
            let mut value = String::new();
            let mut chars = q.chars();
            while let Some(c) = chars.next() {
                value.push(if c == '\\' {
                    chars.next().unwrap_or(c)
                } else {
                    c
                });
            }
            value
        };
        lab.server_ns = var("MBANK_LAB_SERVER_NS");
        lab.server_addr = var("MBANK_LAB_SERVER_ADDR");
        lab.stations = var("MBANK_LAB_STATION_NS")
            .split(' ')
            .map(String::from)
            .collect();
        lab.rate_bit = var("MBANK_LAB_RATE_BIT").parse().unwrap();
        if store == "garage" {
            lab.garage = Some(
                [
                    "MBANK_LAB_STORE_URL",
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                ]
                .iter()
                .map(|v| (v.to_string(), var(v)))
                .collect(),
            );
        }
        assert_eq!(lab.stations.len(), stations, "{out}");
        lab
    }

    /// `program` run in namespace `ns`.
    pub fn cmd_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c.stdin(Stdio::null());
        c
    }

    /// Station `k`'s namespace (1-based, as the script numbers them).
    pub fn station(&self, k: usize) -> &str {
        &self.stations[k - 1]
    }

    /// The tbf qdisc on `dev` in namespace `ns`.
    pub fn tbf(ns: &str, dev: &str) -> Tbf {
        let mut c = Lab::cmd_in(ns, "tc");
        c.args(["-s", "-j", "qdisc", "show", "dev", dev]);
        let r = run_cmd(c).ok();
        let v: Value = serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("tc -j printed no JSON ({e}):\n{r}"));
        let q = v
            .as_array()
            .and_then(|a| a.iter().find(|q| q["kind"] == "tbf"))
            .unwrap_or_else(|| panic!("no tbf qdisc on {dev} in {ns}:\n{r}"));
        let n = |x: &Value| {
            x.as_u64()
                .unwrap_or_else(|| panic!("tc -j: not a count: {x} in\n{r}"))
        };
        Tbf {
            rate: n(&q["options"]["rate"]),
            bytes: n(&q["bytes"]),
            packets: n(&q["packets"]),
            overlimits: n(&q["overlimits"]),
        }
    }

    /// The shaping of what station `k` receives (its port on the switch).
    pub fn download(&self, k: usize) -> Tbf {
        Lab::tbf(&format!("{}-sw", self.name), &format!("p-st{k}"))
    }

    /// The shaping of what station `k` sends (its eth0).
    pub fn upload(&self, k: usize) -> Tbf {
        Lab::tbf(self.station(k), "eth0")
    }

    /// The lab's namespaces that exist now.
    pub fn namespaces(&self) -> Vec<String> {
        namespaces()
            .into_iter()
            .filter(|n| n.starts_with(&format!("{}-", self.name)))
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let r = Command::new(script())
            .args(["down", "--name", &self.name])
            .stdin(Stdio::null())
            .output();
        match r {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "lab-net.sh down --name {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cannot run lab-net.sh down --name {}: {e}", self.name),
        }
    }
}

/// Every network namespace's name.
pub fn namespaces() -> Vec<String> {
    let o = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("this test needs ip (iproute2): run scripts/setup.sh");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

/// Removes the labs of test processes that are gone (killed before their drops ran).
fn remove_stale_labs() {
    let mut stale = std::collections::BTreeSet::new();
    for ns in namespaces() {
        let Some(rest) = ns.strip_prefix("mbt") else {
            continue;
        };
        let mut parts = rest.splitn(3, '-');
        let (Some(pid), Some(n), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok()
            && n.parse::<u32>().is_ok()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            stale.insert(format!("mbt{pid}-{n}"));
        }
    }
    for name in stale {
        eprintln!("removing lab {name}, left by a test process that is gone");
        lab_net(&["down", "--name", &name]);
    }
}

/// `mbank serve` over TLS in a lab's server namespace, on a bank in a temporary
/// directory of this host (the namespaces share the file system), with users added
/// by [`LabServer::add_user`]. Killed when dropped (before the lab goes down).
pub struct LabServer {
    pub tmp: tempfile::TempDir,
    /// The server's namespace, and the Garage variables of a lab with its chunks there
    /// ([`LabServer::host`] runs in that namespace then).
    server_ns: String,
    garage: Option<Vec<(String, String)>>,
    pub bank_dir: PathBuf,
    pub ca: PathBuf,
    pub port: u16,
    pub addr: String,
    child: Option<Child>,
    log: PathBuf,
}

impl LabServer {
    pub fn start(lab: &Lab) -> LabServer {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let bank_dir = root.join("bank");
        let mut host = Bank::at(&bank_dir, &root);
        match &lab.garage {
            None => {
                host.run(&["init"]).ok();
            }
            Some(vars) => {
                host.netns = Some(lab.server_ns.clone());
                let url = &vars[0].1;
                host.env = vars[1..]
                    .iter()
                    .map(|(k, v)| (k.clone(), Some(v.clone())))
                    .collect();
                host.run(&["init", "--store", url]).ok();
            }
        }
        let ca = pki::Ca::new(&root, "ca");
        let (cert, key) = ca.server_for(&root.join("server"), &lab.server_addr);
        let log = root.join("server.log");
        let mut c = Lab::cmd_in(&lab.server_ns, BIN);
        c.env_remove("MBANK_BANK").env("MBANK_LOG", "warn");
        for (k, v) in lab.garage.iter().flatten().skip(1) {
            c.env(k, v);
        }
        c.arg("--bank").arg(&bank_dir).arg("serve");
        c.arg("--listen").arg(format!("{}:0", lab.server_addr));
        c.arg("--tls-cert").arg(&cert).arg("--tls-key").arg(&key);
        c.stdout(Stdio::piped());
        c.stderr(fs::File::create(&log).unwrap());
        let mut child = c.spawn().unwrap();
        let port = serve_port(&mut child, &log);
        LabServer {
            server_ns: lab.server_ns.clone(),
            garage: lab.garage.clone(),
            ca: ca.cert(),
            tmp,
            bank_dir,
            port,
            addr: lab.server_addr.clone(),
            child: Some(child),
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}:{}", self.addr, self.port)
    }

    /// The bank on its host, for `import`, `admin`, ...: run in this namespace, or in
    /// the server's when its chunks are on the lab's Garage cluster (which listens
    /// there).
    pub fn host(&self) -> Bank {
        let mut b = Bank::at(&self.bank_dir, self.tmp.path());
        if let Some(vars) = &self.garage {
            b.netns = Some(self.server_ns.clone());
            b.env = vars[1..]
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect();
        }
        b
    }

    pub fn add_user(&self, user: &str, password: &str) {
        let mut c = self.host().cmd();
        c.args(["admin", "user", "add", user, "--password-stdin"]);
        run_with_input(c, format!("{password}\n").as_bytes()).ok();
    }

    /// `user` logged in from namespace `ns`; every command of the returned bank runs
    /// there, against the server's URL.
    pub fn login(&self, ns: &str, user: &str, password: &str) -> Bank {
        let config = self.tmp.path().join(format!("config-{user}-{ns}"));
        let scratch = self.tmp.path().join(format!("scratch-{user}-{ns}"));
        let mut b = Bank::remote(&self.url(), &scratch, &config);
        b.netns = Some(ns.to_string());
        let mut c = Lab::cmd_in(ns, BIN);
        c.env_remove("MBANK_BANK").env("XDG_CONFIG_HOME", &config);
        c.arg("login")
            .arg(self.url())
            .args(["--user", user, "--password-stdin", "--ca-cert"])
            .arg(&self.ca);
        run_with_input(c, format!("{password}\n").as_bytes()).ok();
        b
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LabServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
