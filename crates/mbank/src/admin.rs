//! `mbank admin`: manage the users, tokens and published machines of a bank that
//! `mbank serve` serves. Runs on the bank host against the bank directory (`--bank`);
//! everything lives in `<bank>/access.db` ([`mbank_access`]).

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use mbank_access::Access;
use mbank_core::{ChunkId, MachineName};

use crate::fmt::{bytes, date, parse_size};
use crate::out::outln;

/// The `admin` subcommands.
#[derive(Subcommand)]
pub enum AdminCmd {
    /// Add, remove and list users; set passwords and quotas.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// List and revoke login tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Let every user read a machine (all its versions) and fork it.
    ///
    /// Run it again after the machine gets new versions so that their chunks are
    /// readable too.
    Publish {
        /// The machine, as user/name.
        machine: MachineName,
    },
    /// Stop publishing a machine. Users who forked it keep their forks.
    Unpublish {
        /// The machine, as user/name.
        machine: MachineName,
    },
    /// List the published machines.
    Published {
        /// Print a JSON list of the published machines.
        #[arg(long)]
        json: bool,
    },
    /// Grant again the rights to read their versions' chunks that users lack (what
    /// `mbank verify` reports as missing rights): each version's owner gets the chunks
    /// of that version (not charged against their quota), and a published machine's
    /// chunks are readable by every user again.
    RepairRights {
        /// Print a JSON report of the rights granted.
        #[arg(long)]
        json: bool,
    },
}

