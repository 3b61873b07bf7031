//! `mbank`: the Machine Bank command line.
//!
//! Output rules: what scripts read goes to standard output (a version id, a table, or
//! with `--json` one JSON document); progress and summaries go to standard error.
//! Exit codes: 0 success, 1 failure, 2 bad usage, 3 `verify` found damage.

mod admin;
mod attach;
mod create;
mod files;
mod fmt;
mod login;
mod mount;
mod out;
mod peer;
mod progress;
mod run;
mod serve;
mod set;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mbank_bank::{Bank, BankError, ImageFormat, ImportOptions};
use mbank_core::{MachineName, MachineRef};

use crate::fmt::{bytes, date, parse_size};
use crate::out::outln;
use crate::progress::Bar;

const AFTER_HELP: &str = "\
A bank is a directory holding a content-addressed chunk store and a catalog of
machines and their versions. Disks are cut into fixed-size chunks named by their
BLAKE3 hash; a chunk the bank already has is never stored twice, and all-zero
chunks are never stored at all.

Examples:
  mbank --bank ./bank init
  mbank --bank ./bank import alice/dev disk.qcow2      # prints the new version id
  mbank --bank ./bank import alice/dev disk-v2.raw     # stores only what changed
  mbank --bank ./bank log alice/dev
  mbank --bank ./bank export alice/dev@1a2b3c out.raw
  mbank --bank ./bank verify && mbank --bank ./bank gc

Exit status: 0 success, 1 failure, 2 bad usage, 3 verify found damage.";

