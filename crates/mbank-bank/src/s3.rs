//! A bank whose chunks live in an S3 bucket: the `store` line of the `MBANK` marker
//! ([`StoreSpec`]) and where the credentials come from.
//!
//! Only the chunks go to the bucket. The catalog stays in the bank directory: it is the
//! single writer of heads and sessions, which needs compare-and-swap, and Garage ignores
//! conditional PUTs. One bucket belongs to one bank: a bank's GC deletes every chunk in
//! the bucket that its own catalog does not reference, so `init` refuses a bucket that
//! already holds chunks.
//!
//! Credentials are never in the marker. They come from `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY` when both are set, else from `<bank>/s3-credentials`: two
//! lines, `key_id=...` and `secret=...`, readable by its owner only (mode 0600).

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use mbank_store::{S3Config, S3Store, StoreError};

use crate::BankError;

/// The credentials file in a bank directory.
pub const CREDENTIALS_FILE: &str = "s3-credentials";
const CREDENTIALS_MAX_LEN: u64 = 4096;
const ENV_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
const ENV_SECRET: &str = "AWS_SECRET_ACCESS_KEY";
/// The form of a store URL, for messages.
pub const STORE_URL_FORM: &str = "s3://BUCKET?endpoint=URL[,URL...]&region=REGION";

/// Where a bank's chunks are when they are not in its directory: an S3 bucket.
///
/// Written as `s3://BUCKET?endpoint=URL[,URL...]&region=REGION`: the bucket, the base
/// URL of the S3 API of one or more nodes (`http://` or `https://`, host and port only;
/// give every node's, so that the bank keeps working while one is down; `endpoint=` may
/// also be repeated) and the region the server signs for (Garage: its `s3_region`,
/// usually `garage`). Values are taken as written, without percent-decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreSpec {
    pub bucket: String,
    pub endpoints: Vec<String>,
    pub region: String,
}

impl StoreSpec {
    /// Parses a store URL; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<StoreSpec, String> {
        let rest = url.strip_prefix("s3://").ok_or(
            "it does not start with s3:// (the only kind of store besides the bank directory)",
        )?;
        let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
        let bucket = bucket.trim_end_matches('/');
        check_bucket(bucket)?;
        let mut endpoints = Vec::new();
        let mut region = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            match k {
                "endpoint" => {
                    for e in v.split(',') {
                        endpoints.push(check_endpoint(e)?);
                    }
                }
                "region" => {
                    if region.is_some() {
                        return Err("region is given twice".into());
                    }
                    check_region(v)?;
                    region = Some(v.to_string());
                }
                _ => {
                    return Err(format!("unknown parameter {k:?} (known: endpoint, region)"));
                }
            }
        }
        if endpoints.is_empty() {
            return Err("no endpoint=URL given (the S3 API of the nodes, e.g. endpoint=http://127.0.0.1:3900)".into());
        }
        let region = region.ok_or(
            "no region=REGION given (the region the server signs for; Garage's s3_region, usually garage)",
        )?;
        Ok(StoreSpec {
            bucket: bucket.to_string(),
            endpoints,
            region,
        })
    }
}

impl fmt::Display for StoreSpec {
    /// The canonical URL, which [`StoreSpec::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "s3://{}?endpoint={}&region={}",
            self.bucket,
            self.endpoints.join(","),
            self.region
        )
    }
}

impl FromStr for StoreSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        StoreSpec::parse(s).map_err(|why| format!("{why}; the form is {STORE_URL_FORM}"))
    }
}

