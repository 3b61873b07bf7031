//! # mbank-vm
//!
//! A machine's virtual hardware and how QEMU runs it.
//!
//! - [`MachineConfig`] is stored (as JSON) in every version of a machine: memory, CPUs,
//!   machine type, network, display device, boot method. A version holding a saved
//!   memory state also records [`SavedHardware`]: the accelerator, CPU model and exact
//!   machine type it ran with, so it is resumed on identical virtual hardware.
//! - [`qemu_args`] derives the QEMU command line from a configuration and the
//!   station-local paths of one run, deterministically: the same configuration gives
//!   the same devices at the same addresses, which is what migration (suspend and
//!   resume) needs.
//! - [`qmp`] is a small blocking QMP client.
//! - [`thp`] keeps QEMU's `MADV_HUGEPAGE` off a lazily served RAM file (a seccomp
//!   filter set between fork and exec), which would make the kernel read 4 MiB
//!   around every guest fault.
//!
//! The format of the configuration is in `docs/formats.md`.

pub mod qmp;
pub mod thp;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Configuration format written by this code.
pub const CONFIG_FORMAT: u32 = 1;
/// The QEMU binary: `MBANK_QEMU` or `qemu-system-x86_64`.
pub fn qemu_binary() -> PathBuf {
    std::env::var_os("MBANK_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// What went wrong with a configuration or with QEMU.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("machine configuration: {0}")]
    Config(String),
    #[error("cannot start QEMU ({}): {source}; install it with `apt-get install qemu-system-x86`", binary.display())]
    NoQemu {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// How the guest boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Boot {
    /// The firmware (SeaBIOS) boots from the disk.
    Firmware,
    /// QEMU loads a kernel and initrd stored with the version (streams `kernel` and
    /// `initrd`) and passes `append` as the command line.
    Kernel { append: String },
}

/// The guest's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// No network card.
    None,
    /// A virtio-net card on QEMU's user-mode network (NAT to the station's network).
    User,
}

/// The guest's display card.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DisplayDevice {
    None,
    Std,
}

/// The virtual hardware a saved memory state ran on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHardware {
    /// `kvm` or `tcg`.
    pub accel: Accel,
    /// The exact machine type, e.g. `pc-i440fx-7.2`.
    pub machine_type: String,
    /// `qemu-system-x86_64 --version`'s first line.
    pub qemu_version: String,
}

/// A machine's virtual hardware. Stored with every version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub format: u32,
    pub memory_mib: u64,
    pub cpus: u32,
    /// `pc`, `q35`, or an exact type such as `pc-i440fx-7.2`.
    pub machine_type: String,
    pub network: Network,
    /// The network card's MAC address, fixed at creation so the guest sees the same.
    pub mac: String,
    pub display: DisplayDevice,
    pub boot: Boot,
    /// Present in versions that hold a memory state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<SavedHardware>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            format: CONFIG_FORMAT,
            memory_mib: 1024,
            cpus: 1,
            machine_type: "pc".into(),
            network: Network::User,
            mac: "52:54:00:12:34:56".into(),
            display: DisplayDevice::Std,
            boot: Boot::Firmware,
            saved: None,
        }
    }
}