#[derive(Parser)]
#[command(name = "mbank", version, about = "Machine Bank: keep versioned virtual machine disks in a deduplicating bank", after_help = AFTER_HELP)]
struct Cli {
    /// The bank: a directory (created by `init`), or a bank server's URL
    /// (https://HOST:PORT; log in first with `mbank login`).
    #[arg(long, global = true, env = "MBANK_BANK", value_name = "DIR|URL")]
    bank: Option<PathBuf>,
    /// Worker threads for hashing, compression and I/O [default: one per core; at
    /// least 8 for a bank server].
    #[arg(long, short = 'j', global = true, value_name = "N", value_parser = parse_jobs)]
    jobs: Option<usize>,
    /// No progress bars or summaries on standard error.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    /// The station's chunk cache, shared by every session on this PC
    /// [default: /var/cache/mbank for root, else ~/.cache/mbank].
    #[arg(long, global = true, env = "MBANK_CACHE", value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Bound on the station cache's size, e.g. 10G [default: 10G].
    #[arg(long, global = true, value_parser = parse_size, value_name = "SIZE")]
    cache_size: Option<u64>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new, empty bank in the --bank directory.
    Init {
        /// Keep the chunks in an S3 bucket of their own rather than in the directory
        /// (the catalog stays in the directory):
        /// s3://BUCKET?endpoint=URL[,URL...]&region=REGION, e.g.
        /// s3://mbank?endpoint=http://127.0.0.1:3900&region=garage. Give every node's
        /// endpoint. The key comes from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, else
        /// from DIR/s3-credentials (lines key_id=... and secret=..., mode 0600), which may
        /// be in DIR before init; every later command reads it the same way.
        #[arg(long, value_name = "URL")]
        store: Option<mbank_bank::StoreSpec>,
        /// Keep the catalog and the access rights in a PostgreSQL database rather than
        /// in SQLite files in the directory, so that several `mbank serve` processes
        /// (on this host or others, behind any HTTP load balancer) can share the bank:
        /// postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE. The database must exist
        /// and be empty. The URL is kept in DIR/postgres.url (mode 0600); a second
        /// server's host needs a copy of DIR's MBANK, postgres.url and, with --store,
        /// s3-credentials (its chunks must be reachable there too: a shared bucket).
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
    },
    /// Store a disk image (raw, qcow2, vmdk, vdi, vhdx, qed) as a new version of a machine.
    ///
    /// Prints the new version's id. Only chunks the bank does not have yet are stored.
    /// A machine is created by its first import.
    Import {
        /// The machine, as user/name.
        machine: MachineName,
        /// The disk image file, or - for standard input (copied into a sparse file in
        /// --tmpdir first: an image's size must be known before it is chunked).
        image: PathBuf,
        /// Chunk size of a new machine: a power of two from 4K to 4M. An existing
        /// machine keeps its own.
        #[arg(long, value_parser = parse_chunk_size, value_name = "SIZE")]
        chunk_size: Option<u32>,
        /// The image's format, when it should not be recognised from its contents.
        #[arg(long, value_name = "FORMAT")]
        format: Option<ImageFormat>,
        /// Where non-raw images are converted to raw, and standard input is copied, first
        /// [default: $TMPDIR or /tmp].
        #[arg(long, value_name = "DIR")]
        tmpdir: Option<PathBuf>,
        /// zstd compression level (1-19).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// Print a JSON report instead of the version id.
        #[arg(long)]
        json: bool,
        /// Repair the bank from this image instead of adding a version: re-read every
        /// chunk the image shares with the bank, rewrite from the image each one that
        /// fails its hash, and store any the bank lacks. Use the image the damaged
        /// versions were imported from. Slower than an import (it reads back every
        /// shared chunk); on the bank's host only.
        #[arg(long, conflicts_with = "chunk_size")]
        repair: bool,
    },
    /// Write a version's disk as a raw image (sparse where the disk is zero).
    Export {
        /// user/name for the head, or user/name@VERSION (any unique prefix of 4+ digits).
        machine: MachineRef,
        /// The output file, or - for standard output. A symlink is written through (the
        /// file it points to is replaced); a device or FIFO is written in place.
        output: PathBuf,
        /// Replace an existing file (it is replaced only once the export is complete).
        #[arg(long)]
        force: bool,
        /// Print a JSON report: {machine, version, path, disk_size, chunks_read,
        /// chunks_zero, bytes_written, seconds}, and pack: {segments, bytes, chunks,
        /// fell_back} when the bank offered the version's pack.
        #[arg(long)]
        json: bool,
    },
    /// Pack a version for exports over the network: its chunks, in the order the disk
    /// uses them, compressed as a few large zstd streams rather than one frame per
    /// chunk (a Debian disk: about a fifth fewer bytes to send).
    ///
    /// An export through a bank server takes the version's chunks from its pack when
    /// it has one, and from the chunks otherwise (also when the pack turns out
    /// damaged). On the bank's host the pack goes into <bank>/packs/; given the
    /// server's URL, the server builds it (for administrators: a pack is a second copy
    /// of the data that no quota counts). `mbank admin publish` packs the published
    /// head itself; `mbank gc` removes the packs of removed versions.
    Pack {
        /// user/name for the head, or user/name@VERSION (any unique prefix of 4+ digits).
        machine: MachineRef,
        /// zstd level, 1 to 19 (on the bank's host; a server uses its default).
        #[arg(long, default_value_t = mbank_core::pack::DEFAULT_LEVEL,
              value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// Print a JSON report: {machine, version, chunks, segments, plain_bytes,
        /// stored_bytes, pack_bytes, level, path, seconds}.
        #[arg(long)]
        json: bool,
    },
    /// Show a machine's versions, newest first.
    ///
    /// STATE says `in use` for the version a session (`run` or `attach`, on any
    /// station) has checked out now, `suspended` for one with a saved memory state.
    Log {
        /// The machine, as user/name.
        machine: MachineName,
        /// Print a JSON list of the versions (newest first) with their configuration.
        #[arg(long)]
        json: bool,
    },
    /// Change a machine's memory or CPUs (a new version with the head's disk), or its
    /// settings (its checkpoint interval).
    ///
    /// A new memory size or CPU count makes a new version: the head must not be
    /// suspended (its memory resumes only on the hardware it was saved with) and no
    /// session may run on the machine; the new version's id is printed. A setting is
    /// kept in the bank beside the versions and applies from the next session on any
    /// station; `mbank info` shows it.
    #[command(after_help = "Examples:
  mbank set alice/dev --memory 2G --cpus 2
  mbank set alice/dev --checkpoint-minutes 5
  mbank set alice/dev --checkpoint-minutes default")]
    Set {
        #[command(flatten)]
        args: set::Args,
        /// Print a JSON report instead of the version id.
        #[arg(long)]
        json: bool,
    },
    /// Show the sessions on this station and where the bank says your machines are
    /// checked out now.
    ///
    /// For each live session on this station (the --cache): the machine, the version
    /// it started from, `run` or `attach`, since when, its process id and, for a `run`
    /// shown over VNC, the VNC address. Then, from the bank, each of your machines that
    /// a session holds now: the station (host and cache directory) and since when.
    Status {
        /// Print one JSON document: {station, sessions, leased, warnings}.
        #[arg(long)]
        json: bool,
    },
    /// List the machines in the bank, or the files of a version: user/name[@VERSION]:/path.
    ///
    /// With a path, the disk is read lazily through the station cache: an MBR or GPT
    /// partition table and ext2/3/4 file systems. `:/path` is in the first partition
    /// whose file system can be read; `:p2/path` names partition 2 (p0: a file system
    /// on the whole disk).
    Ls {
        /// A version and a path in it: user/name[@VERSION]:/path.
        target: Option<files::Spec>,
        /// Print one JSON document: the machines, or [{name, type, size, mode, mtime, target?}].
        #[arg(long)]
        json: bool,
    },
    /// Print a file of a version to standard output: user/name[@VERSION]:/etc/hostname.
    Cat {
        /// A version and a file in it: user/name[@VERSION]:[pN]/path.
        target: files::Spec,
    },
    /// Copy a file or a directory tree out of a version.
    ///
    /// An existing DEST is not replaced without --force (an existing directory then
    /// receives the tree, files of the same name replaced); a file restored into an
    /// existing directory keeps its name. Modes and symlinks are kept; devices, FIFOs
    /// and sockets are skipped.
    Restore {
        /// A version and a path in it: user/name[@VERSION]:[pN]/path.
        target: files::Spec,
        /// Where to write it.
        dest: PathBuf,
        /// Replace what DEST holds.
        #[arg(long)]
        force: bool,
        /// Print one JSON document: {files, dirs, symlinks, bytes, skipped}.
        #[arg(long)]
        json: bool,
    },
    /// Show a version read-only on a directory (FUSE) until Ctrl-C or SIGTERM.
    ///
    /// DIR/disk.raw is the whole disk as an image file; DIR/p1/, DIR/p2/ … hold the
    /// files of each partition whose file system can be read (ext2/3/4). Everything is
    /// read lazily through the station cache, which every mount and session on this PC
    /// shares. Needs /dev/fuse, and root or fusermount3.
    Mount {
        /// The version, user/name[@VERSION] (the head without @VERSION).
        version: MachineRef,
        /// An existing empty directory.
        dir: PathBuf,
    },
    /// What differs between two versions: chunks and bytes, and the files added,
    /// removed and changed in each partition whose file system can be read.
    Diff {
        /// The older version, user/name[@VERSION].
        a: MachineRef,
        /// The newer version, user/name[@VERSION] (any machine).
        b: MachineRef,
        /// Print one JSON document: {a, b, chunks_differ, bytes_differ, partitions:
        /// [{partition, added, removed, changed}], not_compared}.
        #[arg(long)]
        json: bool,
    },
    /// Rename a machine; its versions keep their ids and history.
    ///
    /// The new name names the same versions (`NEW@VERSION` is what `OLD@VERSION` was),
    /// with their notes, tags and retention policy. The owner stays: to give a machine
    /// to another user, fork it (`mbank create NEW --from OLD`). Refused while a session
    /// holds the machine.
    Rename {
        /// The machine's name now, as user/name.
        old: MachineName,
        /// Its new name, as user/name (same user).
        new: MachineName,
    },
    /// Re-hash every chunk that some version needs (or one machine's versions need).
    ///
    /// Damaged chunks are moved aside into <bank>/corrupt and listed with every version
    /// that needs them; the exit status is then 3. `mbank import --repair MACHINE IMAGE`
    /// with the image a version was made from puts good copies back. The catalog is
    /// checked too (SQLite's integrity check, each version's record against its checksum).
    Verify {
        /// Only the versions of this machine (user/name) [default: every machine].
        machine: Option<MachineName>,
        /// Print a JSON report: what was checked, and each damaged chunk with the versions that need it.
        #[arg(long)]
        json: bool,
    },
    /// Delete chunks that no version needs. Safe while imports run.
    ///
    /// With --bank URL (an administrator's token), the server runs it on its bank and
    /// this command shows its progress and outcome; `verify` likewise.
    Gc {
        /// Print a JSON report: chunks and bytes deleted and kept.
        #[arg(long)]
        json: bool,
    },
    /// Forget a version (user/name@VERSION) or a whole machine (user/name).
    ///
    /// Removing the head moves it to the removed version's parent. The chunks are
    /// deleted by the next gc.
    Rm {
        /// user/name@VERSION for one version, user/name for the whole machine.
        machine: MachineRef,
        /// Print a JSON report of what was removed.
        #[arg(long)]
        json: bool,
    },
    /// Remove the versions of a machine that a retention policy does not keep.
    ///
    /// Each --keep-* rule means what it means for restic's forget: --keep-last N keeps
    /// the N newest versions; --keep-hourly/-daily/-weekly/-monthly N keep the newest
    /// version of each of the N newest hours (days, ISO weeks, months, in UTC) that have
    /// versions, and the oldest version too while a rule has a count left. A version is
    /// kept if any rule keeps it. Whatever the rules say, the head, the version any
    /// session reads from, and a suspended version nothing was made from yet are kept.
    /// The chunks are deleted by the next gc. With --set-policy the rules are kept in
    /// the bank as the machine's policy, shown by `info`, and applied after each
    /// check-in; `forget MACHINE` without rules applies that policy.
    #[command(after_help = "Examples:
  mbank forget alice/dev --keep-last 5 --keep-daily 7 --dry-run
  mbank forget alice/dev --keep-last 3 --keep-weekly 4 --set-policy
  mbank forget alice/dev --clear-policy
  mbank forget alice/dev && mbank gc     # on the bank's host; frees quota on a server")]
    Forget {
        /// The machine, as user/name.
        machine: MachineName,
        #[command(flatten)]
        keep: KeepArgs,
        /// Say what would be removed; remove nothing.
        #[arg(long, conflicts_with_all = ["set_policy", "clear_policy"])]
        dry_run: bool,
        /// Keep these rules as the machine's policy (applied now and after each check-in).
        #[arg(long, conflicts_with = "clear_policy")]
        set_policy: bool,
        /// Remove the machine's policy; no version is removed.
        #[arg(long)]
        clear_policy: bool,
        /// Print the decision on every version as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a machine's head, or make another version the head (roll back).
    ///
    /// `head user/name@VERSION` moves the head to VERSION by compare-and-swap: it is
    /// refused if the head moved since it was read (or is not --expect), and while a
    /// session runs on the machine, whose check-in will move the head itself. The next
    /// attach or run starts from the new head; no version is removed.
    Head {
        /// user/name to show the head, user/name@VERSION to move it there.
        machine: MachineRef,
        /// Move only if the head is this version (`none` for no head).
        #[arg(long, value_name = "VERSION")]
        expect: Option<String>,
        /// Print the head as JSON: {machine, head}.
        #[arg(long)]
        json: bool,
    },
    /// Put a note and tags on a version (the head by default); `log` shows them.
    #[command(after_help = "Examples:
  mbank note alice/dev@1a2b3c \"before the kernel upgrade\" --tag good
  mbank note alice/dev --untag good
  mbank note alice/dev@1a2b3c \"\"      # removes the note")]
    Note {
        /// user/name for the head, or user/name@VERSION.
        machine: MachineRef,
        /// The note (at most 1 KiB); an empty one removes it; none leaves it as it is.
        text: Option<String>,
        /// Add a tag: 1 to 64 letters, digits and - _ . : + (repeatable).
        #[arg(long, value_name = "TAG")]
        tag: Vec<String>,
        /// Remove a tag (repeatable).
        #[arg(long, value_name = "TAG")]
        untag: Vec<String>,
        /// Print the version's note and tags as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a machine: its head, versions, retention policy and any session on it.
    Info {
        /// The machine, as user/name.
        machine: MachineName,
        /// Print one JSON document: head, versions, policy, settings, session.
        #[arg(long)]
        json: bool,
    },
    /// Serve a machine's disk over NBD; check in what was written when it ends.
    ///
    /// Reads are fetched from the bank on demand and kept in the station cache; writes
    /// go to a session overlay. On SIGINT or SIGTERM the server stops, the written chunks
    /// are checked in as a new version (printed on standard output), and the lease is
    /// released. Any NBD client can use the disk: qemu, qemu-img, qemu-io, nbdcopy, fio.
    /// A session left behind by a crash is checked in by the next attach or `recover`.
    Attach {
        #[command(flatten)]
        args: attach::Args,
        /// Print the end-of-session statistics as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a machine: from an image, an empty disk, or another machine's version.
    ///
    /// Prints the new version's id. --from forks any version (user/name@VERSION) or a
    /// published base: the new machine shares every chunk, and takes its hardware
    /// unless options here change it. A suspended version forks with its memory, so
    /// the fork resumes where it stopped (its hardware cannot change).
    #[command(after_help = "Examples:
  mbank create alice/dev --image disk.qcow2 --memory 2G --cpus 2
  mbank create alice/dev --disk-size 8G --memory 1G --from lab/debian12
  mbank create alice/try --from alice/dev@1a2b3c
  mbank create alice/k --disk-size 1G --kernel vmlinuz --initrd initrd.img --append 'console=ttyS0'")]
    Create {
        #[command(flatten)]
        args: create::Args,
        /// Print a JSON report instead of the version id.
        #[arg(long)]
        json: bool,
    },
    /// Boot a machine, or resume it if it was suspended; check in when it ends.
    ///
    /// The disk is served from the bank through the station cache (fetched on demand);
    /// QEMU runs with KVM where it works, else TCG. The session ends when the guest
    /// powers off (its disk is checked in), or is suspended by `mbank suspend`, SIGTERM
    /// or Ctrl-C (memory and disk are saved as one version; the next `run`, on any
    /// station, continues where it stopped). Prints the new version's id.
    Run {
        #[command(flatten)]
        args: run::Args,
        /// Print the session's statistics as JSON.
        #[arg(long)]
        json: bool,
        /// Internal: be the session process that `run` starts.
        #[arg(long, hide = true)]
        supervise: bool,
    },
    /// Suspend a machine that `mbank run` runs on this station: save memory and disk.
    ///
    /// Prints the new version's id once the memory state and the disk are in the bank.
    Suspend {
        /// The machine, as user/name.
        machine: MachineName,
        /// Print a JSON report: {machine, action, version}.
        #[arg(long)]
        json: bool,
    },
    /// Power a machine off (ACPI power button) that `mbank run` runs on this station.
    ///
    /// Presses the power button and waits up to --timeout seconds for the guest to
    /// shut down; the session then checks in and the new version's id is printed. A
    /// guest that ignores the button keeps running and the command fails, saying so,
    /// unless --force: then QEMU is quit after the timeout, like pulling the plug. The
    /// disk keeps every write the guest flushed; writes still in the guest's page cache
    /// are lost, as on a real PC.
    #[command(after_help = "Examples:
  mbank poweroff alice/dev                      # the button; fail after 60 s if ignored
  mbank poweroff alice/dev --timeout 10 --force # the button, then off after 10 s
  mbank poweroff alice/dev --timeout 0 --force  # pull the plug now")]
    Poweroff {
        /// The machine, as user/name.
        machine: MachineName,
        /// Seconds to wait for the guest to power off after the button.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        timeout: u64,
        /// Switch the machine off when the timeout passes (QEMU quits; unflushed guest
        /// writes are lost).
        #[arg(long)]
        force: bool,
        /// Print a JSON report: {machine, action, version} (version null when the
        /// session ended with no new version).
        #[arg(long)]
        json: bool,
    },
    /// Check in sessions left behind on this station by a crash.
    ///
    /// Sessions of live processes are left alone. A session whose files are damaged or
    /// missing is moved to <cache>/damaged (never deleted) and reported with what to do;
    /// one that cannot be checked in now (the bank is away) stays for the next try. The
    /// others go on; the exit status is 1 if any session could not be recovered.
    Recover {
        /// Print a JSON report: the sessions recovered, left for later and damaged.
        #[arg(long)]
        json: bool,
    },
    /// Serve this bank (--bank DIR) to stations over HTTPS: the API of docs/api.md.
    ///
    /// Users log in with `mbank login URL --user NAME` (an administrator adds them with
    /// `mbank admin user add`) and then use `--bank URL` with every command. Each user
    /// sees only their own machines and published ones; storage is shared and
    /// deduplicated. Prints `listening on URL` when ready; stops on SIGINT or SIGTERM.
    /// `gc` and `verify` may run on the bank directory while it serves.
    #[command(after_help = "Examples:
  mbank --bank /srv/mbank serve --listen 0.0.0.0:7070 --tls-cert cert.pem --tls-key key.pem
  mbank --bank /srv/mbank serve                       # http://127.0.0.1:7070, this host only")]
    Serve(serve::Args),
    /// Serve this station's cache to the lab's other stations (LAN sharing).
    ///
    /// A station with MBANK_PEERS=HOST:PORT,… asks these services for the chunks it is
    /// about to fetch before it asks the bank server (`--bank URL`), under a grant the
    /// server signed for its user and those chunks (`mbank serve --lan-sharing`); every
    /// chunk is checked by its hash. Prints `listening on URL` when ready; stops on
    /// SIGINT or SIGTERM.
    #[command(after_help = "Examples:
  mbank --bank https://bank.lab:7070 peer --listen 0.0.0.0:7071
  MBANK_PEERS=10.0.0.11:7071,10.0.0.12:7071 mbank --bank https://bank.lab:7070 run alice/dev")]
    Peer(peer::Args),
    /// Log in to a bank server: asks for your password and keeps a token for this URL.
    ///
    /// The token goes to ~/.config/mbank/credentials.json (readable only by you), and
    /// every command given `--bank URL` uses it until it expires or you log out. The
    /// environment variable MBANK_TOKEN overrides it.
    #[command(after_help = "Examples:
  mbank login https://bank.lab:7070 --user alice
  mbank login https://bank.lab:7070 --user alice --ca-cert lab-ca.pem --ttl 8h")]
    Login(login::Args),
    /// Log out of a bank server (--bank URL): the token is revoked and forgotten.
    Logout,
    /// Print a shell completion script for mbank, generated from its command line.
    #[command(after_help = "Examples:
  mbank completions bash > /etc/bash_completion.d/mbank
  mbank completions zsh > \"${fpath[1]}/_mbank\"
  mbank completions fish > ~/.config/fish/completions/mbank.fish")]
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages for mbank and each of its commands into DIR (mbank.1,
    /// mbank-import.1, …), generated from its command line.
    #[command(after_help = "Example:
  mbank man /usr/local/share/man/man1 && mandb -q")]
    Man {
        /// An existing directory.
        dir: PathBuf,
    },
    /// Write systemd units into DIR: mbank-serve.service (`serve` on the --bank
    /// directory, Type=notify) and mbank-recover.service (a station: `recover` at boot
    /// into the --bank, with the --cache).
    ///
    /// The units run this binary (its path now) as root; options after `--` go to
    /// `serve`. Install them with systemctl (see the example); the station's unit
    /// needs the bank server's token for root (`mbank login` as root), or MBANK_TOKEN
    /// in /etc/mbank/station.env.
    #[command(after_help = "Example (as root):
  mbank --bank /srv/mbank units /etc/systemd/system -- --listen 0.0.0.0:7070 \\
      --tls-cert /etc/mbank/cert.pem --tls-key /etc/mbank/key.pem
  systemctl daemon-reload && systemctl enable --now mbank-serve.service
  # on a station:
  mbank --bank https://bank.lab:7070 --cache /var/cache/mbank units /etc/systemd/system
  systemctl daemon-reload && systemctl enable mbank-recover.service")]
    Units {
        /// Where to write the unit files, e.g. /etc/systemd/system.
        dir: PathBuf,
        /// Options for `mbank serve` in mbank-serve.service, after `--`.
        #[arg(last = true, value_name = "SERVE-OPTIONS")]
        serve_args: Vec<String>,
    },
    /// Who you are to the bank: your user, whether an administrator, your quota and
    /// what you use of it.
    ///
    /// With --bank URL, as the bank server knows you (by your token). With a bank
    /// directory there are no users: whoever may write the directory may do anything,
    /// and there is no quota.
    Whoami {
        /// Print one JSON document: {bank, user, admin, quota, used} (quota null: no
        /// bound; used null for a bank directory).
        #[arg(long)]
        json: bool,
    },
    /// Show totals: machines, versions, chunks, bytes stored, deduplication.
    ///
    /// With --bank URL (an administrator's token), the server counts its bank.
    Stats {
        /// Print the totals as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage the users, tokens and published machines of a bank served by `mbank serve`
    /// (on the bank's host with --bank DIR; `admin user ls` and `admin user quota` also
    /// with --bank URL and an administrator's token).
    Admin {
        #[command(subcommand)]
        cmd: admin::AdminCmd,
    },
}

/// The --keep-* rules of `forget`.
#[derive(clap::Args)]
struct KeepArgs {
    /// Keep the N newest versions.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest version of each of the N newest hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_hourly: u32,
    /// Keep the newest version of each of the N newest days that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: u32,
    /// Keep the newest version of each of the N newest ISO weeks that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_weekly: u32,
    /// Keep the newest version of each of the N newest months that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_monthly: u32,
}

impl KeepArgs {
    fn policy(&self) -> mbank_catalog::Policy {
        mbank_catalog::Policy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
        }
    }
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let v = parse_size(s)?;
    if !mbank_core::valid_chunk_size(v) {
        return Err(format!("{s} is not a power of two from 4K to 4M"));
    }
    Ok(v as u32)
}

/// Global options and the commands they apply to; every other command's help leaves
/// them out (they are still accepted there, and ignored).
const GLOBAL_WHERE: &[(&str, &[&str])] = &[
    (
        "cache",
        &[
            "attach", "run", "recover", "status", "suspend", "poweroff", "ls", "cat", "restore",
            "mount", "diff", "peer",
        ],
    ),
    (
        "cache_size",
        &[
            "attach", "run", "recover", "status", "suspend", "poweroff", "ls", "cat", "restore",
            "mount", "diff", "peer",
        ],
    ),
    (
        "jobs",
        &[
            "import", "export", "create", "verify", "gc", "stats", "attach", "run", "recover",
            "ls", "cat", "restore", "mount", "diff",
        ],
    ),
];
/// Commands that never reach a bank: their help leaves `--bank` out.
const NO_BANK: &[&str] = &["completions", "man", "units", "login", "logout"];

/// The command line's definition, with each global option shown in the help of the
/// commands it applies to only ([`GLOBAL_WHERE`], [`NO_BANK`]).
fn command() -> clap::Command {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let global = |id: &str| {
        cmd.get_arguments()
            .find(|a| a.get_id() == id)
            .expect("a global option")
            .clone()
    };
    // Where an option does not apply, the command gets its own hidden copy of it, which
    // clap's propagation of global options then leaves in place. (clap's own `help`
    // command gets no global options.)
    let mut hide: Vec<(String, clap::Arg)> = Vec::new();
    for sub in cmd.get_subcommands().map(|c| c.get_name()) {
        if sub == "help" {
            continue;
        }
        for (id, used) in GLOBAL_WHERE {
            if !used.contains(&sub) {
                hide.push((sub.to_string(), global(id).hide(true)));
            }
        }
        if NO_BANK.contains(&sub) {
            hide.push((sub.to_string(), global("bank").hide(true)));
        }
    }
    for (sub, arg) in hide {
        cmd = cmd.mut_subcommand(sub, |c| c.arg(arg));
    }
    cmd
}

fn main() -> ExitCode {
    // What mbank writes (a bank, a station cache, sessions, exported images) is private
    // to the user or service running it, whatever the login's umask.
    // SAFETY: umask(2) only sets this process's file creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    let cli = {
        use clap::FromArgMatches;
        match Cli::from_arg_matches(&command().get_matches()) {
            Ok(c) => c,
            Err(e) => e.exit(),
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) if out::is_stdout_closed(&e) => out::die_of_sigpipe(),
        Err(e) => {
            // Most errors of ours already state their cause in their own message, so a
            // cause is added only when the message does not contain it yet (`{:#}` would
            // repeat each cause).
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg = format!("{msg}: {c}");
                }
            }
            out::say(&format!("mbank: error: {msg}"));
            if let Some(hint) = e.downcast_ref::<BankError>().and_then(hint) {
                out::say(&format!("mbank: {hint}"));
            }
            ExitCode::from(1)
        }
    }
}

