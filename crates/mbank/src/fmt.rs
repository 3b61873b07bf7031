//! Human formats: sizes and dates.

/// `1536` → `1.5 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `64K`, `64KiB`, `1M`, `65536` → bytes (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let bad = || format!("{s:?} is not a size like 64K, 1M or 1.5G");
    if int.is_empty()
        || frac.contains('.')
        || frac.len() > 9
        || (num.contains('.') && frac.is_empty())
    {
        return Err(bad());
    }
    let n: u64 = int.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?} has an unknown unit (use K, M, G or T)")),
    };
    let too_large = || format!("{s:?} is too large");
    let whole = n.checked_mul(mult).ok_or_else(too_large)?;
    if frac.is_empty() {
        return Ok(whole);
    }
    // The fraction times the unit, which must come to whole bytes.
    let f: u128 = frac.parse().map_err(|_| bad())?;
    let scaled = f * u128::from(mult);
    let den = 10u128.pow(frac.len() as u32);
    if !scaled.is_multiple_of(den) {
        return Err(format!("{s:?} is not a whole number of bytes"));
    }
    whole
        .checked_add(u64::try_from(scaled / den).map_err(|_| too_large())?)
        .ok_or_else(too_large)
}

/// Milliseconds since the epoch → `YYYY-MM-DD HH:MM:SS` in UTC.
pub fn date(ms: i64) -> String {
    mbank_core::utc_datetime(ms)
}

/// Milliseconds since the epoch as RFC 3339 in UTC: `2026-03-01T12:00:00.250Z`.
pub fn rfc3339(ms: i64) -> String {
    let d = mbank_core::utc_datetime(ms).replacen(' ', "T", 1);
    format!("{d}.{:03}Z", ms.rem_euclid(1000))
}

/// The `_ms` fields that hold a moment (not a duration): each gets a `_utc` twin in
/// JSON output.
const MOMENTS: &[&str] = &[
    "created_ms",
    "updated_ms",
    "started_ms",
    "since_ms",
    "heartbeat_ms",
    "expires_ms",
    "revoked_ms",
    "recorded_ms",
    "used_ms",
    "last_used_ms",
    "cutoff_ms",
];

/// Adds beside every moment field `X_ms` (an integer) of `v`, at any depth, `X_utc`: the
/// same moment in RFC 3339, for people and for tools that parse dates.
pub fn add_utc(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let twins: Vec<(String, String)> = map
                .iter()
                .filter(|(k, _)| MOMENTS.contains(&k.as_str()))
                .filter_map(|(k, ms)| {
                    let stem = k.strip_suffix("_ms")?;
                    Some((format!("{stem}_utc"), rfc3339(ms.as_i64()?)))
                })
                .collect();
            for val in map.values_mut() {
                add_utc(val);
            }
            for (k, t) in twins {
                map.entry(k).or_insert(serde_json::Value::String(t));
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(add_utc),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("4X").is_err());
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5k").unwrap(), 512);
        assert_eq!(parse_size("2.25M").unwrap(), 9 << 18);
        for bad in ["1.", ".5G", "1.2.3M", "1..5G", "0.3"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(12), "12 B");
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01 00:00:00");
        assert_eq!(date(1_795_000_000_000), "2026-11-18 11:06:40");
        assert_eq!(date(951_782_400_000), "2000-02-29 00:00:00");
    }
}
