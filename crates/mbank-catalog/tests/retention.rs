//! Retention (`mbank forget`) against an independent model of restic's rules: random
//! version histories with random times, random policies and random sessions; what
//! `forget` keeps is what the model keeps, plus the head, every session's base and
//! every suspended version nothing was made from, and nothing else.

use std::collections::{BTreeSet, HashSet};

use mbank_catalog::{
    Catalog, CatalogError, Lease, NamedStream, Policy, VersionInfo, VersionStats, retention,
};
use mbank_core::{ChunkId, DiskIndex, MachineName, MemoryIndex, MemoryRun, VersionId};
use proptest::prelude::*;

/// The period of `ms` for a rule, computed apart from the code under test: hours, days
/// and months from the UTC date text, weeks as Monday-to-Sunday spans (ISO weeks change
/// on Mondays, so grouping by them groups as ISO week numbers do).
fn period(rule: &str, ms: i64, nr: usize) -> String {
    let t = mbank_core::utc_datetime(ms);
    match rule {
        "last" => nr.to_string(),
        "hourly" => t[..13].to_string(),
        "daily" => t[..10].to_string(),
        "monthly" => t[..7].to_string(),
        "weekly" => {
            // 1970-01-05 was a Monday.
            let day = ms.div_euclid(86_400_000);
            (day - 4).div_euclid(7).to_string()
        }
        _ => unreachable!(),
    }
}

/// restic's rules as a reader of its documentation states them: per rule with count N,
/// the newest version of each of the newest N periods that have versions; and if there
/// are fewer such periods than N, the oldest version too. `times` is newest first.
fn model(times: &[i64], p: &Policy) -> BTreeSet<usize> {
    let mut keep = BTreeSet::new();
    for (rule, n) in [
        ("last", p.keep_last),
        ("hourly", p.keep_hourly),
        ("daily", p.keep_daily),
        ("weekly", p.keep_weekly),
        ("monthly", p.keep_monthly),
    ] {
        if n == 0 || times.is_empty() {
            continue;
        }
        let mut periods: Vec<(String, usize)> = Vec::new();
        for (i, t) in times.iter().enumerate() {
            let k = period(rule, *t, i);
            if periods.last().is_none_or(|(last, _)| *last != k) {
                periods.push((k, i));
            }
        }
        for (_, first) in periods.iter().take(n as usize) {
            keep.insert(*first);
        }
        if periods.len() < n as usize {
            keep.insert(times.len() - 1);
        }
    }
    keep
}

fn policy() -> impl Strategy<Value = Policy> {
    (0u32..4, 0u32..5, 0u32..8, 0u32..5, 0u32..4).prop_map(|(l, h, d, w, m)| Policy {
        keep_last: l,
        keep_hourly: h,
        keep_daily: d,
        keep_weekly: w,
        keep_monthly: m,
    })
}

/// Gaps between versions: minutes, hours, days or weeks, so that every rule meets both
/// periods with several versions and empty periods.
fn gaps(max: usize) -> impl Strategy<Value = Vec<i64>> {
    prop::collection::vec(
        prop_oneof![
            1i64..3_600_000,
            3_600_000i64..30_000_000,
            86_400_000i64..300_000_000,
            600_000_000i64..3_000_000_000,
        ],
        1..max,
    )
}

/// Times, newest first, from a start and gaps.
fn times(start: i64, gaps: &[i64]) -> Vec<i64> {
    let mut t = start;
    let mut out: Vec<i64> = gaps
        .iter()
        .map(|g| {
            t += g;
            t
        })
        .collect();
    out.reverse();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The rules alone, on the pure function.
    #[test]
    fn rules_keep_what_restic_keeps(
        start in 1_600_000_000_000i64..1_800_000_000_000,
        gaps in gaps(60),
        p in policy(),
    ) {
        let times = times(start, &gaps);
        let candidates: Vec<retention::Candidate> = times
            .iter()
            .map(|t| retention::Candidate {
                id: VersionId::random(),
                created_ms: *t,
                protected: Vec::new(),
            })
            .collect();
        let kept: BTreeSet<usize> = retention::apply(&candidates, &p)
            .iter()
            .enumerate()
            .filter(|(_, d)| d.kept())
            .map(|(i, _)| i)
            .collect();
        prop_assert_eq!(kept, model(&times, &p), "policy {} times {:?}", p, times);
    }
}

fn info(
    m: &MachineName,
    id: VersionId,
    parent: Option<VersionId>,
    t: i64,
) -> (VersionInfo, DiskIndex) {
    let mut idx = DiskIndex::zeroed(2 * 4096, 4096);
    idx.chunks[0] = Some(ChunkId::of(&t.to_le_bytes()));
    (
        VersionInfo {
            id,
            machine: m.clone(),
            parent,
            created_ms: t,
            disk_size: idx.disk_size,
            chunk_size: 4096,
            stats: VersionStats::default(),
            config: None,
            streams: Vec::new(),
        },
        idx,
    )
}