/// What the user can do about an error, where there is something to say.
fn hint(e: &BankError) -> Option<String> {
    if e.is_no_space() {
        return Some(
            "free space on that disk and run the command again; nothing was committed, and `mbank gc` removes chunks a failed import left behind".into(),
        );
    }
    match e {
        BankError::ReadOnly { .. } => Some(
            "the bank's directory cannot be written (a read-only mount?); reading commands such as log, export and verify still work".into(),
        ),
        BankError::Damaged { machine, .. } => Some(format!(
            "nothing was written; run `mbank verify` to list every damaged chunk and the versions that need it; \
             `mbank import --repair {machine} IMAGE`, with the image the version was made from, repairs the bank"
        )),
        BankError::WrongLength { machine, .. } => Some(format!(
            "nothing was written; the version's index is wrong, not the chunk: run `mbank verify` to list \
             the damaged versions, and use another version of {machine} or remove this one with `mbank rm`"
        )),
        _ => None,
    }
}

/// `mbank forget`: apply the given rules (or the machine's policy), or set or clear the
/// policy.
#[allow(clippy::too_many_arguments)]
fn forget(
    bank: &mut Bank,
    machine: &MachineName,
    keep: &KeepArgs,
    dry_run: bool,
    set_policy: bool,
    clear_policy: bool,
    json: bool,
    say: &dyn Fn(String),
) -> Result<()> {
    let given = keep.policy();
    if clear_policy {
        if !given.is_empty() {
            bail!("--clear-policy takes no --keep-* rules: it only removes {machine}'s policy");
        }
        bank.catalog_mut().set_policy(machine, None)?;
        if json {
            json_out(&serde_json::json!({"machine": machine.to_string(), "policy": null}))?;
        }
        say(format!(
            "{machine} has no retention policy now; every new version is kept"
        ));
        return Ok(());
    }
    let policy = if given.is_empty() {
        if set_policy {
            bail!("--set-policy needs rules: give at least one --keep-* with a count above 0");
        }
        bank.catalog().policy(machine)?.with_context(|| {
            format!(
                "{machine} has no retention policy, and no --keep-* rule was given: give rules (e.g. --keep-last 5 --keep-daily 7), add --set-policy to keep them"
            )
        })?
    } else {
        given
    };
    if set_policy {
        bank.catalog_mut().set_policy(machine, Some(&policy))?;
        say(format!(
            "{machine}'s retention policy is now {policy}; it is applied after each check-in"
        ));
    }
    let r = bank.forget(machine, &policy, dry_run)?;
    if json {
        json_out(&r)?;
    } else {
        for d in &r.versions {
            outln!(
                "{} {} {:<20} {}",
                if d.kept() {
                    "keep  "
                } else if dry_run {
                    "would remove"
                } else {
                    "remove"
                },
                d.version.short(),
                date(d.created_ms),
                d.reasons.join(", ")
            )?;
        }
    }
    say(format!(
        "{} {} of {} versions of {machine} ({policy}){}",
        if dry_run { "would remove" } else { "removed" },
        r.removed.len(),
        r.versions.len(),
        if dry_run || r.removed.is_empty() {
            ""
        } else {
            "; run gc to free their chunks"
        }
    ));
    Ok(())
}

