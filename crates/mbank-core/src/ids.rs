//! Identifiers: [`ChunkId`], [`VersionId`], [`MachineName`] and [`MachineRef`].

use std::fmt;
use std::str::FromStr;

/// What was wrong with an identifier a user or a file supplied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("chunk id {0:?} is not 64 hexadecimal digits")]
    BadChunkId(String),
    #[error("version id {0:?} is not 4 to 32 hexadecimal digits")]
    BadVersionId(String),
    #[error("machine name {name:?} is invalid: {why}")]
    BadMachineName { name: String, why: &'static str },
}

fn hex_encode(bytes: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
}

fn hex_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nibble(s[2 * i])? << 4 | nibble(s[2 * i + 1])?;
    }
    Some(out)
}

/// The BLAKE3-256 hash of a chunk's plaintext; the chunk's name everywhere.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    /// Length of a chunk id in bytes.
    pub const LEN: usize = 32;

    /// Hashes `data` and returns its id.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// An id from its raw bytes, as read from an index.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        ChunkId(bytes)
    }

    /// The raw bytes, as written into an index.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64-digit lowercase hex form, used in file names and messages.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        hex_encode(&self.0, &mut s);
        s
    }

    /// The first byte, which chooses the store's fan-out directory.
    pub const fn fanout(&self) -> u8 {
        self.0[0]
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl FromStr for ChunkId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        hex_decode::<32>(s)
            .map(ChunkId)
            .ok_or_else(|| IdError::BadChunkId(s.chars().take(80).collect()))
    }
}

/// The id of one immutable version of a machine: 128 random bits, shown as 32 hex digits.
/// Users may type any unique prefix of at least [`VersionId::MIN_PREFIX`] digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VersionId([u8; 16]);

impl VersionId {
    /// Shortest prefix accepted when a user names a version.
    pub const MIN_PREFIX: usize = 4;
    /// Digits shown in tables; the JSON output always has all 32.
    pub const SHORT: usize = 12;

    /// A fresh random id.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        // The OS random source failing is not something a user can act on.
        getrandom::fill(&mut b).expect("the operating system's random source failed");
        VersionId(b)
    }

    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        VersionId(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        hex_encode(&self.0, &mut s);
        s
    }

    /// The abbreviated form shown in tables.
    pub fn short(&self) -> String {
        self.to_hex()[..Self::SHORT].to_string()
    }

    /// Checks that `s` could be a (prefix of a) version id, and lower-cases it.
    pub fn normalize_prefix(s: &str) -> Result<String, IdError> {
        let ok =
            (Self::MIN_PREFIX..=32).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_hexdigit());
        if ok {
            Ok(s.to_ascii_lowercase())
        } else {
            Err(IdError::BadVersionId(s.chars().take(80).collect()))
        }
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VersionId({})", self.to_hex())
    }
}

impl FromStr for VersionId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        hex_decode::<16>(s)
            .map(VersionId)
            .ok_or_else(|| IdError::BadVersionId(s.chars().take(80).collect()))
    }
}

/// A machine's name: `user/name`.
///
/// `user` is 1 to 32 characters from `a-z 0-9 _ -`, starting with a letter or digit.
/// `name` is 1 to 64 characters from `a-z A-Z 0-9 . _ -`, starting with a letter or digit.
/// So a name never contains `..` as a path component, spaces, or control characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MachineName {
    full: String,
    slash: usize,
}

impl MachineName {
    pub const MAX_USER: usize = 32;
    pub const MAX_NAME: usize = 64;

    pub fn user(&self) -> &str {
        &self.full[..self.slash]
    }