impl MachineConfig {
    /// A configuration with a fresh random MAC address (QEMU's 52:54:00 prefix).
    pub fn new() -> Self {
        let mut b = [0u8; 3];
        getrandom::fill(&mut b).expect("the OS random source works");
        MachineConfig {
            mac: format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2]),
            ..Default::default()
        }
    }

    /// The configuration of a fork of a version that is not suspended (`mbank create
    /// --from`, the console's and the API's fork): a new machine on the network, so its
    /// own MAC address, and no saved hardware (it boots). A fork of a suspended version
    /// keeps both: it resumes on the same hardware.
    pub fn forked(self) -> Self {
        MachineConfig {
            mac: MachineConfig::new().mac,
            saved: None,
            ..self
        }
    }

    /// Parses and checks a stored configuration.
    pub fn from_json(s: &str) -> Result<Self, VmError> {
        let c: MachineConfig = serde_json::from_str(s)
            .map_err(|e| VmError::Config(format!("cannot parse the stored configuration: {e}")))?;
        if c.format > CONFIG_FORMAT {
            return Err(VmError::Config(format!(
                "format {} is newer than this mbank understands ({CONFIG_FORMAT}); upgrade mbank",
                c.format
            )));
        }
        c.check()?;
        Ok(c)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a configuration serialises")
    }

    /// Refuses values QEMU would refuse later with a less clear message.
    pub fn check(&self) -> Result<(), VmError> {
        if !(16..=1 << 22).contains(&self.memory_mib) {
            return Err(VmError::Config(format!(
                "memory {} MiB is out of range (16 MiB to 4 TiB)",
                self.memory_mib
            )));
        }
        if !(1..=255).contains(&self.cpus) {
            return Err(VmError::Config(format!(
                "{} CPUs is out of range (1 to 255)",
                self.cpus
            )));
        }
        let ok_type = !self.machine_type.is_empty()
            && self
                .machine_type
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
        if !ok_type {
            return Err(VmError::Config(format!(
                "machine type {:?} is not a QEMU machine type name",
                self.machine_type
            )));
        }
        let mac_ok = self.mac.len() == 17
            && self.mac.split(':').count() == 6
            && self
                .mac
                .split(':')
                .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
        if !mac_ok {
            return Err(VmError::Config(format!(
                "{:?} is not a MAC address",
                self.mac
            )));
        }
        if let Boot::Kernel { append } = &self.boot
            && append.contains('\n')
        {
            return Err(VmError::Config(
                "the kernel command line has a line break".into(),
            ));
        }
        Ok(())
    }
}

/// A QEMU accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// The CPU model used with this accelerator: the host's with KVM, QEMU's richest
    /// emulated one with TCG.
    pub fn cpu_model(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }
}

/// True when QEMU can run a guest with KVM here. `/dev/kvm` may exist and still fail
/// once a vCPU starts (nested virtualisation), so this starts a paused QEMU with KVM
/// and sees whether it survives a moment.
pub fn kvm_works() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let child = Command::new(qemu_binary())
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "16",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "none",
            "-S",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    true
}

/// True when QEMU can open a window (its GTK display is installed: Debian's
/// `qemu-system-gui`) and there is a desktop to open it on.
pub fn window_available() -> bool {
    if std::env::var_os("DISPLAY").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none() {
        return false;
    }
    Command::new(qemu_binary())
        .args(["-display", "help"])
        .stderr(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "gtk")
        })
}

