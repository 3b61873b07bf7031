//! Retention: which versions a `--keep-*` policy keeps, with restic's meaning of each
//! rule, and which versions no policy may remove.
//!
//! Versions are taken newest first (by creation time; among equal times, the one
//! committed later first). Each rule with a count left looks at each version in turn:
//!
//! - `last`: every version counts on its own, so the newest N are kept;
//! - `hourly`, `daily`, `weekly`, `monthly`: a version is kept when its hour (day, ISO
//!   week, month) differs from that of the last version this rule kept, so the newest
//!   version of each of the newest N periods that have a version is kept;
//! - the oldest version is kept by every rule that still has a count left when it is
//!   reached (restic does the same: it keeps the history as long as the policy allows).
//!
//! Each kept version uses up one of the rule's count. Rules combine by "or": a version is
//! kept when any rule keeps it. Periods are in UTC (restic uses the local time zone; a
//! bank serves stations in many). On top of the rules, these are never removed
//! ([`Protected`]): the machine's head, the base version of every session (live or
//! displaced by `--force`), and every suspended version nothing was made from yet (a
//! saved memory state no one resumed, which a kept-beside suspend can be).

use mbank_core::{VersionId, civil_from_days};
use serde::{Deserialize, Serialize};

/// How many versions of each kind to keep (0: the rule is off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
}

impl Policy {
    /// True when no rule is on (such a policy would keep only the protected versions).
    pub fn is_empty(&self) -> bool {
        self.rules().iter().all(|(_, n)| *n == 0)
    }

    fn rules(&self) -> [(Rule, u32); 5] {
        [
            (Rule::Last, self.keep_last),
            (Rule::Hourly, self.keep_hourly),
            (Rule::Daily, self.keep_daily),
            (Rule::Weekly, self.keep_weekly),
            (Rule::Monthly, self.keep_monthly),
        ]
    }
}

impl std::fmt::Display for Policy {
    /// `--keep-last 3 --keep-daily 7`, or `none`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on: Vec<String> = self
            .rules()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("--keep-{} {n}", r.name()))
            .collect();
        if on.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&on.join(" "))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
}

impl Rule {
    fn name(self) -> &'static str {
        match self {
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
        }
    }

    /// The period of a version made at `ms` (`nr`: its place, newest first), as a
    /// number that differs between periods.
    fn bucket(self, ms: i64, nr: usize) -> i64 {
        let days = ms.div_euclid(86_400_000);
        match self {
            Rule::Last => nr as i64,
            Rule::Hourly => ms.div_euclid(3_600_000),
            Rule::Daily => days,
            Rule::Weekly => {
                let (y, w) = iso_week(days);
                y * 100 + w
            }
            Rule::Monthly => {
                let (y, m, _) = civil_from_days(days);
                y * 100 + m
            }
        }
    }
}

/// The ISO 8601 week-numbering year and week of the day `days` after 1970-01-01: weeks
/// start on Monday, and week 1 is the one holding the year's first Thursday.
fn iso_week(days: i64) -> (i64, i64) {
    // 1970-01-01 was a Thursday; Monday is 0.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (year, _, _) = civil_from_days(thursday);
    let jan1 = days_from_civil(year, 1, 1);
    (year, (thursday - jan1) / 7 + 1)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Why a version may not be removed whatever the policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Protected {
    /// The machine's head.
    Head,
    /// A session on this station reads from it.
    SessionBase { station: String },
    /// A saved memory state nothing was made from yet.
    Suspended,
}

impl std::fmt::Display for Protected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Protected::Head => f.write_str("head"),
            Protected::SessionBase { station } => write!(f, "session base ({station})"),
            Protected::Suspended => f.write_str("suspended"),
        }
    }
}

/// One version as retention sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub id: VersionId,
    pub created_ms: i64,
    /// Set when the version may not be removed.
    pub protected: Vec<Protected>,
}

/// What a policy does to one version: kept (with every reason) or removed (no reason).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub version: VersionId,
    pub created_ms: i64,
    /// Why it is kept: rules (`last`, `daily`, `oldest weekly`, ...) and protections.
    pub reasons: Vec<String>,
}

impl Decision {
    pub fn kept(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Applies `policy` to `versions` (newest first): each version with the reasons it is
/// kept for, in the same order; an empty list of reasons means it goes.
pub fn apply(versions: &[Candidate], policy: &Policy) -> Vec<Decision> {
    // Each rule: its count left, and the period of the last version it kept.
    let mut left: Vec<(Rule, u32, Option<i64>)> = policy
        .rules()
        .into_iter()
        .map(|(r, n)| (r, n, None))
        .collect();
    let oldest = versions.len().saturating_sub(1);
    versions
        .iter()
        .enumerate()
        .map(|(nr, v)| {
            let mut reasons = Vec::new();
            for (rule, count, last) in left.iter_mut() {
                if *count == 0 {
                    continue;
                }
                let b = rule.bucket(v.created_ms, nr);
                if Some(b) != *last {
                    reasons.push(rule.name().to_string());
                } else if nr == oldest {
                    reasons.push(format!("oldest {}", rule.name()));
                } else {
                    continue;
                }
                *last = Some(b);
                *count -= 1;
            }
            reasons.extend(v.protected.iter().map(ToString::to_string));
            Decision {
                version: v.id,
                created_ms: v.created_ms,
                reasons,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_helpers_agree_with_known_dates() {
        // 2024-12-30 is a Monday in ISO week 2025-W01; 2021-01-03 a Sunday in 2020-W53.
        let d = days_from_civil(2024, 12, 30);
        assert_eq!(civil_from_days(d), (2024, 12, 30));
        assert_eq!(iso_week(d), (2025, 1));
        assert_eq!(iso_week(d - 1), (2024, 52));
        assert_eq!(iso_week(days_from_civil(2021, 1, 3)), (2020, 53));
        assert_eq!(iso_week(days_from_civil(2021, 1, 4)), (2021, 1));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));
    }

    #[test]
    fn display_names_the_rules() {
        let p = Policy {
            keep_last: 3,
            keep_daily: 7,
            ..Default::default()
        };
        assert_eq!(p.to_string(), "--keep-last 3 --keep-daily 7");
        assert_eq!(Policy::default().to_string(), "none");
        assert!(Policy::default().is_empty() && !p.is_empty());
    }
}