/// S3 bucket naming rules: 3 to 63 of `a-z 0-9 . -`, starting and ending with a letter
/// or digit.
fn check_bucket(b: &str) -> Result<(), String> {
    let ok_char = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-';
    let edge = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let bytes = b.as_bytes();
    if !(3..=63).contains(&b.len())
        || !bytes.iter().all(|&c| ok_char(c))
        || !edge(bytes.first())
        || !edge(bytes.last())
    {
        return Err(format!(
            "{b:?} is not a bucket name (3 to 63 of a-z, 0-9, '.', '-', beginning and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// An endpoint is `http://` or `https://`, a host and maybe a port, and nothing else
/// (requests are path-style and signed for the path `/BUCKET/KEY`).
fn check_endpoint(e: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("endpoint {e:?} {why}"));
    let Some(host) = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
    else {
        return bad("does not start with http:// or https://");
    };
    let host = host.trim_end_matches('/');
    if host.is_empty() {
        return bad("names no host");
    }
    if host
        .chars()
        .any(|c| matches!(c, '/' | '?' | '#' | '@' | '%') || c.is_whitespace() || c.is_control())
    {
        return bad("must be scheme://host[:port] only, with no path, user or query");
    }
    Ok(e.trim_end_matches('/').to_string())
}

fn check_region(r: &str) -> Result<(), String> {
    if r.is_empty()
        || r.len() > 64
        || !r
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
    {
        return Err(format!("region {r:?} is not a region name"));
    }
    Ok(())
}

/// An access key, and where it came from (for messages; never the secret).
#[derive(Clone)]
pub(crate) struct Credentials {
    pub key_id: String,
    pub secret: String,
    pub from: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("key_id", &self.key_id)
            .field("secret", &"…")
            .field("from", &self.from)
            .finish()
    }
}

/// The bank's credentials: from the environment (`env` looks a variable up) when both
/// variables are set, else from `<bank>/s3-credentials`.
pub(crate) fn credentials(
    bank: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Credentials, BankError> {
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    let file = bank.join(CREDENTIALS_FILE);
    match (get(ENV_KEY_ID), get(ENV_SECRET)) {
        (Some(key_id), Some(secret)) => Ok(Credentials {
            key_id,
            secret,
            from: format!("the environment ({ENV_KEY_ID}, {ENV_SECRET})"),
        }),
        (Some(_), None) | (None, Some(_)) => Err(BankError::BadCredentials {
            from: "the environment".into(),
            why: format!(
                "only one of {ENV_KEY_ID} and {ENV_SECRET} is set; set both, or neither to use {}",
                file.display()
            ),
        }),
        (None, None) => read_credentials_file(&file)?.ok_or(BankError::NoCredentials {
            bank: bank.to_path_buf(),
            file,
        }),
    }
}

/// Reads a credentials file; `None` when there is none. Refuses a file that group or
/// others may read or write.
pub(crate) fn read_credentials_file(path: &Path) -> Result<Option<Credentials>, BankError> {
    let md = match fs::metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(BankError::io("read the S3 credentials", path, e)),
    };
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(BankError::CredentialsExposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let bad = |why: String| BankError::BadCredentials {
        from: path.display().to_string(),
        why,
    };
    if md.len() > CREDENTIALS_MAX_LEN {
        return Err(bad(format!("it is {} bytes long", md.len())));
    }
    let text =
        fs::read_to_string(path).map_err(|e| BankError::io("read the S3 credentials", path, e))?;
    let (mut key_id, mut secret) = (None, None);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(bad(format!("line {} is not key=value", n + 1)));
        };
        let slot = match k.trim() {
            "key_id" => &mut key_id,
            "secret" => &mut secret,
            other => {
                return Err(bad(format!(
                    "line {}: unknown key {other:?} (expected key_id and secret)",
                    n + 1
                )));
            }
        };
        if slot.replace(v.trim().to_string()).is_some() {
            return Err(bad(format!("line {}: {} is given twice", n + 1, k.trim())));
        }
    }
    match (key_id, secret) {
        (Some(key_id), Some(secret)) if !key_id.is_empty() && !secret.is_empty() => {
            Ok(Some(Credentials {
                key_id,
                secret,
                from: path.display().to_string(),
            }))
        }
        _ => Err(bad(
            "it must hold two lines, key_id=... and secret=..., both non-empty".into(),
        )),
    }
}

/// An [`S3Store`] for the bank in `bank` whose marker names `spec`, with the
/// credentials from the process environment or the bank's credentials file. Makes no
/// request; the credentials' origin is returned for messages.
pub(crate) fn open_store(bank: &Path, spec: &StoreSpec) -> Result<(S3Store, String), BankError> {
    let c = credentials(bank, &|k| std::env::var(k).ok())?;
    let mut cfg = S3Config::new(
        spec.endpoints.clone(),
        &spec.region,
        &spec.bucket,
        &c.key_id,
        &c.secret,
    );
    // Every writer and every GC of this bank runs on this host (the catalog is here):
    // lock files beside the catalog make touch and sweep exclude each other across
    // processes, as flock on the chunk directories does for a local bank.
    // The store makes the directory at its first lock. A bank on read-only media
    // cannot have it, and needs none: it writes nothing.
    if crate::dir_is_writable(bank) {
        cfg.lock_dir = Some(bank.join("locks"));
    }
    // A bank whose catalog is in PostgreSQL may be served from several hosts: their
    // touches and sweeps exclude each other by PostgreSQL's advisory locks too.
    let url = mbank_sql::bank_url(bank)
        .map_err(|e| BankError::io("read", bank.join(mbank_sql::URL_FILE), e))?;
    cfg.prefix_locks =
        url.map(|u| mbank_store::SharedPrefixLocks(Arc::new(PgPrefixLocks::new(&u))));
    Ok((S3Store::new(cfg)?, c.from))
}

/// The first advisory lock key of the 256 fan-out prefixes' locks (`PgPrefixLocks`).
pub const PREFIX_LOCK_BASE: i64 = 0x006d_6261_6e6b_1000;

/// [`mbank_store::PrefixLocks`] on the bank's PostgreSQL database: one advisory lock
/// per fan-out prefix, key [`PREFIX_LOCK_BASE`] + the prefix.
pub struct PgPrefixLocks(Arc<mbank_sql::LockPool>);

impl PgPrefixLocks {
    pub fn new(url: &str) -> Self {
        PgPrefixLocks(mbank_sql::LockPool::new(url))
    }
}

impl mbank_store::PrefixLocks for PgPrefixLocks {
    fn lock(
        &self,
        fanout: u8,
        exclusive: bool,
    ) -> Result<Box<dyn std::any::Any + Send>, StoreError> {
        let held = self
            .0
            .lock(PREFIX_LOCK_BASE + i64::from(fanout), exclusive)
            .map_err(|e| {
                StoreError::Remote(format!(
                    "cannot take the lock of chunk prefix {fanout:02x} in the bank's PostgreSQL database: {e}"
                ))
            })?;
        Ok(Box::new(held))
    }
}

/// An error for a store that did not answer `check` as it should, with what the user
/// can do about it.
pub(crate) fn unreachable(spec: &StoreSpec, creds_from: &str, e: StoreError) -> BankError {
    let kind = match &e {
        StoreError::Io { source, .. } => Some(source.kind()),
        _ => None,
    };
    let advice = match kind {
        Some(std::io::ErrorKind::PermissionDenied) => format!(
            "the server refused the credentials from {creds_from}: check the key id and secret, and that the key may read and write bucket {}",
            spec.bucket
        ),
        Some(std::io::ErrorKind::NotFound) => format!(
            "check that bucket {} exists (Garage: `garage bucket create {}`) and that the key is allowed on it",
            spec.bucket, spec.bucket
        ),
        _ => format!(
            "check that the S3 endpoints ({}) are up and reachable from this machine; list every node's endpoint, separated by commas, so that one node down does not stop the bank",
            spec.endpoints.join(", ")
        ),
    };
    BankError::StoreUnreachable {
        url: spec.to_string(),
        advice,
        source: Box::new(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn store_urls_parse_and_print_back() {
        let s =
            StoreSpec::parse("s3://mbank?endpoint=http://127.0.0.1:3900&region=garage").unwrap();
        assert_eq!(s.bucket, "mbank");
        assert_eq!(s.endpoints, ["http://127.0.0.1:3900"]);
        assert_eq!(s.region, "garage");
        assert_eq!(
            s.to_string(),
            "s3://mbank?endpoint=http://127.0.0.1:3900&region=garage"
        );

        let s = StoreSpec::parse(
            "s3://my.bank-1/?region=eu-west-1&endpoint=https://a:1/,http://b:2&endpoint=http://c",
        )
        .unwrap();
        assert_eq!(s.bucket, "my.bank-1");
        assert_eq!(s.endpoints, ["https://a:1", "http://b:2", "http://c"]);
        assert_eq!(s.region, "eu-west-1");
        assert_eq!(StoreSpec::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn bad_store_urls_say_what_is_wrong() {
        let cases = [
            ("file:///x", "s3://"),
            ("s3://mbank?region=garage", "no endpoint"),
            ("s3://mbank?endpoint=http://h:1", "no region"),
            ("s3://mbank?endpoint=ftp://h&region=r", "http://"),
            ("s3://mbank?endpoint=http://&region=r", "no host"),
            ("s3://mbank?endpoint=http://h/path&region=r", "no path"),
            ("s3://mbank?endpoint=http://h,,&region=r", "endpoint \"\""),
            ("s3://mbank?endpoint=http://h&region=r&region=s", "twice"),
            ("s3://mbank?endpoint=http://h&region=", "region"),
            (
                "s3://mbank?endpoint=http://h&region=r&acl=x",
                "unknown parameter",
            ),
            ("s3://mbank?endpoint", "key=value"),
            ("s3://MBank?endpoint=http://h&region=r", "bucket name"),
            ("s3://ab?endpoint=http://h&region=r", "bucket name"),
            ("s3://-ab?endpoint=http://h&region=r", "bucket name"),
            ("s3://?endpoint=http://h&region=r", "bucket name"),
        ];
        for (url, needle) in cases {
            let e = StoreSpec::parse(url).unwrap_err();
            assert!(e.contains(needle), "{url}: {e}");
        }
        let e = "s3://x".parse::<StoreSpec>().unwrap_err();
        assert!(e.contains(STORE_URL_FORM), "{e}");
    }

    fn write_mode(path: &Path, text: &str, mode: u32) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn credentials_file_must_be_private() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join(CREDENTIALS_FILE);
        let text = "# garage key\nkey_id=GK123\nsecret = s3cr3t\n";
        write_mode(&f, text, 0o600);
        let c = read_credentials_file(&f).unwrap().unwrap();
        assert_eq!((c.key_id.as_str(), c.secret.as_str()), ("GK123", "s3cr3t"));
        assert!(!format!("{c:?}").contains("s3cr3t"));
        write_mode(&f, text, 0o400);
        assert!(read_credentials_file(&f).unwrap().is_some());
        for mode in [0o644, 0o640, 0o604, 0o620, 0o660] {
            write_mode(&f, text, mode);
            let e = read_credentials_file(&f).unwrap_err();
            assert!(
                matches!(e, BankError::CredentialsExposed { mode: m, .. } if m == mode),
                "{mode:o}: {e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains("chmod 600") && msg.contains(&f.display().to_string()),
                "{msg}"
            );
            assert!(!msg.contains("s3cr3t"), "{msg}");
        }
    }

    #[test]
    fn credentials_file_contents_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join(CREDENTIALS_FILE);
        assert!(read_credentials_file(&f).unwrap().is_none());
        for (text, needle) in [
            ("key_id=a\n", "two lines"),
            ("key_id=a\nsecret=\n", "two lines"),
            ("key_id=a\nsecret=b\nregion=c\n", "unknown key"),
            ("key_id=a\nkey_id=b\nsecret=c\n", "twice"),
            ("key_id a\nsecret=b\n", "not key=value"),
        ] {
            write_mode(&f, text, 0o600);
            let e = read_credentials_file(&f).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn environment_first_then_file() {
        let d = tempfile::tempdir().unwrap();
        let vars = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let lookup = |m: &HashMap<String, String>| {
            let m = m.clone();
            move |k: &str| m.get(k).cloned()
        };
        // Neither: the error names both sources.
        let none = vars(&[]);
        let e = credentials(d.path(), &lookup(&none))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(ENV_KEY_ID) && e.contains(ENV_SECRET) && e.contains(CREDENTIALS_FILE),
            "{e}"
        );
        // The file.
        write_mode(
            &d.path().join(CREDENTIALS_FILE),
            "key_id=file-id\nsecret=file-secret\n",
            0o600,
        );
        let c = credentials(d.path(), &lookup(&none)).unwrap();
        assert_eq!(c.key_id, "file-id");
        // The environment wins over the file.
        let env = vars(&[(ENV_KEY_ID, "env-id"), (ENV_SECRET, "env-secret")]);
        let c = credentials(d.path(), &lookup(&env)).unwrap();
        assert_eq!(
            (c.key_id.as_str(), c.secret.as_str()),
            ("env-id", "env-secret")
        );
        assert!(c.from.contains("environment"));
        // Half of the environment is a mistake, not a fallback.
        let half = vars(&[(ENV_KEY_ID, "env-id")]);
        let e = credentials(d.path(), &lookup(&half))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only one of"), "{e}");
    }
}