/// `qemu-system-x86_64 --version`'s first line.
pub fn qemu_version() -> Result<String, VmError> {
    let bin = qemu_binary();
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .map_err(|source| VmError::NoQemu {
            binary: bin.clone(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

/// The exact machine type an alias (`pc`, `q35`) stands for in this QEMU, from
/// `-machine help`; a name that is no alias is returned as it is.
pub fn resolve_machine_type(name: &str) -> Result<String, VmError> {
    let bin = qemu_binary();
    let out = Command::new(&bin)
        .args(["-machine", "help"])
        .output()
        .map_err(|source| VmError::NoQemu {
            binary: bin.clone(),
            source,
        })?;
    Ok(parse_machine_alias(
        &String::from_utf8_lossy(&out.stdout),
        name,
    ))
}

fn parse_machine_alias(help: &str, name: &str) -> String {
    for line in help.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some(name)
            && let Some(i) = line.find("(alias of ")
        {
            let rest = &line[i + "(alias of ".len()..];
            if let Some(end) = rest.find(')') {
                return rest[..end].to_string();
            }
        }
    }
    name.to_string()
}

/// How a person sees the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Display {
    /// Serial console on a Unix socket (QEMU listens and waits for the first client
    /// before it starts the guest), also logged to a file; no screen.
    Console { socket: PathBuf, log: PathBuf },
    /// VNC on a Unix socket or `host:display`.
    Vnc(String),
    /// A window (GTK) on the person's desktop.
    Window,
    /// Nothing at all.
    None,
}

/// Station-local facts of one run.
pub struct Launch<'a> {
    pub name: &'a str,
    pub config: &'a MachineConfig,
    pub accel: Accel,
    /// The exact machine type to use (see [`resolve_machine_type`]).
    pub machine_type: &'a str,
    /// The disk, served over NBD on this Unix socket.
    pub disk_socket: &'a Path,
    pub qmp_socket: &'a Path,
    /// Files holding the version's kernel and initrd (for [`Boot::Kernel`]).
    pub kernel: Option<&'a Path>,
    pub initrd: Option<&'a Path>,
    /// Appended to the stored kernel command line for this boot only.
    pub extra_append: Option<&'a str>,
    pub display: Display,
    /// Where the serial console goes when the display is not the console.
    pub serial_log: &'a Path,
    /// Resume: read the memory state from this FIFO, start paused.
    pub incoming: Option<&'a Path>,
    /// Lazy memory: the guest's RAM is this file, mapped shared
    /// (`memory-backend-file,share=on`), and a resume waits for `migrate-incoming`
    /// (`-incoming defer`), so that the caller can first turn on `x-ignore-shared`:
    /// QEMU 7.2 has no command-line switch for it.
    pub shared_ram: Option<&'a Path>,
}

/// Quotes `p` for `/bin/sh`.
fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// A QEMU option value with `,` doubled, as QEMU's option parser wants.
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The QEMU command line (without the binary) for `l`. Devices are given fixed PCI
/// addresses so that the same configuration always builds the same machine.
pub fn qemu_args(l: &Launch<'_>) -> Result<Vec<String>, VmError> {
    let c = l.config;
    c.check()?;
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&[
        "-name",
        &format!("{},process=mbank-vm", l.name.replace(',', ",,")),
    ]);
    push(&["-machine", l.machine_type]);
    push(&["-accel", l.accel.name()]);
    push(&["-cpu", l.accel.cpu_model()]);
    push(&["-m", &format!("{}M", c.memory_mib)]);
    if let Some(ram) = l.shared_ram {
        // Named as QEMU names the RAM it makes for `-m` (the pc machines' default RAM
        // id), so a migration stream saved without lazy memory loads into it.
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=pc.ram,share=on,mem-path={},size={}M",
                opt_path(ram),
                c.memory_mib
            ),
        ]);
        push(&["-machine", "memory-backend=pc.ram"]);
    }
    push(&["-smp", &c.cpus.to_string()]);
    push(&["-nodefaults", "-no-user-config"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", opt_path(l.qmp_socket)),
    ]);
    match c.display {
        DisplayDevice::Std => push(&["-device", "VGA,addr=0x2"]),
        DisplayDevice::None => {}
    }
    push(&[
        "-blockdev",
        &format!(
            "driver=nbd,node-name=disk0-nbd,server.type=unix,server.path={}",
            opt_path(l.disk_socket)
        ),
    ]);
    push(&["-blockdev", "driver=raw,node-name=disk0,file=disk0-nbd"]);
    push(&["-device", "virtio-blk-pci,drive=disk0,addr=0x4,bootindex=1"]);
    match c.network {
        Network::User => {
            push(&["-netdev", "user,id=net0"]);
            push(&[
                "-device",
                &format!("virtio-net-pci,netdev=net0,mac={},addr=0x3", c.mac),
            ]);
        }
        Network::None => {}
    }
    if let Boot::Kernel { append } = &c.boot {
        let kernel = l
            .kernel
            .ok_or_else(|| VmError::Config("kernel boot, but the version has no kernel".into()))?;
        push(&["-kernel", &kernel.display().to_string()]);
        if let Some(initrd) = l.initrd {
            push(&["-initrd", &initrd.display().to_string()]);
        }
        let mut cmdline = append.clone();
        if let Some(extra) = l.extra_append {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(extra);
        }
        push(&["-append", &cmdline]);
    }
    push(&["-serial", "chardev:serial0"]);
    match &l.display {
        Display::Console { socket, log } => {
            push(&[
                "-chardev",
                &format!(
                    "socket,id=serial0,path={},server=on,wait=on,logfile={},logappend=on",
                    opt_path(socket),
                    opt_path(log)
                ),
            ]);
            push(&["-display", "none"]);
        }
        other => {
            push(&[
                "-chardev",
                &format!("file,id=serial0,path={}", opt_path(l.serial_log)),
            ]);
            match other {
                Display::Vnc(to) => push(&["-vnc", to]),
                Display::Window => push(&["-display", "gtk"]),
                _ => push(&["-display", "none"]),
            }
        }
    }
    match (l.incoming, l.shared_ram) {
        (Some(_), Some(_)) => push(&["-S", "-incoming", "defer"]),
        (Some(fifo), None) => push(&["-S", "-incoming", &format!("exec:cat {}", sh_quote(fifo))]),
        (None, _) => {}
    }
    Ok(a)
}

