//! Prune: expire the points a retention policy no longer keeps, and purge the expired points
//! whose grace time has passed.
//!
//! Per VM: the points that are not soft-deleted go through [`cairn_policy::evaluate`] with
//! their notes (retain-until, lock, verified); each point no rule keeps is soft-deleted with
//! the grace time; then every soft-deleted point whose grace has passed, and that no lock
//! holds, is purged. A VM with a manifest that cannot be read is left alone (its points
//! cannot be counted); a point whose notes cannot be read is kept (its lock is unknown).
//! Freeing the chunks of purged points is the collector's job (`Vault::gc`).

use cairn_format::{Name, PointId, PointManifest};
use cairn_policy::{PointFacts, Retention};
use cairn_vault::Vault;
use jiff::{SignedDuration, Timestamp};

use crate::Error;

/// What to prune.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// The rules.
    pub retention: Retention,
    /// Only this VM (default: every VM of the vault, each on its own).
    pub vm: Option<Name>,
    /// How long an expired point stays soft-deleted before it is purged.
    pub grace: SignedDuration,
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// The time the policy is applied at (the clock, except in tests and simulations).
    pub now: Timestamp,
    /// Only these soft-deleted points may be purged (`None`: any past its grace). The
    /// coordinator purges only what it expired itself: a deletion note written by anyone
    /// else (a host with the vault's credentials) is reported, not trusted.
    pub purge_only: Option<std::collections::BTreeSet<PointId>>,
}

/// What prune decided for one point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Kept, with the rules that keep it.
    Keep(Vec<String>),
    /// No rule keeps it: soft-deleted now (or, in a dry run, would be).
    Expire,
    /// Soft-deleted earlier, in its grace time until then.
    InGrace(Timestamp),
    /// Soft-deleted and past its grace: purged now (or would be).
    Purge,
    /// Soft-deleted and past its grace, but locked until then.
    Locked(Timestamp),
    /// Its notes cannot be read: kept, state unknown.
    Unknown(String),
    /// Soft-deleted and past its grace, but not by whoever may purge here: kept.
    Unconfirmed,
}

/// One point's line in the report.
#[derive(Clone, Debug)]
pub struct PointDecision {
    /// The VM.
    pub vm: Name,
    /// The point.
    pub point: PointId,
    /// Its time (capture).
    pub time: Timestamp,
    /// What prune did.
    pub action: Action,
}

/// What prune did.
#[derive(Clone, Debug, Default)]
pub struct PruneReport {
    /// Every point considered, by VM then time.
    pub points: Vec<PointDecision>,
    /// VMs left alone, with why.
    pub skipped_vms: Vec<(Name, String)>,
}

impl PruneReport {
    /// The points with an action of this kind.
    pub fn count(&self, f: impl Fn(&Action) -> bool) -> usize {
        self.points.iter().filter(|p| f(&p.action)).count()
    }
}

/// Runs prune on `vault`; see the module docs.
pub async fn prune(vault: &Vault, options: &PruneOptions) -> Result<PruneReport, Error> {
    options.retention.check()?;
    if !options.dry_run {
        vault.check_may_delete("prune")?;
    }
    let listing = vault.list_points(options.vm.as_ref()).await?;
    let states = vault.point_states(options.vm.as_ref()).await?;
    let mut report = PruneReport::default();
    let mut by_vm: std::collections::BTreeMap<Name, Vec<PointManifest>> = Default::default();
    for m in listing.points {
        by_vm.entry(m.vm.clone()).or_default().push(m);
    }
    for u in &listing.unreadable {
        by_vm.remove(&u.vm);
        report.skipped_vms.push((
            u.vm.clone(),
            format!(
                "the manifest of point {} cannot be read ({}); verify the vault",
                u.point, u.error
            ),
        ));
    }
    for (vm, points) in by_vm {
        let mut live: Vec<(PointManifest, cairn_format::PointState)> = vec![];
        for m in points {
            let decision = |action| PointDecision {
                vm: vm.clone(),
                point: m.point.clone(),
                time: m.captured_at,
                action,
            };
            match states.get(&vm, &m.point) {
                Err(e) => report.points.push(decision(Action::Unknown(e.to_string()))),
                Ok(state) => match &state.deleted {
                    None => live.push((m, state)),
                    Some(d) if d.purge_after > options.now => {
                        report.points.push(decision(Action::InGrace(d.purge_after)))
                    }
                    Some(_)
                        if options.purge_only.as_ref().is_some_and(|p| !p.contains(&m.point)) =>
                    {
                        report.points.push(decision(Action::Unconfirmed))
                    }
                    Some(_) => {
                        report.points.push(decision(purge(vault, &m, &state, options).await?))
                    }
                },
            }
        }
        let facts: Vec<PointFacts> = live
            .iter()
            .map(|(m, s)| PointFacts {
                time: m.captured_at,
                retain_until: s.retain_until,
                locked_until: s.locked_until,
                verified: s.verified_clean(),
                restores: s.drill_passed(),
            })
            .collect();
        let verdicts = cairn_policy::evaluate(&options.retention, &facts, options.now)?;
        for ((m, state), verdict) in live.iter().zip(verdicts) {
            let action = if verdict.keep() {
                Action::Keep(verdict.reasons.iter().map(ToString::to_string).collect())
            } else {
                if !options.dry_run {
                    let reason = format!("prune: no retention rule keeps it at {}", options.now);
                    vault.soft_delete(&vm, &m.point, &reason, options.grace, options.now).await?;
                }
                match options.grace <= SignedDuration::ZERO {
                    true => purge(vault, m, state, options).await?,
                    false => Action::Expire,
                }
            };
            report.points.push(PointDecision {
                vm: vm.clone(),
                point: m.point.clone(),
                time: m.captured_at,
                action,
            });
        }
    }
    report.points.sort_by(|a, b| (&a.vm, a.time, &a.point).cmp(&(&b.vm, b.time, &b.point)));
    Ok(report)
}

/// Purges a point past its grace (or says it would, in a dry run), unless locked.
async fn purge(
    vault: &Vault,
    m: &PointManifest,
    state: &cairn_format::PointState,
    options: &PruneOptions,
) -> Result<Action, Error> {
    if let Some(until) = state.locked_until.filter(|_| state.is_locked(options.now)) {
        return Ok(Action::Locked(until));
    }
    if !options.dry_run {
        vault.purge(&m.vm, &m.point, options.now).await?;
    }
    Ok(Action::Purge)
}
