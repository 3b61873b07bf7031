//! `mbank create`: a new machine with its configuration.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use mbank_bank::{Bank, DiskFrom, ImportOptions, ImportReport, NewMachine, Progress};
use mbank_core::{MachineName, MachineRef};
use mbank_vm::{Boot, DisplayDevice, MachineConfig, Network};

use crate::fmt::parse_size;

#[derive(clap::Args)]
pub struct Args {
    /// The new machine, as user/name.
    pub machine: MachineName,
    /// Start from this machine's head, or user/name@VERSION.
    #[arg(long, value_name = "MACHINE", conflicts_with = "image")]
    pub from: Option<MachineRef>,
    /// Start from a disk image (raw, qcow2, vmdk, vdi, vhdx, qed).
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// The disk's size, e.g. 8G (grows an image's or a base's disk; never shrinks).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub disk_size: Option<u64>,
    /// Memory, e.g. 1G or 512M [default: 1G, or the --from machine's].
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub memory: Option<u64>,
    /// Virtual CPUs [default: 1, or the --from machine's].
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// QEMU machine type: pc or q35 (pinned to the exact version at the first run).
    #[arg(long, value_name = "TYPE")]
    pub machine_type: Option<String>,
    /// Network: user (NAT to the station's network) or none.
    #[arg(long, value_name = "KIND")]
    pub network: Option<Network>,
    /// Display card: std or none.
    #[arg(long, value_name = "KIND")]
    pub display: Option<DisplayDevice>,
    /// Boot this kernel directly (stored in the bank with the machine) instead of
    /// booting from the disk.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// The initrd for --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line for --kernel [default: console=ttyS0].
    #[arg(long, value_name = "TEXT")]
    pub append: Option<String>,
    /// Where non-raw images are converted to raw first [default: $TMPDIR or /tmp].
    #[arg(long, value_name = "DIR")]
    pub tmpdir: Option<PathBuf>,
}

impl Args {
    fn changes_hardware(&self) -> bool {
        self.memory.is_some()
            || self.cpus.is_some()
            || self.machine_type.is_some()
            || self.network.is_some()
            || self.display.is_some()
            || self.kernel.is_some()
            || self.append.is_some()
            || self.disk_size.is_some()
    }
}

pub fn run(bank: &mut Bank, a: Args, jobs: usize, progress: &dyn Progress) -> Result<ImportReport> {
    if bank.catalog().machine(&a.machine)?.is_some() {
        return Err(mbank_bank::BankError::MachineExists(a.machine.clone()).into());
    }
    let source = a.from.as_ref().map(|r| bank.resolve(r)).transpose()?;
    let mut config = match source.as_ref().and_then(|v| v.config.as_deref()) {
        Some(c) => MachineConfig::from_json(c).context("the --from machine's configuration")?,
        None => MachineConfig::new(),
    };
    let suspended = source.as_ref().is_some_and(|v| v.has_memory());
    if suspended && a.changes_hardware() {
        bail!(
            "{} is suspended: a fork resumes on the same hardware, so it cannot change memory, CPUs, disk size, devices or kernel; fork an older version, or run and power it off first",
            a.from.as_ref().expect("suspended implies --from")
        );
    }
    if !suspended {
        config = config.forked();
    }
    if let Some(m) = a.memory {
        if m % (1 << 20) != 0 {
            bail!("--memory must be a whole number of MiB, e.g. 512M or 2G");
        }
        config.memory_mib = m >> 20;
    }
    if let Some(n) = a.cpus {
        config.cpus = n;
    }
    if let Some(t) = &a.machine_type {
        config.machine_type = t.clone();
    }
    if let Some(n) = a.network {
        config.network = n;
    }
    if let Some(d) = a.display {
        config.display = d;
    }
    if a.kernel.is_some() || a.append.is_some() {
        let append = a.append.clone().unwrap_or_else(|| match &config.boot {
            Boot::Kernel { append } => append.clone(),
            Boot::Firmware => "console=ttyS0".into(),
        });
        if a.kernel.is_none()
            && !source
                .as_ref()
                .is_some_and(|v| v.streams.iter().any(|s| s == "kernel"))
        {
            bail!("--append needs --kernel (or a --from machine that boots a kernel)");
        }
        config.boot = Boot::Kernel { append };
    }
    config.check()?;
    if let Some(have) = mbank_vm::station_memory_mib()
        && config.memory_mib > have
    {
        eprintln!(
            "mbank: warning: {} MiB of memory is more than this station has ({have} MiB); it runs only on larger stations",
            config.memory_mib
        );
    }
    let disk = match (&a.image, &source, a.disk_size) {
        (Some(p), _, _) => DiskFrom::Image(p),
        (None, Some(v), _) => DiskFrom::Version(v),
        (None, None, Some(size)) => DiskFrom::Empty(size),
        (None, None, None) => {
            bail!("give the disk: --image FILE, --from MACHINE, or --disk-size SIZE")
        }
    };
    if let DiskFrom::Empty(size) = disk
        && (size == 0 || size % 512 != 0)
    {
        bail!("--disk-size must be a positive multiple of 512 bytes");
    }
    let writer = bank.begin_write(&format!("create {}", a.machine))?;
    let mut streams = match &source {
        Some(v) => bank.catalog().streams(v)?,
        None => Vec::new(),
    };
    let mut stored = (0, 0);
    if let Some(k) = &a.kernel {
        streams.retain(|(n, _)| n != "kernel" && n != "initrd");
        let files = [("kernel", Some(k)), ("initrd", a.initrd.as_ref())];
        for (name, path) in files {
            let Some(path) = path else { continue };
            let (idx, st) = bank.store_file(&writer, path)?;
            stored.0 += st.chunks_new;
            stored.1 += st.bytes_stored;
            streams.push((name.to_string(), idx));
        }
    }
    if !suspended {
        streams.retain(|(n, _)| n != "memory");
    }
    let mut opts = ImportOptions {
        jobs,
        ..Default::default()
    };
    if let Some(t) = &a.tmpdir {
        opts.temp_dir = t.clone();
    }
    let new = NewMachine {
        machine: &a.machine,
        disk,
        grow_to: a.disk_size,
        config: config.to_json(),
        streams,
        streams_stored: stored,
    };
    Ok(bank.create(new, &writer, &opts, progress)?)
}
