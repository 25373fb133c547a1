//! Planning: each protected VM's scheduled times become jobs, once each.
//!
//! A pass looks at the scheduled times between where the VM was last planned and now. The
//! latest becomes a queued job, starting at the VM's jittered time; earlier ones, which only a
//! coordinator that was down can leave behind, are not run late one after another but raise
//! one missed-schedule alert. A pass is one transaction per VM, and a job is unique per VM and
//! scheduled time, so passes may repeat and coordinators restart without doubling a backup.

use std::collections::HashMap;

use jiff::Timestamp;

use crate::catalogue::VmPlan;
use crate::{Catalogue, Error};

/// What a planning pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanOutcome {
    /// Jobs queued.
    pub jobs_added: usize,
    /// Scheduled times missed (alerted, not run).
    pub missed: usize,
}

/// Plans every protected VM whose next scheduled time has come, up to `now`, in one
/// transaction. Only those VMs are read (the catalogue keeps each VM's next time, indexed), so
/// a pass over ten thousand VMs of which a few are due costs a few.
pub fn plan(catalogue: &mut Catalogue, now: Timestamp) -> Result<PlanOutcome, Error> {
    let mut outcome = PlanOutcome::default();
    let mut policies: HashMap<String, cairn_policy::Policy> = HashMap::new();
    let mut plans = Vec::new();
    for vm in catalogue.due_vms(now)? {
        let Some(name) = &vm.policy else { continue };
        if !policies.contains_key(name) {
            policies.insert(name.clone(), catalogue.policy(name)?);
        }
        let Some(policy) = policies.get(name) else { continue };
        let runs = policy.schedule.between(vm.planned_until, now);
        let next_at = policy.schedule.next_after(now);
        let (job, missed) = match runs.split_last() {
            Some((latest, missed)) => {
                (Some((*latest, policy.schedule.start_for(*latest, &vm.name))), missed.to_vec())
            }
            None => (None, Vec::new()),
        };
        outcome.missed += missed.len();
        plans.push(VmPlan { vm: vm.name, policy: name.clone(), job, missed, until: now, next_at });
    }
    outcome.jobs_added = catalogue.record_plans(&plans, now)?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JobState, VmRecord};

    const DAILY: &str = r#"
name = "daily"
[schedule]
kind = "daily"
times = ["02:00"]
jitter-minutes = 30
[retention]
keep-daily = 7
"#;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn vm(name: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            host: "kvm-1".into(),
            datastore: "ds-1".into(),
            vault: "v".into(),
            policy: Some("daily".into()),
            protected: true,
            planned_until: at("2026-01-01T00:00:00Z"),
        }
    }

    fn open(dir: &tempfile::TempDir) -> Catalogue {
        Catalogue::open(&dir.path().join("catalogue.db")).unwrap()
    }

    #[test]
    fn each_scheduled_time_becomes_one_job_at_the_vms_jittered_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(&dir);
        c.put_policy(DAILY, at("2026-06-01T00:00:00Z")).unwrap();
        c.protect(&vm("web-1"), at("2026-06-01T12:00:00Z")).unwrap();
        assert_eq!(plan(&mut c, at("2026-06-02T01:59:59Z")).unwrap().jobs_added, 0);
        for now in ["2026-06-02T02:00:00Z", "2026-06-02T02:00:01Z", "2026-06-02T09:00:00Z"] {
            plan(&mut c, at(now)).unwrap();
        }
        let jobs = c.jobs(Some("web-1")).unwrap();
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        let job = &jobs[0];
        assert_eq!(job.scheduled_at, at("2026-06-02T02:00:00Z"));
        assert!(job.start_at >= job.scheduled_at);
        assert!(job.start_at < at("2026-06-02T02:30:00Z"));
        assert_eq!(job.state, JobState::Queued);
        // The next day's, with the same offset.
        plan(&mut c, at("2026-06-03T03:00:00Z")).unwrap();
        let jobs = c.jobs(Some("web-1")).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(
            jobs[1].start_at.duration_since(jobs[1].scheduled_at),
            jobs[0].start_at.duration_since(jobs[0].scheduled_at)
        );
        assert!(c.alerts().unwrap().is_empty());
    }

    #[test]
    fn a_coordinator_down_for_days_runs_the_latest_and_alerts_the_missed() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(&dir);
        c.put_policy(DAILY, at("2026-06-01T00:00:00Z")).unwrap();
        c.protect(&vm("db-1"), at("2026-06-01T12:00:00Z")).unwrap();
        drop(c);
        // Four days later, a new coordinator process on the same catalogue.
        let mut c = open(&dir);
        let outcome = plan(&mut c, at("2026-06-05T12:00:00Z")).unwrap();
        assert_eq!(outcome, PlanOutcome { jobs_added: 1, missed: 3 });
        let jobs = c.jobs(None).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].scheduled_at, at("2026-06-05T02:00:00Z"));
        let alerts = c.alerts().unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].0, "missed-schedule");
        assert!(alerts[0].2.contains("3 scheduled backup(s) of VM db-1"), "{alerts:?}");
    }

    #[test]
    fn protecting_with_an_unknown_policy_is_refused_and_unprotected_vms_are_not_planned() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(&dir);
        let err = c.protect(&vm("web-1"), at("2026-06-01T00:00:00Z")).unwrap_err();
        assert!(err.to_string().contains("no policy named \"daily\""), "{err}");
        c.put_policy(DAILY, at("2026-06-01T00:00:00Z")).unwrap();
        let mut stopped = vm("web-2");
        stopped.protected = false;
        c.protect(&stopped, at("2026-06-01T00:00:00Z")).unwrap();
        assert_eq!(plan(&mut c, at("2026-06-09T00:00:00Z")).unwrap(), PlanOutcome::default());
        assert!(c.put_policy("name = \"x\"", at("2026-06-01T00:00:00Z")).is_err());
    }

    #[test]
    fn one_coordinator_holds_the_catalogue_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(&dir);
        assert_eq!(c.schema_version().unwrap(), crate::catalogue::MIGRATIONS.len() as i64);
        let second = Catalogue::open(&dir.path().join("catalogue.db"));
        let err = second.err().expect("a second coordinator is refused").to_string();
        assert!(err.contains("held by another coordinator"), "{err}");
        drop(c);
        let c = open(&dir);
        c.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = Catalogue::open(&dir.path().join("catalogue.db")).err().unwrap().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }
}
