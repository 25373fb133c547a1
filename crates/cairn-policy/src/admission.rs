//! Admission control: which due backups may start now without overloading a host, a datastore
//! or a vault, and why the others wait.
//!
//! Every backup reads its disks on one host, from one datastore (where the images live), and
//! writes to one vault; each of the three has a limit of backups at once. Due backups are
//! taken in order of their start time (then their id, so the answer never depends on input
//! order), and each starts if all three of its resources have room, counting those already
//! running and those started before it. A backup that waits gets the reason, naming the
//! resource that is full, so a late start is always explained.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// How many backups may run at once on each host, datastore and vault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Limits {
    /// Per host (its CPU and network).
    pub per_host: u32,
    /// Per datastore (the storage the disks are read from).
    pub per_datastore: u32,
    /// Per vault (the object store written to).
    pub per_vault: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { per_host: 2, per_datastore: 4, per_vault: 16 }
    }
}

/// Where a backup runs: the three resources it uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Placement {
    /// The host whose agent runs it.
    pub host: String,
    /// The datastore its disks are on.
    pub datastore: String,
    /// The vault it writes to.
    pub vault: String,
}

/// A backup that is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// The job's id.
    pub id: u64,
    /// When it should start (its jittered start).
    pub at: Timestamp,
    /// Where it runs.
    pub placement: Placement,
}

/// What admission decided for one due backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It starts now.
    Start,
    /// It waits; the reason names the full resource.
    Wait(String),
}