fn memory(t: i64) -> Vec<NamedStream> {
    vec![(
        "memory".to_string(),
        MemoryIndex {
            total_len: 8,
            runs: vec![MemoryRun {
                id: Some(ChunkId::of(&(t + 1).to_le_bytes())),
                len: 8,
            }],
        },
    )]
}

/// A version history as the catalog gets it.
#[derive(Debug, Clone)]
struct History {
    start: i64,
    gaps: Vec<i64>,
    /// For each version after the first (oldest first): which earlier version is its
    /// parent (modulo the versions so far).
    parents: Vec<u8>,
    /// Which versions hold a memory state.
    suspended: Vec<bool>,
    /// Where the head ends: on the newest version, or moved back to another.
    head_back: Option<u8>,
    /// Bases of sessions: the last holds the lease, the others were displaced.
    sessions: Vec<u8>,
}

fn history() -> impl Strategy<Value = History> {
    (
        1_600_000_000_000i64..1_800_000_000_000,
        gaps(30),
        prop::collection::vec(any::<u8>(), 30),
        prop::collection::vec(prop::bool::weighted(0.2), 30),
        prop::option::of(any::<u8>()),
        prop::collection::vec(any::<u8>(), 0..3),
    )
        .prop_map(
            |(start, gaps, parents, suspended, head_back, sessions)| History {
                start,
                gaps,
                parents,
                suspended,
                head_back,
                sessions,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// `forget` on a catalog: the rules' versions and the protected ones stay, the rest
    /// go, and what a dry run reports is what the real run does.
    #[test]
    fn forget_keeps_the_rules_head_sessions_and_suspended(h in history(), p in policy()) {
        let d = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(&d.path().join("catalog.db"), true, false).unwrap();
        let m: MachineName = "alice/dev".parse().unwrap();
        // Oldest first, as they were committed.
        let mut old_first = times(h.start, &h.gaps);
        old_first.reverse();
        let n = old_first.len();
        let ids: Vec<VersionId> = (0..n).map(|_| VersionId::random()).collect();
        let mut parent_of = vec![None; n];
        let mut head = None;
        for (i, t) in old_first.iter().enumerate() {
            let parent = (i > 0).then(|| h.parents[i] as usize % i);
            parent_of[i] = parent;
            let (v, idx) = info(&m, ids[i], parent.map(|p| ids[p]), *t);
            let streams = if h.suspended[i] { memory(*t) } else { Vec::new() };
            c.commit_version(&v, &idx, &streams, head).unwrap();
            head = Some(ids[i]);
        }
        if let Some(b) = h.head_back {
            let to = ids[b as usize % n];
            c.set_head(&m, to, head).unwrap();
            head = Some(to);
        }
        let mut bases = HashSet::new();
        for (k, b) in h.sessions.iter().enumerate() {
            let base = ids[*b as usize % n];
            bases.insert(base);
            let lease = Lease {
                machine: m.to_string(),
                session: format!("s{k}"),
                station: format!("st{k}"),
                station_name: format!("host:st{k}"),
                pid: 1,
                base: Some(base),
                started_ms: 0,
                heartbeat_ms: 0,
            };
            // Each session displaces the one before it, whose base stays protected.
            c.acquire_lease(&lease, |_| true).unwrap();
        }
        let has_child: HashSet<usize> = parent_of.iter().flatten().copied().collect();
        // The model's view: newest first.
        let newest_first: Vec<i64> = old_first.iter().rev().copied().collect();
        let mut want: BTreeSet<VersionId> =
            model(&newest_first, &p).into_iter().map(|i| ids[n - 1 - i]).collect();
        want.extend(head);
        want.extend(bases.iter().copied());
        for (i, id) in ids.iter().enumerate() {
            if h.suspended[i] && !has_child.contains(&i) {
                want.insert(*id);
            }
        }
        if p.is_empty() {
            prop_assert!(matches!(c.forget(&m, &p, false), Err(CatalogError::EmptyPolicy(_))));
            return Ok(());
        }
        let dry = c.forget(&m, &p, true).unwrap();
        prop_assert_eq!(c.versions(&m).unwrap().len(), n, "a dry run removes nothing");
        let done = c.forget(&m, &p, false).unwrap();
        prop_assert_eq!(&dry.removed, &done.removed);
        let left: BTreeSet<VersionId> = c.versions(&m).unwrap().iter().map(|v| v.id).collect();
        prop_assert_eq!(&left, &want, "policy {}", p);
        prop_assert!(head.is_some_and(|h| left.contains(&h)));
        prop_assert_eq!(c.machine(&m).unwrap().unwrap().head, head, "the head never moves");
        prop_assert_eq!(done.removed.len(), n - left.len());
    }
}

#[test]
fn forget_of_a_machine_that_does_not_exist_says_so() {
    let d = tempfile::tempdir().unwrap();
    let mut c = Catalog::open(&d.path().join("catalog.db"), true, false).unwrap();
    let m: MachineName = "alice/none".parse().unwrap();
    let p = Policy {
        keep_last: 1,
        ..Default::default()
    };
    assert!(matches!(
        c.forget(&m, &p, false),
        Err(CatalogError::MachineNotFound(_))
    ));
}