/// Creates a FIFO at `path`.
pub fn make_fifo(path: &Path) -> Result<(), VmError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| VmError::Io {
        what: format!("create a FIFO at {}", path.display()),
        source: std::io::Error::other("the path has a NUL byte"),
    })?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    if rc != 0 {
        return Err(VmError::Io {
            what: format!("create a FIFO at {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The station's memory in MiB (`MemTotal` of `/proc/meminfo`).
pub fn station_memory_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_fork_gets_its_own_mac_and_no_saved_hardware_and_keeps_the_rest() {
        let mut c = MachineConfig::new();
        c.memory_mib = 768;
        c.cpus = 3;
        c.saved = Some(SavedHardware {
            accel: Accel::Tcg,
            machine_type: "pc-i440fx-7.2".into(),
            qemu_version: "QEMU emulator version 7.2.0".into(),
        });
        let f = c.clone().forked();
        assert_ne!(f.mac, c.mac);
        assert!(f.mac.starts_with("52:54:00:"), "{}", f.mac);
        assert_eq!(f.saved, None);
        assert_eq!(
            (f.memory_mib, f.cpus, f.boot.clone()),
            (768, 3, c.boot.clone())
        );
    }

    use super::*;

    fn launch<'a>(c: &'a MachineConfig, incoming: Option<&'a Path>) -> Launch<'a> {
        Launch {
            name: "alice/dev",
            config: c,
            accel: Accel::Tcg,
            machine_type: "pc-i440fx-7.2",
            disk_socket: Path::new("/run/s/disk.sock"),
            qmp_socket: Path::new("/run/s/qmp,1.sock"),
            kernel: Some(Path::new("/run/s/kernel")),
            initrd: Some(Path::new("/run/s/initrd")),
            extra_append: Some("mbank.job=ready"),
            display: Display::Console {
                socket: PathBuf::from("/run/s/console.sock"),
                log: PathBuf::from("/run/s/console.log"),
            },
            serial_log: Path::new("/run/s/console.log"),
            incoming,
            shared_ram: None,
        }
    }

    #[test]
    fn the_command_line_follows_from_the_configuration() {
        let c = MachineConfig {
            memory_mib: 256,
            cpus: 2,
            boot: Boot::Kernel {
                append: "console=ttyS0".into(),
            },
            ..MachineConfig::default()
        };
        let a = qemu_args(&launch(&c, None)).unwrap();
        let joined = a.join(" ");
        assert!(joined.contains("-m 256M -smp 2"), "{joined}");
        assert!(joined.contains("-machine pc-i440fx-7.2 -accel tcg -cpu max"));
        assert!(joined.contains("server.path=/run/s/disk.sock"));
        assert!(
            joined.contains("unix:/run/s/qmp,,1.sock,server=on"),
            "commas doubled"
        );
        assert!(joined.contains("mac=52:54:00:12:34:56,addr=0x3"));
        assert!(joined.contains(
            "socket,id=serial0,path=/run/s/console.sock,server=on,wait=on,logfile=/run/s/console.log"
        ));
        let i = a.iter().position(|x| x == "-append").unwrap();
        assert_eq!(a[i + 1], "console=ttyS0 mbank.job=ready");
        assert!(!a.contains(&"-incoming".to_string()));
        // Deterministic: the same inputs give the same line.
        assert_eq!(a, qemu_args(&launch(&c, None)).unwrap());
        // Resuming adds only -S and -incoming; the devices are the same.
        let r = qemu_args(&launch(&c, Some(Path::new("/run/s/mem fifo")))).unwrap();
        assert_eq!(&r[..a.len()], &a[..]);
        assert_eq!(
            r[a.len()..],
            ["-S", "-incoming", "exec:cat '/run/s/mem fifo'"]
        );
    }

    #[test]
    fn lazy_memory_maps_the_ram_file_shared_and_defers_the_incoming_state() {
        let c = MachineConfig {
            memory_mib: 256,
            ..MachineConfig::default()
        };
        let mut l = launch(&c, Some(Path::new("/run/s/memory.in")));
        l.shared_ram = Some(Path::new("/run/s/ram,mnt/ram"));
        let joined = qemu_args(&l).unwrap().join(" ");
        assert!(
            joined.contains(
                "-object memory-backend-file,id=pc.ram,share=on,mem-path=/run/s/ram,,mnt/ram,size=256M -machine memory-backend=pc.ram"
            ),
            "{joined}"
        );
        assert!(joined.ends_with("-S -incoming defer"), "{joined}");
        l.incoming = None;
        let boot = qemu_args(&l).unwrap().join(" ");
        assert!(
            !boot.contains("-incoming") && boot.contains("share=on"),
            "{boot}"
        );
    }

    #[test]
    fn bad_configurations_are_refused_with_a_reason() {
        let mut c = MachineConfig::new();
        c.check().unwrap();
        assert!(c.mac.starts_with("52:54:00:"));
        c.memory_mib = 0;
        assert!(c.check().unwrap_err().to_string().contains("memory 0 MiB"));
        let c = MachineConfig {
            machine_type: "pc,accel=kvm".into(),
            ..Default::default()
        };
        assert!(c.check().is_err(), "no option injection through the type");
        let c = MachineConfig {
            mac: "nope".into(),
            ..Default::default()
        };
        assert!(c.check().is_err());
        let json = MachineConfig::default().to_json();
        assert_eq!(
            MachineConfig::from_json(&json).unwrap(),
            MachineConfig::default()
        );
        let newer = json.replace("\"format\":1", "\"format\":99");
        assert!(
            MachineConfig::from_json(&newer)
                .unwrap_err()
                .to_string()
                .contains("newer")
        );
        assert!(MachineConfig::from_json("{").is_err());
    }

    #[test]
    fn machine_aliases_resolve_from_qemu_help() {
        let help = "Supported machines are:\n\
            pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n\
            pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n\
            q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n";
        assert_eq!(parse_machine_alias(help, "pc"), "pc-i440fx-7.2");
        assert_eq!(parse_machine_alias(help, "q35"), "pc-q35-7.2");
        assert_eq!(parse_machine_alias(help, "pc-q35-6.0"), "pc-q35-6.0");
    }
}

macro_rules! from_str {
    ($t:ty, $what:literal, $($name:literal => $v:expr),+) => {
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok($v),)+
                    _ => Err(format!(concat!("unknown ", $what, " {:?}; choose one of: {}"), s, [$($name),+].join(", "))),
                }
            }
        }
    };
}

from_str!(Accel, "accelerator", "kvm" => Accel::Kvm, "tcg" => Accel::Tcg);
from_str!(Network, "network", "user" => Network::User, "none" => Network::None);
from_str!(DisplayDevice, "display card", "std" => DisplayDevice::Std, "none" => DisplayDevice::None);