/// `admin user ...`
#[derive(Subcommand)]
pub enum UserCmd {
    /// Add a user. Asks for the password twice on the terminal unless --password-stdin.
    Add {
        /// 1 to 32 characters from a-z, 0-9, '_' and '-'; the user owns the machines NAME/*.
        name: String,
        /// May read and write every machine and manage the bank over the network.
        #[arg(long)]
        admin: bool,
        /// Bound on the bytes the user's uploads may take, e.g. 50G [default: none].
        #[arg(long, value_parser = parse_size, value_name = "SIZE")]
        quota: Option<u64>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove a user: their tokens stop working. Their machines stay in the bank.
    Rm {
        /// The user's name.
        name: String,
    },
    /// Disable a user: they cannot log in, and their tokens are revoked. Their machines,
    /// chunks and quota stay; `enable` lets them log in again.
    Disable {
        /// The user's name.
        name: String,
    },
    /// Enable a disabled user: they may log in again (their old tokens stay revoked).
    Enable {
        /// The user's name.
        name: String,
    },
    /// Set a user's password; their tokens are revoked (they log in again).
    Passwd {
        /// The user's name.
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set a user's quota: a size like 50G, or `none` for no bound.
    Quota {
        /// The user's name.
        name: String,
        /// The quota: a size such as 50G, or `none`.
        #[arg(value_parser = parse_quota, value_name = "SIZE|none")]
        quota: Quota,
    },
    /// List the users with their usage and live tokens.
    Ls {
        /// Print a JSON list: each user's name, admin, quota, used and tokens.
        #[arg(long)]
        json: bool,
    },
}

/// `admin token ...`
#[derive(Subcommand)]
pub enum TokenCmd {
    /// List tokens (never their secrets).
    Ls {
        /// Only this user's.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Print a JSON list of the tokens.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id (as `token ls` shows it).
    Revoke {
        /// The token's id (32 hex digits, as `token ls` shows it).
        id: String,
    },
}

/// A quota argument: bytes, or no bound.
#[derive(Clone, Copy, Debug)]
pub struct Quota(Option<u64>);

fn parse_quota(s: &str) -> Result<Quota, String> {
    if s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("unlimited") {
        Ok(Quota(None))
    } else {
        parse_size(s).map(|n| Quota(Some(n)))
    }
}

/// Runs one `admin` command against a bank server (an administrator's token): the
/// users with their usage, and quotas. The rest runs on the bank's host.
pub fn run_remote(url: &str, cmd: AdminCmd, quiet: bool) -> Result<()> {
    let url = mbank_remote::normalize_url(url);
    let client = mbank_remote::connect(&url, None)?;
    match cmd {
        AdminCmd::User {
            cmd: UserCmd::Ls { json },
        } => {
            let users: Vec<mbank_access::UserInfo> = client
                .users()?
                .into_iter()
                .map(serde_json::from_value)
                .collect::<Result<_, _>>()
                .with_context(|| format!("the list of users from {url} is not as expected"))?;
            print_users(users, json)
        }
        AdminCmd::User {
            cmd: UserCmd::Quota { name, quota },
        } => {
            client.set_quota(&name, quota.0)?;
            if !quiet {
                crate::out::say(&match quota.0 {
                    Some(q) => format!("{name} may now store {} on {url}", bytes(q)),
                    None => format!("{name} has no quota on {url} now"),
                });
            }
            Ok(())
        }
        _ => bail!(
            "over the network, `mbank admin` lists users and sets quotas (admin user ls, admin user quota); the rest runs on the bank's host, on its directory (--bank DIR)"
        ),
    }
}

/// Runs one `admin` command against the bank in `bank_dir`. Messages go to standard
/// error unless `quiet`; listings go to standard output.
pub fn run(bank_dir: &Path, cmd: AdminCmd, quiet: bool) -> Result<()> {
    let say = |s: String| {
        if !quiet {
            crate::out::say(&s);
        }
    };
    if !bank_dir.join("MBANK").is_file() {
        bail!(
            "{} is not a bank (it has no MBANK file); give the bank's directory with --bank",
            bank_dir.display()
        );
    }
    let access = Access::open(bank_dir)?;
    match cmd {
        AdminCmd::User { cmd } => match cmd {
            UserCmd::Add {
                name,
                admin,
                quota,
                password_stdin,
            } => {
                mbank_access::check_user_name(&name)?;
                let password = new_password(&name, password_stdin)?;
                access.add_user(&name, &password, admin, quota)?;
                say(format!(
                    "added {}user {name}{}",
                    if admin { "administrator " } else { "" },
                    quota.map_or(String::new(), |q| format!(" with a quota of {}", bytes(q)))
                ));
            }
            UserCmd::Rm { name } => {
                access.remove_user(&name)?;
                say(format!(
                    "removed user {name}; their machines stay in the bank"
                ));
            }
            UserCmd::Disable { name } => {
                let changed = access.set_disabled(&name, true)?;
                say(match changed {
                    true => format!(
                        "disabled {name}: they cannot log in and their tokens are revoked; their machines stay"
                    ),
                    false => format!("{name} was disabled already"),
                });
            }
            UserCmd::Enable { name } => {
                let changed = access.set_disabled(&name, false)?;
                say(match changed {
                    true => format!("enabled {name}: they may log in again"),
                    false => format!("{name} was not disabled"),
                });
            }
            UserCmd::Passwd {
                name,
                password_stdin,
            } => {
                // Fail on an unknown user before asking for a password.
                access.tokens(Some(&name))?;
                let password = new_password(&name, password_stdin)?;
                access.set_password(&name, &password)?;
                say(format!(
                    "changed the password of {name}; their tokens are revoked"
                ));
            }
            UserCmd::Quota { name, quota } => {
                access.set_quota(&name, quota.0)?;
                say(match quota.0 {
                    Some(q) => format!("{name} may now store {}", bytes(q)),
                    None => format!("{name} has no quota now"),
                });
            }
            UserCmd::Ls { json } => print_users(access.users()?, json)?,
        },
        AdminCmd::Token { cmd } => match cmd {
            TokenCmd::Ls { user, json } => {
                let tokens = access.tokens(user.as_deref())?;
                if json {
                    crate::json_out(&tokens)?;
                } else {
                    outln!(
                        "{:<32} {:<16} {:<20} {:<20} {:<8} LABEL",
                        "ID",
                        "USER",
                        "CREATED (UTC)",
                        "EXPIRES (UTC)",
                        "STATE"
                    )?;
                    for t in tokens {
                        outln!(
                            "{:<32} {:<16} {:<20} {:<20} {:<8} {}",
                            t.id,
                            t.user,
                            date(t.created_ms),
                            date(t.expires_ms),
                            if t.revoked_ms.is_some() {
                                "revoked"
                            } else if t.live {
                                "live"
                            } else {
                                "expired"
                            },
                            t.label.escape_debug(),
                        )?;
                    }
                }
            }
            TokenCmd::Revoke { id } => {
                if access.revoke_token(&id)? {
                    say(format!("revoked token {id}"));
                } else {
                    bail!(
                        "no live token has the id {:?}; `mbank admin token ls` lists them",
                        id.chars().take(80).collect::<String>()
                    );
                }
            }
        },
        AdminCmd::Publish { machine } => {
            let chunks = machine_chunks(bank_dir, &machine)?;
            let n = chunks.len();
            let by = std::env::var("USER").unwrap_or_else(|_| "admin".into());
            access.publish(&machine, &by, chunks)?;
            say(format!(
                "published {machine} ({n} chunks); every user may now read and fork it"
            ));
            // Every station may now fetch its head: pack it for exports.
            let bank = mbank_bank::Bank::open(bank_dir, false)?;
            let head: mbank_core::MachineRef = machine.as_str().parse()?;
            match bank.build_pack(
                &head,
                mbank_core::pack::DEFAULT_LEVEL,
                mbank_bank::default_jobs(),
                &mbank_bank::NoProgress,
            ) {
                Ok(r) => say(format!(
                    "packed its head {} for exports: {} as stored, {} packed",
                    &r.version[..12],
                    crate::bytes(r.stored_bytes),
                    crate::bytes(r.pack_bytes)
                )),
                Err(e) => say(format!(
                    "warning: its head was not packed ({e}); exports read its chunks; \
                     `mbank pack {machine}` tries again"
                )),
            }
        }
        AdminCmd::Unpublish { machine } => {
            if access.unpublish(&machine)? {
                say(format!("{machine} is no longer published"));
            } else {
                bail!("{machine} is not published; `mbank admin published` lists what is");
            }
        }
        AdminCmd::RepairRights { json } => {
            let bank = mbank_bank::Bank::open(bank_dir, true)?;
            let r = bank.verify_rights()?;
            let mut granted = 0u64;
            for m in &r {
                let (machine, version) = m
                    .version
                    .split_once('@')
                    .context("verify names versions machine@version")?;
                let machine: MachineName = machine.parse()?;
                let ids = version_chunks(&bank, &machine, version)?;
                if m.user == "(published)" {
                    let by = std::env::var("USER").unwrap_or_else(|_| "admin".into());
                    access.publish(&machine, &by, ids.iter().copied())?;
                } else {
                    let rows: Vec<(ChunkId, u64)> = ids.iter().map(|id| (*id, 0)).collect();
                    access.grant(&m.user, &rows)?;
                }
                granted += m.chunks;
            }
            if json {
                crate::json_out(&serde_json::json!({
                    "versions_repaired": r.len(),
                    "rights_granted": granted,
                }))?;
            }
            say(format!(
                "granted {granted} missing rights to the chunks of {} versions",
                r.len()
            ));
        }
        AdminCmd::Published { json } => {
            let ms = access.published()?;
            if json {
                crate::json_out(&ms)?;
            } else {
                for m in ms {
                    outln!("{m}")?;
                }
            }
        }
    }
    Ok(())
}

/// Every chunk id of one version of `machine` (its disk index and streams).
fn version_chunks(
    bank: &mbank_bank::Bank,
    machine: &MachineName,
    version: &str,
) -> Result<Vec<ChunkId>> {
    let catalog = bank.catalog();
    let v = catalog.resolve(machine, Some(version))?;
    let mut ids: HashSet<ChunkId> = catalog
        .disk_index(&v)?
        .chunks
        .iter()
        .flatten()
        .copied()
        .collect();
    for (_, s) in catalog.streams(&v)? {
        ids.extend(s.runs.iter().filter_map(|r| r.id));
    }
    Ok(ids.into_iter().collect())
}

/// Every chunk id in every version (disk indexes and streams) of `machine`. The one
/// place this module reads the bank itself.
fn machine_chunks(bank_dir: &Path, machine: &MachineName) -> Result<Vec<ChunkId>> {
    let bank = mbank_bank::Bank::open(bank_dir, true)?;
    let catalog = bank.catalog();
    if catalog.machine(machine)?.is_none() {
        bail!("there is no machine {machine} in the bank; `mbank ls` lists them");
    }
    let mut seen = HashSet::new();
    for v in catalog.versions(machine)? {
        seen.extend(catalog.disk_index(&v)?.chunks.iter().flatten().copied());
        for (_, idx) in catalog.streams(&v)? {
            seen.extend(idx.runs.iter().filter_map(|r| r.id));
        }
    }
    Ok(seen.into_iter().collect())
}

/// The new password for `name`: the first line of standard input, or asked twice on
/// the terminal with echo off.
fn new_password(name: &str, from_stdin: bool) -> Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("read the password from standard input")?;
        let pw = line.strip_suffix('\n').unwrap_or(&line);
        let pw = pw.strip_suffix('\r').unwrap_or(pw);
        return Ok(pw.to_string());
    }
    let first = ask_hidden(&format!("new password for {name}: "))?;
    let second = ask_hidden("the same password again: ")?;
    if first != second {
        bail!("the two passwords differ; nothing was changed");
    }
    Ok(first)
}

/// Asks on `/dev/tty` with echo off, and restores the terminal afterwards.
pub(crate) fn ask_hidden(prompt: &str) -> Result<String> {
    use std::os::fd::AsRawFd;
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .context("no terminal to ask for the password on; pass it with --password-stdin")?;
    let fd = tty.as_raw_fd();
    // SAFETY: a zeroed termios is a valid value to be overwritten by tcgetattr.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open descriptor owned by `tty`; `saved` is a valid termios.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("read the terminal's settings; pass the password with --password-stdin");
    }
    let mut quiet = saved;
    quiet.c_lflag &= !(libc::ECHO | libc::ECHONL);
    quiet.c_lflag |= libc::ICANON;
    (&tty).write_all(prompt.as_bytes())?;
    // SAFETY: as above; `quiet` is a valid termios derived from the current one.
    if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &quiet) } != 0 {
        return Err(std::io::Error::last_os_error()).context("turn off the terminal's echo");
    }
    let mut line = String::new();
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    // SAFETY: as above; restores the settings read before.
    unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &saved) };
    let _ = (&tty).write_all(b"\n");
    read.context("read the password from the terminal")?;
    if line.is_empty() {
        bail!("no password given (end of input)");
    }
    let pw = line.strip_suffix('\n').unwrap_or(&line);
    Ok(pw.to_string())
}

/// The users table of `admin user ls` (or its JSON).
fn print_users(users: Vec<mbank_access::UserInfo>, json: bool) -> Result<()> {
    if json {
        crate::json_out(&users)?;
    } else {
        outln!(
            "{:<32} {:<5} {:>10} {:>10} {:>6} {:<20}",
            "USER",
            "ADMIN",
            "QUOTA",
            "USED",
            "TOKENS",
            "CREATED (UTC)"
        )?;
        for u in users {
            outln!(
                "{:<32} {:<5} {:>10} {:>10} {:>6} {:<20}",
                u.name,
                if u.admin { "yes" } else { "no" },
                u.quota.map_or("-".into(), bytes),
                bytes(u.used),
                u.tokens_live,
                date(u.created_ms),
            )?;
        }
    }
    Ok(())
}