    pub fn name(&self) -> &str {
        &self.full[self.slash + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl FromStr for MachineName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bad = |why| IdError::BadMachineName {
            name: if s.chars().count() > 80 {
                format!("{}…", s.chars().take(60).collect::<String>())
            } else {
                s.to_string()
            },
            why,
        };
        let Some((user, name)) = s.split_once('/') else {
            return Err(bad("expected user/name, like alice/dev"));
        };
        if user.is_empty() || user.len() > Self::MAX_USER {
            return Err(bad("the user part must be 1 to 32 characters"));
        }
        if name.is_empty() || name.len() > Self::MAX_NAME {
            return Err(bad("the name part must be 1 to 64 characters"));
        }
        if !user
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
        {
            return Err(bad(
                "the user part may hold only a-z, 0-9, '_' and '-' (and one '/' separates it from the name)",
            ));
        }
        if !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        {
            return Err(bad(
                "the name part may hold only a-z, A-Z, 0-9, '.', '_' and '-'",
            ));
        }
        if !user.as_bytes()[0].is_ascii_alphanumeric()
            || !name.as_bytes()[0].is_ascii_alphanumeric()
        {
            return Err(bad("each part must start with a letter or digit"));
        }
        Ok(MachineName {
            full: s.to_string(),
            slash: user.len(),
        })
    }
}

impl fmt::Display for MachineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for MachineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MachineName({})", self.full)
    }
}

/// `user/name` or `user/name@<version prefix>`, as typed on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineRef {
    pub machine: MachineName,
    /// A lower-case hex prefix of a version id; `None` means the machine's head.
    pub version: Option<String>,
}

impl FromStr for MachineRef {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        match s.split_once('@') {
            None => Ok(MachineRef {
                machine: s.parse()?,
                version: None,
            }),
            Some((m, v)) => Ok(MachineRef {
                machine: m.parse()?,
                version: Some(VersionId::normalize_prefix(v)?),
            }),
        }
    }
}

impl fmt::Display for MachineRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            None => write!(f, "{}", self.machine),
            Some(v) => write!(f, "{}@{}", self.machine, v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_id_hex_round_trip() {
        let id = ChunkId::of(b"hello");
        assert_eq!(id.to_hex().len(), 64);
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        assert_eq!(id.to_hex().to_uppercase().parse::<ChunkId>().unwrap(), id);
        assert!("xyz".parse::<ChunkId>().is_err());
        assert!(id.to_hex()[..63].parse::<ChunkId>().is_err());
    }

    #[test]
    fn version_ids() {
        let v = VersionId::random();
        assert_ne!(v, VersionId::random());
        assert_eq!(v.to_hex().parse::<VersionId>().unwrap(), v);
        assert_eq!(VersionId::normalize_prefix("ABCD").unwrap(), "abcd");
        assert!(VersionId::normalize_prefix("abc").is_err());
        assert!(VersionId::normalize_prefix("abcg").is_err());
    }

    #[test]
    fn machine_names() {
        for good in ["alice/dev", "lab/debian12", "a/b", "bob_2/My.Machine-1"] {
            let m: MachineName = good.parse().unwrap();
            assert_eq!(m.as_str(), good);
        }
        assert_eq!("alice/dev".parse::<MachineName>().unwrap().user(), "alice");
        assert_eq!("alice/dev".parse::<MachineName>().unwrap().name(), "dev");
        let long = "a".repeat(10_000);
        for bad in [
            "alice",
            "alice/",
            "/dev",
            "alice/..",
            "alice/../bob",
            "alice/.hidden",
            "alice/my dev",
            "Alice/dev",
            "alice/dev/x",
            "alice/dev\n",
            "al ice/dev",
            "-x/dev",
            &format!("alice/{long}"),
            &format!("{long}/dev"),
        ] {
            let e = bad.parse::<MachineName>().unwrap_err();
            assert!(
                e.to_string().len() < 300,
                "message stays short for {bad:.20}"
            );
        }
    }

    #[test]
    fn machine_refs() {
        let r: MachineRef = "alice/dev@ABCD12".parse().unwrap();
        assert_eq!(r.machine.as_str(), "alice/dev");
        assert_eq!(r.version.as_deref(), Some("abcd12"));
        assert!("alice/dev@".parse::<MachineRef>().is_err());
        assert!("alice/dev@zz".parse::<MachineRef>().is_err());
        assert_eq!("alice/dev".parse::<MachineRef>().unwrap().version, None);
    }
}

/// Identifiers travel as their text form (hex digits, `user/name`) in JSON.
macro_rules! serde_as_text {
    ($t:ty, $what:literal) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}
serde_as_text!(ChunkId, "a chunk id (64 hexadecimal digits)");
serde_as_text!(VersionId, "a version id (32 hexadecimal digits)");
serde_as_text!(MachineName, "a machine name (user/name)");
serde_as_text!(MachineRef, "a machine (user/name or user/name@VERSION)");