/// Prints one JSON document; every moment `X_ms` gets its RFC 3339 twin `X_utc`.
fn json_out<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut v = serde_json::to_value(v)?;
    fmt::add_utc(&mut v);
    outln!("{}", serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

/// `mbank gc`, `verify` or `stats` with `--bank URL`: started on the server (an
/// administrator's token), its progress shown while it runs, its report at the end.
fn remote_job(
    url: &str,
    job: &str,
    json: bool,
    bar: &Bar,
    say: &dyn Fn(String),
) -> Result<ExitCode> {
    use mbank_bank::Progress;
    let url = mbank_remote::normalize_url(url);
    let client = mbank_remote::connect(&url, None)?;
    let mut j = client.start_job(job)?;
    say(format!("{job} started on {url} (job {})", j.id));
    let (mut phase, mut done) = (String::new(), 0);
    loop {
        if j.phase != phase {
            bar.finish();
            phase = j.phase.clone();
            done = 0;
            let unit = if j.unit == "bytes" {
                mbank_bank::Unit::Bytes
            } else {
                mbank_bank::Unit::Chunks
            };
            bar.start(&format!("{job} on the server: {phase}"), j.total, unit);
            if !bar.enabled() && j.state == "running" {
                say(format!("{job}: {phase}"));
            }
        }
        bar.advance(j.done.saturating_sub(done));
        done = j.done;
        if j.state != "running" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        j = client.job(j.id)?;
    }
    bar.finish();
    let secs = j
        .finished_ms
        .unwrap_or(j.started_ms)
        .saturating_sub(j.started_ms) as f64
        / 1000.0;
    let Some(r) = j.result else {
        bail!(
            "{job} failed on {url} after {secs:.1} s: {}",
            j.error.as_deref().unwrap_or("no reason given")
        );
    };
    if json {
        json_out(&r)?;
    }
    match job {
        "verify" if r["ok"] == false => {
            if !json {
                outln!("{}", serde_json::to_string_pretty(&r)?)?;
            }
            say(format!(
                "verify on {url} found damage (above); run `mbank verify` on the bank's host for what to do"
            ));
            return Ok(ExitCode::from(3));
        }
        "verify" => say(format!(
            "ok: {} versions, {} chunks ({}) verified on {url} in {secs:.1} s",
            r["versions"],
            r["chunks_checked"],
            bytes(r["bytes_checked"].as_u64().unwrap_or(0))
        )),
        "gc" => say(format!(
            "gc on {url}: deleted {} chunks ({}), {} referenced, in {secs:.1} s",
            r["chunks_deleted"],
            bytes(r["bytes_deleted"].as_u64().unwrap_or(0)),
            r["chunks_referenced"]
        )),
        _ => {
            if !json && let Some(m) = r.as_object() {
                for (k, v) in m {
                    outln!("{k:<20}{v}")?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `mbank units DIR`: the systemd units of a bank server and of a station.
fn write_units(
    dir: &std::path::Path,
    bank: &std::path::Path,
    cache: &std::path::Path,
    serve_args: &[String],
    say: &dyn Fn(String),
) -> Result<()> {
    if !dir.is_dir() {
        bail!(
            "{} is not a directory (systemd's is /etc/systemd/system)",
            dir.display()
        );
    }
    let bin = std::env::current_exe().context("find this binary's path for the units")?;
    // systemd's quoting: each word in double quotes, `\` and `"` escaped, `%` doubled.
    let q = |s: &str| {
        format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('%', "%%")
                .replace('$', "$$")
        )
    };
    let bin = q(&bin.to_string_lossy());
    let bank_s = bank.to_string_lossy().to_string();
    let remote = mbank_remote::is_url(&bank_s);
    let mut units = Vec::new();
    if !remote {
        let bank_abs = std::fs::canonicalize(bank)
            .with_context(|| format!("find the bank directory {}", bank.display()))?;
        let args: Vec<String> = serve_args.iter().map(|a| q(a)).collect();
        units.push((
            "mbank-serve.service",
            format!(
                "[Unit]
Description=Machine Bank server for {bank}
Documentation=man:mbank-serve(1)
After=network-online.target
Wants=network-online.target

[Service]
# Ready once it listens: mbank serve tells systemd (sd_notify).
Type=notify
NotifyAccess=main
ExecStart={bin} --bank {bank_q} serve {args}
Restart=on-failure
RestartSec=2
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full
ProtectHome=read-only
ReadWritePaths={bank_q}

[Install]
WantedBy=multi-user.target
",
                bank = bank_abs.display(),
                bank_q = q(&bank_abs.to_string_lossy()),
                args = args.join(" "),
            ),
        ));
    }
    units.push((
        "mbank-recover.service",
        format!(
            "[Unit]
Description=Machine Bank station: check in sessions a crash or power cut left
Documentation=man:mbank-recover(1)
After=network-online.target local-fs.target
Wants=network-online.target

[Service]
Type=oneshot
# MBANK_TOKEN (a served bank) may be set here; else root's credentials are used.
EnvironmentFile=-/etc/mbank/station.env
ExecStart={bin} --bank {bank_q} --cache {cache_q} recover
# The bank may be away at boot: the sessions stay for the next try.
SuccessExitStatus=1

[Install]
WantedBy=multi-user.target
",
            bank_q = q(&bank_s),
            cache_q = q(&cache.to_string_lossy()),
        ),
    ));
    for (name, text) in &units {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        // Unit files are read by systemd and shown to everyone: 0644 whatever our umask.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("set the mode of {}", path.display()))?;
        say(format!("wrote {}", path.display()));
    }
    say("then: systemctl daemon-reload, and systemctl enable --now UNIT".into());
    Ok(())
}

/// `mbank man DIR`: one page for mbank and one for each command (`mbank-admin-user-add.1`).
fn write_man_pages(dir: &std::path::Path, say: &dyn Fn(String)) -> Result<()> {
    fn walk(cmd: &clap::Command, name: &str, dir: &std::path::Path, n: &mut usize) -> Result<()> {
        // clap names are &'static str; a one-shot command may leak a few.
        let full: &'static str = Box::leak(name.to_string().into_boxed_str());
        let cmd = cmd.clone().name(full);
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .render(&mut buf)
            .with_context(|| format!("render the man page {name}"))?;
        std::fs::write(&path, buf).with_context(|| format!("write {}", path.display()))?;
        *n += 1;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, &format!("{name}-{}", sub.get_name()), dir, n)?;
        }
        Ok(())
    }
    if !dir.is_dir() {
        bail!(
            "{} is not a directory: make it first (man pages go into DIR/NAME.1)",
            dir.display()
        );
    }
    let cmd = command();
    let mut n = 0;
    walk(&cmd, "mbank", dir, &mut n)?;
    say(format!("wrote {n} man pages to {}", dir.display()));
    Ok(())
}

/// `mbank whoami`: the user, quota and usage a bank server knows for our token; for a
/// bank directory, this login and no quota.
fn whoami(bank_dir: &std::path::Path, url: Option<&str>, json: bool) -> Result<()> {
    let (bank, user, admin, quota, used) = match url {
        Some(url) => {
            let url = mbank_remote::normalize_url(url);
            let w = mbank_remote::connect(&url, None)?.whoami()?;
            (url, w.user, w.admin, w.quota, Some(w.used))
        }
        None => {
            // Fails with the usual message when the directory is no bank.
            Bank::open(bank_dir, true)?;
            let user = std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .unwrap_or_else(|_| "this login".into());
            (bank_dir.display().to_string(), user, true, None, None)
        }
    };
    if json {
        return json_out(&serde_json::json!({
            "bank": bank, "user": user, "admin": admin, "quota": quota, "used": used,
        }));
    }
    outln!("bank   {bank}")?;
    outln!(
        "user   {user}{}",
        if url.is_none() {
            " (a bank directory: no users; whoever may write it may do anything)"
        } else if admin {
            " (administrator)"
        } else {
            ""
        }
    )?;
    match (used, quota) {
        (Some(u), Some(q)) => outln!(
            "used   {} of {} ({:.0}%)",
            bytes(u),
            bytes(q),
            u as f64 * 100.0 / q.max(1) as f64
        )?,
        (Some(u), None) => outln!("used   {} (no quota)", bytes(u))?,
        (None, _) => outln!("quota  none")?,
    }
    Ok(())
}

/// What `run` needs to know of a command before it runs it.
struct Traits {
    /// The command's name, as typed.
    name: &'static str,
    /// Runs on the bank's host, on its directory: refused with a server's URL.
    host_only: bool,
    /// Changes the bank: a local bank is opened for writing.
    writes: bool,
}

impl Cmd {
    /// The one table of every command's [`Traits`].
    fn traits(&self) -> Traits {
        let (name, host_only, writes) = match self {
            Cmd::Init { .. } => ("init", true, true),
            Cmd::Import { .. } => ("import", false, true),
            Cmd::Export { .. } => ("export", false, false),
            Cmd::Pack { .. } => ("pack", false, true),
            Cmd::Log { .. } => ("log", false, false),
            Cmd::Ls { .. } => ("ls", false, false),
            Cmd::Cat { .. } => ("cat", false, false),
            Cmd::Restore { .. } => ("restore", false, false),
            Cmd::Diff { .. } => ("diff", false, false),
            Cmd::Mount { .. } => ("mount", false, false),
            Cmd::Status { .. } => ("status", false, false),
            Cmd::Rename { .. } => ("rename", false, true),
            Cmd::Set { .. } => ("set", false, true),
            Cmd::Verify { .. } => ("verify", false, false),
            Cmd::Gc { .. } => ("gc", false, true),
            Cmd::Rm { .. } => ("rm", false, true),
            Cmd::Forget { .. } => ("forget", false, true),
            Cmd::Head { .. } => ("head", false, true),
            Cmd::Note { .. } => ("note", false, true),
            Cmd::Info { .. } => ("info", false, false),
            Cmd::Attach { .. } => ("attach", false, true),
            Cmd::Create { .. } => ("create", false, true),
            Cmd::Run { .. } => ("run", false, true),
            Cmd::Suspend { .. } => ("suspend", false, false),
            Cmd::Poweroff { .. } => ("poweroff", false, false),
            Cmd::Recover { .. } => ("recover", false, true),
            Cmd::Serve(_) => ("serve", true, false),
            Cmd::Peer(_) => ("peer", false, false),
            Cmd::Login(_) => ("login", false, false),
            Cmd::Logout => ("logout", false, false),
            Cmd::Whoami { .. } => ("whoami", false, false),
            Cmd::Completions { .. } => ("completions", false, false),
            Cmd::Man { .. } => ("man", false, false),
            Cmd::Units { .. } => ("units", false, false),
            Cmd::Stats { .. } => ("stats", false, false),
            Cmd::Admin { .. } => ("admin", false, false),
        };
        Traits {
            name,
            host_only,
            writes,
        }
    }
}

/// `-j N`: at least one worker.
fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (it is the number of worker threads)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number of worker threads")),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    // A bank server is reached over the network: more requests in flight than cores
    // hide its latency.
    let remote = cli
        .bank
        .as_deref()
        .and_then(|b| b.to_str())
        .is_some_and(mbank_remote::is_url);
    let jobs = cli
        .jobs
        .unwrap_or_else(|| {
            let n = mbank_bank::default_jobs();
            if remote { n.max(8) } else { n }
        })
        .max(1);
    let say = |s: String| {
        if !cli.quiet {
            out::say(&s);
        }
    };
    match &cli.cmd {
        Cmd::Completions { shell } => {
            let mut cmd = command();
            let mut out = std::io::stdout().lock();
            clap_complete::generate(*shell, &mut cmd, "mbank", &mut out);
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Man { dir } => {
            write_man_pages(dir, &say)?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    if let Cmd::Login(args) = cli.cmd {
        login::login(args, &say)?;
        return Ok(ExitCode::SUCCESS);
    }
    let bank_dir = cli
        .bank
        .clone()
        .context("no bank given: pass --bank DIR (or URL) or set MBANK_BANK")?;
    // A bank server's URL, or None for a bank directory on this machine.
    let url = bank_dir
        .to_str()
        .filter(|s| mbank_remote::is_url(s))
        .map(str::to_string);
    if let Some(url) = &url {
        let traits = cli.cmd.traits();
        if traits.host_only {
            let what = traits.name;
            bail!(
                "`mbank {what}` runs on the bank's host, on its directory (--bank DIR); {url} is a bank server"
            );
        }
        if let Cmd::Logout = cli.cmd {
            login::logout(url, &say)?;
            return Ok(ExitCode::SUCCESS);
        }
    } else if let Cmd::Logout = cli.cmd {
        bail!("logout needs the bank server's URL: mbank --bank https://HOST:PORT logout");
    }
    if let Cmd::Units { dir, serve_args } = &cli.cmd {
        let cache = cli
            .cache
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/cache/mbank"));
        write_units(dir, &bank_dir, &cache, serve_args, &say)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Cmd::Whoami { json } = cli.cmd {
        whoami(&bank_dir, url.as_deref(), json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let bar = Bar::new(cli.quiet);
    if let Some(url) = &url {
        // An administrator's walks over the whole bank run on the server, as jobs.
        let job = match &cli.cmd {
            Cmd::Gc { json } => Some(("gc", *json)),
            Cmd::Verify {
                machine: None,
                json,
            } => Some(("verify", *json)),
            Cmd::Verify {
                machine: Some(m), ..
            } => bail!(
                "`mbank verify {m}` runs on the bank's host (--bank DIR); over the network an administrator verifies the whole bank: mbank --bank {url} verify"
            ),
            Cmd::Stats { json } => Some(("stats", *json)),
            _ => None,
        };
        if let Some((job, json)) = job {
            return remote_job(url, job, json, &bar, &say);
        }
        if let Cmd::Admin { cmd } = cli.cmd {
            admin::run_remote(url, cmd, cli.quiet)?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    let read_only = !cli.cmd.traits().writes;
    let cache_dir = cli
        .cache
        .clone()
        .unwrap_or_else(mbank_station::Station::default_dir);
    let cache_size = cli.cache_size.unwrap_or(mbank_station::DEFAULT_CACHE_SIZE);
    if let Cmd::Init { store, postgres } = &cli.cmd {
        Bank::init_full(&bank_dir, store.as_ref(), postgres.as_deref())?;
        say(format!(
            "created an empty bank in {}{}{}",
            bank_dir.display(),
            store
                .as_ref()
                .map(|s| format!(" with its chunks in {s}"))
                .unwrap_or_default(),
            postgres
                .as_deref()
                .map(|u| format!(" and its catalog in {}", mbank_sql::redact(u)))
                .unwrap_or_default()
        ));
        return Ok(ExitCode::SUCCESS);
    }
    if let Cmd::Serve(args) = cli.cmd {
        serve::run(&bank_dir, args, cli.quiet)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Cmd::Admin { cmd } = cli.cmd {
        admin::run(&bank_dir, cmd, cli.quiet)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Cmd::Peer(args) = cli.cmd {
        peer::run(url.as_deref(), &cache_dir, cache_size, args)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Cmd::Suspend { machine, json } | Cmd::Poweroff { machine, json, .. } = &cli.cmd {
        let station = mbank_station::Station::open(&cache_dir, cache_size)?;
        let off = match cli.cmd {
            Cmd::Poweroff { timeout, force, .. } => Some(run::PowerOff { timeout, force }),
            _ => None,
        };
        let ended = run::suspend(&station, machine, off, &say)?;
        if *json {
            json_out(&serde_json::json!({
                "machine": machine.to_string(),
                "action": if off.is_some() { "poweroff" } else { "suspend" },
                "version": ended,
            }))?;
        } else {
            match ended {
                Some(v) => outln!("{v}")?,
                None => say(format!("{machine} ended with no new version")),
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut bank = match &url {
        Some(url) => {
            let ((store, catalog), packs) = mbank_remote::open_bank_with_packs(url, None)?;
            Bank::with_parts(mbank_remote::normalize_url(url), store, catalog).with_packs(packs)
        }
        None => Bank::open(&bank_dir, read_only)?,
    };
    match cli.cmd {
        Cmd::Init { .. }
        | Cmd::Suspend { .. }
        | Cmd::Poweroff { .. }
        | Cmd::Serve(_)
        | Cmd::Peer(_)
        | Cmd::Admin { .. }
        | Cmd::Login(_)
        | Cmd::Logout
        | Cmd::Whoami { .. }
        | Cmd::Completions { .. }
        | Cmd::Man { .. }
        | Cmd::Units { .. } => {
            unreachable!("handled above")
        }
        Cmd::Create { args, json } => {
            let r = create::run(&mut bank, args, jobs, &bar)?;
            if json {
                json_out(&r)?;
            } else {
                outln!("{}", r.version)?;
            }
            say(format!(
                "created {} ({} disk, {} new in the bank)",
                r.machine,
                bytes(r.disk_size),
                bytes(r.bytes_stored)
            ));
        }
        Cmd::Run {
            mut args,
            json,
            supervise,
        } => {
            let station = mbank_station::Station::open(&cache_dir, cache_size)?;
            args.jobs = jobs;
            if supervise {
                return Ok(run::supervise(&mut bank, &station, args));
            }
            drop(bank);
            let front = run::Front {
                bank_dir: &bank_dir,
                cache_dir: &cache_dir,
                cache_size: cli.cache_size,
                jobs,
            };
            if let Some(report) = run::front(&station, &front, &args, &say)? {
                if json {
                    if args.console {
                        // The console may have left a line unfinished (a prompt).
                        outln!()?;
                    }
                    json_out(&report)?;
                } else if let Some(v) = report["session"]["version"].as_str() {
                    outln!("{v}")?;
                }
            }
        }
        Cmd::Import {
            machine,
            image,
            chunk_size,
            format,
            tmpdir,
            level,
            json,
            repair,
        } => {
            let opts = ImportOptions {
                chunk_size,
                format,
                jobs,
                zstd_level: level,
                temp_dir: tmpdir.unwrap_or_else(std::env::temp_dir),
            };
            if repair {
                let r = bank.repair_from_image(&machine, &image, &opts, &bar)?;
                if json {
                    json_out(&r)?;
                }
                say(format!(
                    "repaired {} from {}: {} chunks ({} zero, {} intact, {} damaged and rewritten, {} missing and stored), {} written, in {:.1} s; no version was made",
                    r.machine,
                    r.image,
                    r.chunks_total,
                    r.chunks_zero,
                    r.chunks_intact,
                    r.chunks_repaired,
                    r.chunks_stored,
                    bytes(r.bytes_written),
                    r.seconds
                ));
                return Ok(ExitCode::SUCCESS);
            }
            let r = bank.import(&machine, &image, &opts, &bar)?;
            if json {
                json_out(&r)?;
            } else {
                outln!("{}", r.version)?;
            }
            let rate = r.disk_size as f64 / r.seconds.max(1e-9);
            say(format!(
                "imported {}@{}: {} disk, {} chunks ({} zero, {} new, {} already in the bank), {} stored, in {:.1} s ({}/s)",
                r.machine,
                &r.version[..12],
                bytes(r.disk_size),
                r.chunks_total,
                r.chunks_zero,
                r.chunks_new,
                r.chunks_dedup,
                bytes(r.bytes_stored),
                r.seconds,
                bytes(rate as u64),
            ));
            if !r.head_moved {
                say(format!(
                    "warning: another import moved the head of {} first; this version is kept, but the head is {}",
                    r.machine,
                    r.head.as_deref().unwrap_or("none")
                ));
            }
        }
        Cmd::Export {
            machine,
            output,
            force,
            json,
        } => {
            if !force
                && output != std::path::Path::new("-")
                && std::fs::metadata(&output).is_ok_and(|m| m.is_file())
            {
                bail!(
                    "{} exists; give --force to replace it with the export (the file is \
                     replaced only once the export is complete), or choose another name",
                    output.display()
                );
            }
            let r = bank
                .export(&machine, &output, jobs, &bar)
                .map_err(|e| match e {
                    // Standard output's reader went away.
                    BankError::Io { source, .. }
                        if output == std::path::Path::new("-")
                            && source.kind() == std::io::ErrorKind::BrokenPipe =>
                    {
                        out::StdoutClosed.into()
                    }
                    e => anyhow::Error::from(e),
                })?;
            if let Some(why) = r.pack.as_ref().and_then(|p| p.fell_back.as_ref()) {
                say(format!(
                    "warning: the version's pack was not used to the end ({why}); the rest came \
                     from its chunks, and the export is whole. `mbank pack {}@{}` builds it again",
                    r.machine,
                    &r.version[..12]
                ));
            }
            if json {
                json_out(&r)?;
            }
            say(format!(
                "exported {}@{} to {}: {} ({} chunks read, {} zero) in {:.1} s",
                r.machine,
                &r.version[..12],
                r.path,
                bytes(r.disk_size),
                r.chunks_read,
                r.chunks_zero,
                r.seconds
            ));
        }
        Cmd::Pack {
            machine,
            level,
            json,
        } => {
            let r = match &url {
                Some(url) => {
                    let v = bank.resolve(&machine)?;
                    let client = mbank_remote::connect(url, None)?;
                    say(format!(
                        "the server is packing {}@{} ...",
                        v.machine,
                        v.id.short()
                    ));
                    let r = mbank_remote::packs::build_pack(&client, v.machine.as_str(), v.id)?;
                    serde_json::from_value::<mbank_bank::pack::PackReport>(r)
                        .context("the server's account of the pack is not what this mbank knows")?
                }
                None => bank.build_pack(&machine, level, jobs, &bar)?,
            };
            if json {
                json_out(&r)?;
            }
            say(format!(
                "packed {}@{}: {} chunks, {} as stored, {} packed ({:.0}%) in {} segments, {:.1} s",
                r.machine,
                &r.version[..12],
                r.chunks,
                bytes(r.stored_bytes),
                bytes(r.pack_bytes),
                100.0 * r.pack_bytes as f64 / r.stored_bytes.max(1) as f64,
                r.segments,
                r.seconds
            ));
        }
        Cmd::Log { machine, json } => {
            let versions = bank.log(&machine)?;
            // The version a session (run or attach) has checked out now, and where.
            let lease = bank.catalog().lease(&machine)?;
            let in_use = |v: &str| {
                lease
                    .as_ref()
                    .filter(|l| l.base.is_some_and(|b| b.to_hex() == v))
            };
            if json {
                let mut list = serde_json::to_value(&versions)?;
                for e in list.as_array_mut().into_iter().flatten() {
                    let l = in_use(e["version"].as_str().unwrap_or_default());
                    e["in_use"] = serde_json::json!(l.is_some());
                    if let Some(l) = l {
                        e["session"] = serde_json::json!({
                            "station": l.station_name,
                            "pid": l.pid,
                            "since_ms": l.started_ms,
                        });
                    }
                }
                json_out(&list)?;
            } else {
                outln!(
                    "{:<14} {:<20} {:>10} {:>10} {:>8} {:<12} {:<9} NOTE",
                    "VERSION",
                    "CREATED (UTC)",
                    "DISK",
                    "NEW DATA",
                    "NEW",
                    "PARENT",
                    "STATE"
                )?;
                for v in versions {
                    let tags = if v.tags.is_empty() {
                        String::new()
                    } else {
                        format!("[{}] ", v.tags.join(","))
                    };
                    outln!(
                        "{:<14} {:<20} {:>10} {:>10} {:>8} {:<12} {:<9} {}{}",
                        format!("{}{}", &v.version[..12], if v.head { " *" } else { "" }),
                        date(v.created_ms),
                        bytes(v.disk_size),
                        bytes(v.stats.bytes_stored),
                        v.stats.chunks_new,
                        v.parent.as_deref().map_or("-", |p| &p[..12]),
                        if in_use(&v.version).is_some() {
                            "in use"
                        } else if v.suspended {
                            "suspended"
                        } else {
                            "off"
                        },
                        tags,
                        v.note.as_deref().unwrap_or(""),
                    )?;
                }
            }
        }
        Cmd::Set { args, json } => {
            let r = set::run(&mut bank, &args, &bar)?;
            if json {
                json_out(&r)?;
            } else if let Some(v) = &r.version {
                outln!("{v}")?;
            }
            if let (Some(v), Some(mem), Some(cpus)) = (&r.version, r.memory_mib, r.cpus) {
                say(format!(
                    "{}@{}: {mem} MiB of memory, {cpus} CPUs{}",
                    r.machine,
                    &v[..12],
                    if r.head_moved {
                        ""
                    } else {
                        "; another writer moved the head first, so this version is kept beside it"
                    }
                ));
            }
            if args.checkpoint_minutes.is_some() {
                say(format!(
                    "{}: checkpoints {}",
                    r.machine,
                    set::describe_settings(&r.settings)
                ));
            }
        }
        Cmd::Status { json } => {
            let station = mbank_station::Station::open(&cache_dir, cache_size)?;
            let s = status::status(&bank, &station)?;
            for w in &s.warnings {
                say(format!("warning: {w}"));
            }
            if json {
                json_out(&s)?;
            } else {
                status::print(&s)?;
            }
        }
        Cmd::Ls {
            target: Some(spec),
            json,
        } => {
            let station = mbank_station::Station::open(&cache_dir, cache_size)?;
            let o = files::open_spec(&bank, &station, &spec)?;
            let es = files::ls(&o, &spec.path)?;
            if json {
                json_out(&es)?;
            } else {
                for e in es {
                    let name = match &e.target {
                        Some(t) => format!("{} -> {t}", e.name),
                        None => e.name,
                    };
                    outln!(
                        "{:<7} {:04o} {:>12} {:<20} {}",
                        e.kind,
                        e.mode,
                        e.size,
                        date(e.mtime.saturating_mul(1000)),
                        name
                    )?;
                }
            }
        }
        Cmd::Cat { target } => {
            let station = mbank_station::Station::open(&cache_dir, cache_size)?;
            let o = files::open_spec(&bank, &station, &target)?;
            let mut w = std::io::stdout().lock();
            files::cat(&o, &target.path, &mut w)
                .and_then(|_| Ok(std::io::Write::flush(&mut w)?))
                .map_err(|e| match e.downcast::<std::io::Error>() {
                    Ok(io) => out::stdout_error(io),
                    Err(e) => e,
                })?;
        }
        Cmd::Restore {
            target,
            dest,
            force,
            json,
        } => {
            let station = mbank_station::Station::open(&cache_dir, cache_size)?;
            let o = files::open_spec(&bank, &station, &target)?;
            let r = files::restore(&o, &target.path, &dest, force)?;
            if json {
                json_out(&r)?;
            }
            say(format!(
                "restored {} to {}: {} files ({}), {} directories, {} symlinks{}",
                o.name(&target.path),
                dest.display(),
                r.files,
                bytes(r.bytes),
                r.dirs,
                r.symlinks,
                if r.skipped.is_empty() {
                    String::new()
                } else {
                    format!("; skipped {} special files", r.skipped.len())
                }
            ));
        }
        Cmd::Mount { version, dir } => {
            let station = mbank_station::Station::open(&cache_dir, cache_size)?;
            mount::run(&bank, &station, &version, &dir, &say)?;
        }
        Cmd::Diff { a, b, json } => {
            let station = mbank_station::Station::open(&cache_dir, cache_size)?;
            let d = files::diff(&bank, &station, &a, &b)?;
            if json {
                json_out(&d)?;
            } else {
                outln!(
                    "{} -> {}: {} chunks differ ({})",
                    d.a,
                    d.b,
                    d.chunks_differ,
                    bytes(d.bytes_differ)
                )?;
                for p in &d.partitions {
                    for (sign, list) in [("+", &p.added), ("-", &p.removed), ("M", &p.changed)] {
                        for f in list {
                            outln!("{sign} {}:{f}", p.partition)?;
                        }
                    }
                }
                for n in &d.not_compared {
                    say(format!("files not compared: {n}"));
                }
            }
        }
        Cmd::Ls { target: None, json } => {
            let ms = bank.list()?;
            if json {
                json_out(&ms)?;
            } else {
                outln!(
                    "{:<40} {:>8} {:<14} {:>10} {:<20}",
                    "MACHINE",
                    "VERSIONS",
                    "HEAD",
                    "DISK",
                    "UPDATED (UTC)"
                )?;
                for m in ms {
                    outln!(
                        "{:<40} {:>8} {:<14} {:>10} {:<20}",
                        m.machine,
                        m.versions,
                        m.head.as_deref().map_or("-", |h| &h[..12]),
                        m.disk_size.map_or("-".into(), bytes),
                        m.updated_ms.map_or("-".into(), date),
                    )?;
                }
            }
        }
        Cmd::Verify { machine, json } => {
            if let Some(w) = mbank_bank::open_to_others(&bank_dir) {
                eprintln!("mbank: warning: {w}");
            }
            let started = std::time::Instant::now();
            let r = bank.verify(machine.as_ref(), jobs, &bar);
            // A whole-bank verify is what the server's metrics report.
            if machine.is_none() {
                let outcome = match &r {
                    Ok(r) if r.ok() => None,
                    Ok(_) => Some("damage found".to_string()),
                    Err(e) => Some(e.to_string()),
                };
                mbank_server::jobs::record_job(&bank_dir, "verify", outcome, started, None);
            }
            let r = r?;
            if json {
                json_out(&r)?;
            } else {
                for d in &r.damaged_databases {
                    outln!("damaged database {}:", d.file)?;
                    for p in &d.problems {
                        outln!("  {p}")?;
                    }
                    outln!("  {}", d.advice)?;
                }
                for d in &r.damaged_records {
                    outln!("damaged record: {}: {}", d.record, d.problem)?;
                }
                for d in &r.damaged_indexes {
                    outln!("damaged index: {}: {}", d.version, d.problem)?;
                }
                for d in &r.damaged_chunks {
                    outln!("damaged chunk {}: {}", d.chunk, d.problem)?;
                    if let Some(m) = &d.moved_to {
                        outln!("  moved aside to {m}")?;
                    }
                    for v in &d.needed_by {
                        outln!("  needed by {v}")?;
                    }
                }
                for m in &r.missing_rights {
                    outln!(
                        "missing rights: {} cannot read {} chunks of {} (the first: {}); the server answers them as absent",
                        m.user,
                        m.chunks,
                        m.version,
                        m.first
                    )?;
                }
            }
            if r.ok() {
                say(format!(
                    "ok: {} versions, {} chunks ({}) verified in {:.1} s",
                    r.versions,
                    r.chunks_checked,
                    bytes(r.bytes_checked),
                    r.seconds
                ));
            } else {
                let versions: std::collections::BTreeSet<&str> = r
                    .damaged_chunks
                    .iter()
                    .flat_map(|d| d.needed_by.iter().map(String::as_str))
                    .chain(r.damaged_indexes.iter().map(|d| d.version.as_str()))
                    .chain(
                        r.damaged_records
                            .iter()
                            .map(|d| d.record.as_str())
                            .filter(|v| v.contains('@')),
                    )
                    .collect();
                out::say(&format!(
                    "mbank: verify found {} damaged chunks, {} damaged indexes, {} damaged catalog records \
                     and {} damaged databases, affecting {} versions; a damaged catalog is restored from a backup",
                    r.damaged_chunks.len(),
                    r.damaged_indexes.len(),
                    r.damaged_records.len(),
                    r.damaged_databases.len(),
                    versions.len()
                ));
                if !r.missing_rights.is_empty() {
                    out::say(&format!(
                        "mbank: {} versions lack rights their users need to read them; \
                         `mbank --bank {} admin repair-rights` grants them again",
                        r.missing_rights.len(),
                        bank_dir.display()
                    ));
                }
                // A version is named user/name@ID, with " (stream)" for a memory state,
                // kernel or initrd, which no disk image holds.
                let machines: std::collections::BTreeSet<&str> = r
                    .damaged_chunks
                    .iter()
                    .flat_map(|d| d.needed_by.iter())
                    .filter(|v| !v.ends_with(')'))
                    .filter_map(|v| v.split_once('@').map(|(m, _)| m))
                    .collect();
                for m in machines {
                    out::say(&format!(
                        "mbank: to repair {m}'s damaged chunks, run `mbank import --repair {m} IMAGE` with the image its versions were made from"
                    ));
                }
                return Ok(ExitCode::from(3));
            }
        }
        Cmd::Gc { json } => {
            let started = std::time::Instant::now();
            let r = bank.gc(&bar);
            let stored = r
                .as_ref()
                .ok()
                .and_then(|_| bank.store().stats().ok())
                .map(|s| s.bytes);
            mbank_server::jobs::record_job(
                &bank_dir,
                "gc",
                r.as_ref().err().map(|e| e.to_string()),
                started,
                stored,
            );
            let r = r?;
            let pruned = mbank_server::jobs::prune_rights(&bank, &bank_dir, r.cutoff_ms)
                .map_err(anyhow::Error::msg)?;
            if json {
                let mut v = serde_json::to_value(&r)?;
                v["access_rows_pruned"] = pruned.into();
                json_out(&v)?;
            }
            if pruned > 0 {
                say(format!(
                    "gc: forgot {pruned} users' rights to chunks that are gone"
                ));
            }
            if r.sweep_deferred {
                say(format!(
                    "gc: deleted nothing: a version was removed while {} writers were in flight \
                     (or while gc ran), and one of them may be a fork of it that will commit its \
                     chunks; run gc again once they have finished",
                    r.live_writers
                ));
            }
            say(format!(
                "gc: {} chunks referenced by {} versions; deleted {} chunks ({}), {} temp files \
                 and {} packs of removed versions; kept {} unreferenced chunks for {} writers in \
                 flight; {:.1} s",
                r.chunks_referenced,
                r.versions,
                r.chunks_deleted,
                bytes(r.bytes_deleted),
                r.temp_files_deleted,
                r.packs_removed,
                r.chunks_kept_for_writers,
                r.live_writers,
                r.seconds
            ));
        }
        Cmd::Rm { machine, json } => {
            let (removed, head) = bank.remove(&machine)?;
            let removed: Vec<String> = removed.iter().map(|v| v.to_hex()).collect();
            if json {
                json_out(&serde_json::json!({
                    "machine": machine.machine.to_string(),
                    "removed": removed,
                    "head": head.map(|h| h.to_hex()),
                }))?;
            }
            match (&machine.version, head) {
                (None, _) => say(format!(
                    "removed machine {} and its {} versions; run gc to free their chunks",
                    machine.machine,
                    removed.len()
                )),
                (Some(_), h) => say(format!(
                    "removed {}@{}; head of {} is now {}; run gc to free its chunks",
                    machine.machine,
                    &removed[0][..12],
                    machine.machine,
                    h.map_or("none".into(), |h| h.short())
                )),
            }
        }
        Cmd::Forget {
            machine,
            keep,
            dry_run,
            set_policy,
            clear_policy,
            json,
        } => {
            forget(
                &mut bank,
                &machine,
                &keep,
                dry_run,
                set_policy,
                clear_policy,
                json,
                &say,
            )?;
        }
        Cmd::Head {
            machine,
            expect,
            json,
        } => {
            if machine.version.is_none() {
                let m = bank.catalog().machine(&machine.machine)?.ok_or_else(|| {
                    mbank_catalog::CatalogError::MachineNotFound(machine.machine.to_string())
                })?;
                if json {
                    json_out(&serde_json::json!({
                        "machine": machine.machine.to_string(),
                        "head": m.head.map(|h| h.to_hex()),
                    }))?;
                } else {
                    outln!("{}", m.head.map_or("none".into(), |h| h.to_hex()))?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            let expected = match expect.as_deref() {
                None => None,
                Some("none") => Some(None),
                Some(p) => Some(Some(
                    bank.resolve(&MachineRef {
                        machine: machine.machine.clone(),
                        version: Some(p.to_string()),
                    })?
                    .id,
                )),
            };
            let before = bank.set_head(&machine, expected)?;
            let now = bank.resolve(&MachineRef {
                machine: machine.machine.clone(),
                version: None,
            })?;
            if json {
                json_out(&serde_json::json!({
                    "machine": machine.machine.to_string(),
                    "head": now.id.to_hex(),
                    "previous": before.map(|h| h.to_hex()),
                }))?;
            } else {
                outln!("{}", now.id.to_hex())?;
            }
            say(format!(
                "head of {} moved from {} to {}; no version was removed",
                machine.machine,
                before.map_or("none".into(), |h| h.short()),
                now.id.short()
            ));
        }
        Cmd::Note {
            machine,
            text,
            tag,
            untag,
            json,
        } => {
            let change = mbank_catalog::LabelChange {
                note: text,
                add_tags: tag,
                remove_tags: untag,
            };
            let (v, labels) = bank.label(&machine, &change)?;
            if json {
                json_out(&serde_json::json!({
                    "machine": v.machine.to_string(),
                    "version": v.id.to_hex(),
                    "note": labels.note,
                    "tags": labels.tags,
                }))?;
            }
            say(format!(
                "{}@{}: note {}; tags {}",
                v.machine,
                v.id.short(),
                labels
                    .note
                    .as_deref()
                    .map_or("none".into(), |n| format!("{n:?}")),
                if labels.tags.is_empty() {
                    "none".into()
                } else {
                    labels.tags.join(", ")
                }
            ));
        }
        Cmd::Rename { old, new } => {
            use mbank_catalog::CatalogError as E;
            match bank.catalog_mut().rename_machine(&old, &new) {
                Ok(()) => {}
                Err(E::InSession { held, .. }) => bail!(
                    "cannot rename {old}: a session holds it on station {} (pid {}) since {} \
                     UTC, and its check-in goes to {old}; end that session, then rename",
                    held.station_name,
                    held.pid,
                    held.started_utc()
                ),
                Err(e @ E::BadRename(_)) => return Err(e.into()),
                Err(e) => {
                    return Err(
                        anyhow::Error::from(e).context(format!("cannot rename {old} to {new}"))
                    );
                }
            }
            say(format!(
                "renamed {old} to {new}; its versions keep their ids"
            ));
        }
        Cmd::Info { machine, json } => {
            let m = bank
                .catalog()
                .machine(&machine)?
                .ok_or_else(|| mbank_catalog::CatalogError::MachineNotFound(machine.to_string()))?;
            let policy = bank.catalog().policy(&machine)?;
            let settings = bank.catalog().settings(&machine)?;
            let lease = bank.catalog().lease(&machine)?;
            if json {
                json_out(&serde_json::json!({
                    "machine": m.name.to_string(),
                    "head": m.head.map(|h| h.to_hex()),
                    "versions": m.versions,
                    "disk_size": m.disk_size,
                    "chunk_size": m.chunk_size,
                    "created_ms": m.created_ms,
                    "updated_ms": m.updated_ms,
                    "policy": policy,
                    "settings": settings,
                    "session": lease,
                }))?;
            } else {
                outln!("machine     {}", m.name)?;
                outln!(
                    "head        {}",
                    m.head.map_or("none".into(), |h| h.to_hex())
                )?;
                outln!("versions    {}", m.versions)?;
                outln!("disk        {}", m.disk_size.map_or("-".into(), bytes))?;
                outln!("chunk size  {}", bytes(m.chunk_size as u64))?;
                outln!("created     {} UTC", date(m.created_ms))?;
                outln!(
                    "updated     {}",
                    m.updated_ms
                        .map_or("-".into(), |t| format!("{} UTC", date(t)))
                )?;
                outln!(
                    "policy      {}",
                    policy.map_or("none (keeps every version)".into(), |p| p.to_string())
                )?;
                outln!("checkpoints {}", set::describe_settings(&settings))?;
                outln!(
                    "session     {}",
                    lease.map_or("none".into(), |l| format!(
                        "on station {} (pid {}) since {} UTC",
                        l.station_name,
                        l.pid,
                        l.started_utc()
                    ))
                )?;
            }
        }
        Cmd::Attach { mut args, json } => {
            let station = mbank_station::Station::open(&cache_dir, cache_size)?;
            args.jobs = jobs;
            let report = attach::run(&mut bank, &station, args, &bar, &say, cli.quiet)?;
            if json {
                json_out(&report)?;
            } else if let Some(v) = &report.version {
                outln!("{v}")?;
            }
        }
        Cmd::Recover { json } => {
            let station = mbank_station::Station::open(&cache_dir, cache_size)?;
            let opts = ImportOptions {
                jobs,
                ..Default::default()
            };
            let recovery = station.recover(&mut bank, &opts)?;
            attach::report_recovery(&recovery, &say);
            if json {
                json_out(&recovery)?;
            } else if recovery.recovered.is_empty() && recovery.problems.is_empty() {
                say("no sessions to recover".into());
            }
            if !recovery.problems.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Stats { json } => {
            let s = bank.stats()?;
            if json {
                json_out(&s)?;
            } else {
                outln!("store               {}", s.store)?;
                outln!("machines            {}", s.machines)?;
                outln!("versions            {}", s.versions)?;
                outln!("logical size        {}", bytes(s.logical_bytes))?;
                outln!("  non-zero          {}", bytes(s.logical_nonzero_bytes))?;
                outln!(
                    "chunks stored       {} ({} referenced)",
                    s.chunks,
                    s.chunks_referenced
                )?;
                outln!("bytes stored        {}", bytes(s.bytes_stored))?;
                outln!(
                    "deduplication       {:.2}x (non-zero data / bytes stored)",
                    s.dedup_ratio
                )?;
                outln!(
                    "packs               {} ({}; `mbank pack`, copies for exports)",
                    s.packs,
                    bytes(s.pack_bytes)
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod cli_tests {
    use clap::CommandFactory;

    /// Every argument of every command says what it is for in `--help` (`json` flags too).
    #[test]
    fn every_argument_has_a_help_line() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                if a.is_hide_set() {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.is_hide_set() {
                    continue;
                }
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cmd = super::Cli::command();
        let mut missing = Vec::new();
        walk(&cmd, "mbank", &mut missing);
        assert!(
            missing.is_empty(),
            "arguments without a help line:\n  {}",
            missing.join("\n  ")
        );
    }
}
