//! Tokens kept between commands: `$XDG_CONFIG_HOME/mbank/credentials.json` (else
//! `~/.config/mbank/credentials.json`), a JSON map from bank URL to [`Credential`].
//!
//! The file holds secrets, so it is written with mode 0600 in a directory created with
//! mode 0700, and replaced atomically (a temp file renamed over it), so a crash never
//! leaves half a file. `MBANK_TOKEN`, when set, is used instead of the file's token.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::{Client, ClientError, ClientOptions, normalize_url};
use crate::wire::LoginResponse;

/// The environment variable whose token overrides the credentials file.
pub const TOKEN_ENV: &str = "MBANK_TOKEN";

/// What the credentials file keeps for one bank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Credential {
    /// The bearer token.
    pub token: String,
    /// The user it was issued to.
    pub user: String,
    /// When it expires (milliseconds since the Unix epoch).
    pub expires_ms: i64,
    /// The CA certificate file to trust for this bank, if it has its own CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

impl Credential {
    /// True when the token's lifetime is over.
    pub fn expired(&self) -> bool {
        self.expires_ms <= mbank_catalog::now_ms()
    }
}

/// The credentials file: its path and its entries, by normalised URL.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// Where the file is.
    pub path: PathBuf,
    /// Bank URL (without trailing slash) to credential.
    pub banks: BTreeMap<String, Credential>,
}

/// `$XDG_CONFIG_HOME/mbank/credentials.json`, else `$HOME/.config/mbank/credentials.json`;
/// `None` when neither variable is set.
pub fn default_path() -> Option<PathBuf> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(config.join("mbank").join("credentials.json"))
}

fn no_path() -> ClientError {
    ClientError::Local(
        "cannot find the credentials file: neither XDG_CONFIG_HOME nor HOME is set".into(),
    )
}

impl Credentials {
    /// The credentials file at [`default_path`] (empty if it does not exist yet).
    pub fn load() -> Result<Self, ClientError> {
        Credentials::load_from(&default_path().ok_or_else(no_path)?)
    }

    /// The credentials file at `path` (empty if it does not exist yet).
    pub fn load_from(path: &Path) -> Result<Self, ClientError> {
        let banks = match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ClientError::Local(format!(
                    "the credentials file {} is damaged ({e}); remove it and log in again",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(ClientError::Local(format!(
                    "cannot read the credentials file {}: {e}",
                    path.display()
                )));
            }
        };
        Ok(Credentials {
            path: path.to_path_buf(),
            banks,
        })
    }

    /// The credential for the bank at `url`.
    /// The credential for `url`: filed under `url`, else under another spelling of the
    /// same loopback address (`localhost`, `127.0.0.1`, `[::1]`, same scheme and port),
    /// which can only be this machine's server.
    pub fn get(&self, url: &str) -> Option<&Credential> {
        self.key_for(url).and_then(|k| self.banks.get(&k))
    }

    /// The URL a credential for `url` is filed under (see [`Credentials::get`]).
    fn key_for(&self, url: &str) -> Option<String> {
        let url = normalize_url(url);
        if self.banks.contains_key(&url) {
            return Some(url);
        }
        let same = loopback_key(&url)?;
        self.banks
            .keys()
            .find(|k| loopback_key(k).as_deref() == Some(same.as_str()))
            .cloned()
    }

    /// The URLs credentials are filed under, but for `url`'s (for a message).
    pub fn others(&self, url: &str) -> Vec<String> {
        let own = self.key_for(url);
        self.banks
            .keys()
            .filter(|k| Some(*k) != own.as_ref())
            .cloned()
            .collect()
    }

    /// Files `c` under `url` (replacing any earlier one); [`Credentials::save`] writes it.
    pub fn set(&mut self, url: &str, c: Credential) {
        self.banks.insert(normalize_url(url), c);
    }

    /// Forgets the credential for `url`; returns it.
    pub fn remove(&mut self, url: &str) -> Option<Credential> {
        let k = self.key_for(url)?;
        self.banks.remove(&k)
    }

    /// Writes the file atomically, mode 0600 (its directory created mode 0700).
    pub fn save(&self) -> Result<(), ClientError> {
        let fail = |what: &str, p: &Path, e: std::io::Error| {
            ClientError::Local(format!("cannot {what} {}: {e}", p.display()))
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail("create the directory", dir, e))?;
        let json = serde_json::to_vec_pretty(&self.banks).expect("credentials serialise");
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "credentials.json".into());
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(fail("write", &tmp, e));
        }
        fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            fail("replace", &self.path, e)
        })?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// The token to use for the bank at `url`: `MBANK_TOKEN` if set, else the credentials
/// file's (`None` if there is none).
pub fn load_token(url: &str) -> Result<Option<String>, ClientError> {
    if let Some(t) = std::env::var(TOKEN_ENV)
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        return Ok(Some(t.trim().to_string()));
    }
    Ok(Credentials::load()?.get(url).map(|c| c.token.clone()))
}

/// Files `c` for `url` in the credentials file at [`default_path`].
pub fn save(url: &str, c: Credential) -> Result<(), ClientError> {
    let mut all = Credentials::load()?;
    all.set(url, c);
    all.save()
}

/// Forgets the credential for `url` in the credentials file (for logout); returns it.
pub fn remove(url: &str) -> Result<Option<Credential>, ClientError> {
    let mut all = Credentials::load()?;
    let gone = all.remove(url);
    if gone.is_some() {
        all.save()?;
    }
    Ok(gone)
}

fn this_host() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Logs in to the bank at `url` as `user`: a new token, valid `ttl_secs` (the server's
/// default, 30 days, if `None`), labelled with this host's name. `ca` is a CA
/// certificate file to trust. Does not write the credentials file: see [`save`].
pub fn login(
    url: &str,
    user: &str,
    password: &str,
    ttl_secs: Option<u64>,
    ca: Option<&Path>,
) -> Result<LoginResponse, ClientError> {
    let mut o = ClientOptions::from_env();
    o.ca_file = ca.map(Path::to_path_buf);
    let client = Client::with_options(url, o)?;
    client.login(
        user,
        password,
        ttl_secs,
        Some(format!("mbank on {}", this_host())),
    )
}

/// `scheme://loopback:port` for a URL whose host is a loopback address spelled any way
/// (`localhost`, `127.0.0.1` and the rest of 127/8, `[::1]`); `None` for another host.
fn loopback_key(url: &str) -> Option<String> {
    let url = url.to_ascii_lowercase();
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p),
        _ => (authority, ""),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback.then(|| format!("{scheme}://loopback:{port}"))
}