/// Decides, for every backup in `due` whose time has come by `now`, whether it starts now
/// (given `running`, the placements of backups already running) or waits, and why. Backups
/// not yet due are left out of the answer.
pub fn admit(
    limits: &Limits,
    running: &[Placement],
    due: &[Due],
    now: Timestamp,
) -> Vec<(u64, Decision)> {
    let mut hosts: BTreeMap<&str, u32> = BTreeMap::new();
    let mut datastores: BTreeMap<&str, u32> = BTreeMap::new();
    let mut vaults: BTreeMap<&str, u32> = BTreeMap::new();
    for p in running {
        *hosts.entry(&p.host).or_default() += 1;
        *datastores.entry(&p.datastore).or_default() += 1;
        *vaults.entry(&p.vault).or_default() += 1;
    }
    let mut order: Vec<&Due> = due.iter().filter(|d| d.at <= now).collect();
    order.sort_by_key(|d| (d.at, d.id));
    let mut decisions = Vec::with_capacity(order.len());
    for d in order {
        let p = &d.placement;
        let count = |m: &BTreeMap<&str, u32>, k: &str| m.get(k).copied().unwrap_or(0);
        let full = [
            ("host", &p.host, count(&hosts, &p.host), limits.per_host),
            ("datastore", &p.datastore, count(&datastores, &p.datastore), limits.per_datastore),
            ("vault", &p.vault, count(&vaults, &p.vault), limits.per_vault),
        ]
        .into_iter()
        .find(|(_, _, n, limit)| n >= limit);
        let decision = match full {
            Some((what, name, n, limit)) => Decision::Wait(format!(
                "{what} {name} runs {n} backup(s), its limit of {limit}: waiting for one to end"
            )),
            None => {
                *hosts.entry(&p.host).or_default() += 1;
                *datastores.entry(&p.datastore).or_default() += 1;
                *vaults.entry(&p.vault).or_default() += 1;
                Decision::Start
            }
        };
        decisions.push((d.id, decision));
    }
    decisions
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn place(h: &str, d: &str, v: &str) -> Placement {
        Placement { host: h.into(), datastore: d.into(), vault: v.into() }
    }

    fn due(id: u64, s: i64, p: Placement) -> Due {
        Due { id, at: at(s), placement: p }
    }

    fn starts(decisions: &[(u64, Decision)]) -> Vec<u64> {
        decisions.iter().filter(|(_, d)| *d == Decision::Start).map(|(id, _)| *id).collect()
    }

    #[test]
    fn each_limit_holds_and_names_itself() {
        let limits = Limits { per_host: 1, per_datastore: 2, per_vault: 3 };
        // (name, running, due, which start, the reason the others wait)
        type Case = (&'static str, Vec<Placement>, Vec<Due>, Vec<u64>, &'static str);
        let cases: Vec<Case> = vec![
            (
                "one host: the earliest starts, the other waits on the host",
                vec![],
                vec![due(2, 5, place("h1", "d1", "v")), due(1, 0, place("h1", "d2", "v"))],
                vec![1],
                "host h1 runs 1 backup(s), its limit of 1",
            ),
            (
                "one datastore shared by three hosts: two start",
                vec![],
                vec![
                    due(1, 0, place("h1", "d", "v")),
                    due(2, 0, place("h2", "d", "v")),
                    due(3, 0, place("h3", "d", "v")),
                ],
                vec![1, 2],
                "datastore d runs 2 backup(s)",
            ),
            (
                "the vault: running backups count",
                vec![place("a", "x", "v"), place("b", "y", "v")],
                vec![due(1, 0, place("h1", "d1", "v")), due(2, 0, place("h2", "d2", "v"))],
                vec![1],
                "vault v runs 3 backup(s)",
            ),
            (
                "not yet due: left out",
                vec![],
                vec![due(1, 0, place("h1", "d", "v")), due(2, 100, place("h2", "d", "v"))],
                vec![1],
                "",
            ),
        ];
        for (name, running, due, want, reason) in cases {
            let decisions = admit(&limits, &running, &due, at(10));
            assert_eq!(starts(&decisions), want, "{name}");
            if !reason.is_empty() {
                let waits: Vec<&String> = decisions
                    .iter()
                    .filter_map(|(_, d)| match d {
                        Decision::Wait(r) => Some(r),
                        Decision::Start => None,
                    })
                    .collect();
                assert!(waits.iter().all(|w| w.contains(reason)), "{name}: {waits:?}");
                assert!(!waits.is_empty(), "{name}");
            } else {
                assert_eq!(decisions.len(), 1, "{name}");
            }
        }
    }

    proptest! {
        #[test]
        fn no_resource_is_ever_over_its_limit_and_order_does_not_matter(
            jobs in proptest::collection::vec((0u8..4, 0u8..3, 0u8..2, 0i64..20), 0..40),
            running in proptest::collection::vec((0u8..4, 0u8..3, 0u8..2), 0..6),
            limits in (1u32..4, 1u32..5, 1u32..8),
        ) {
            let limits = Limits { per_host: limits.0, per_datastore: limits.1, per_vault: limits.2 };
            let p = |h: u8, d: u8, v: u8| place(&format!("h{h}"), &format!("d{d}"), &format!("v{v}"));
            let running: Vec<Placement> = running.iter().map(|&(h, d, v)| p(h, d, v)).collect();
            let due: Vec<Due> = jobs.iter().enumerate()
                .map(|(i, &(h, d, v, s))| due(i as u64, s, p(h, d, v))).collect();
            let decisions = admit(&limits, &running, &due, at(10));
            let mut reversed = due.clone();
            reversed.reverse();
            prop_assert_eq!(&decisions, &admit(&limits, &running, &reversed, at(10)));
            let started: Vec<&Placement> = starts(&decisions).iter()
                .map(|id| &due[*id as usize].placement).collect();
            // Wherever a backup started, its resources are within their limits.
            let field = |pl: &Placement, key: usize| [&pl.host, &pl.datastore, &pl.vault][key].clone();
            for key in 0..3 {
                let limit = [limits.per_host, limits.per_datastore, limits.per_vault][key];
                for s in &started {
                    let k = field(s, key);
                    let n = running.iter().chain(started.iter().copied())
                        .filter(|pl| field(pl, key) == k).count() as u32;
                    prop_assert!(n <= limit, "{}: {} > {}", k, n, limit);
                }
            }
        }
    }
}
