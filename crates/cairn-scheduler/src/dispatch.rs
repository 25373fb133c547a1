//! Dispatch: queued jobs whose start time has come start where admission finds room on their
//! host, datastore and vault; the others wait, with the reason recorded on the job, so that a
//! late start is always explained (`jobs` shows it).

use cairn_policy::{Decision, Due, Limits, admit};
use jiff::Timestamp;

use crate::{Catalogue, Error};

/// What a dispatch pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dispatched {
    /// Jobs started (now `running`), by id.
    pub started: Vec<u64>,
    /// Jobs whose time has come that wait, with why.
    pub waiting: Vec<(u64, String)>,
}

/// Starts what may start by `now` within `limits`.
pub fn dispatch(
    catalogue: &mut Catalogue,
    limits: &Limits,
    now: Timestamp,
) -> Result<Dispatched, Error> {
    let running = catalogue.running_placements()?;
    let due: Vec<Due> = catalogue
        .due_jobs(now)?
        .into_iter()
        .map(|(id, at, placement)| Due { id, at, placement })
        .collect();
    let mut out = Dispatched::default();
    for (id, decision) in admit(limits, &running, &due, now) {
        match decision {
            Decision::Start => out.started.push(id),
            Decision::Wait(why) => out.waiting.push((id, why)),
        }
    }
    catalogue.record_dispatch(&out.started, &out.waiting, now)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JobState, VmRecord, plan};

    const DAILY: &str = "name = \"daily\"\n[schedule]\nkind = \"daily\"\ntimes = [\"02:00\"]\njitter-minutes = 60\n[retention]\nkeep-daily = 7\n";

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn vm(name: &str, host: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            host: host.into(),
            datastore: format!("ds-{host}"),
            vault: "v".into(),
            policy: Some("daily".into()),
            protected: true,
            planned_until: at("2026-01-01T00:00:00Z"),
        }
    }

    #[test]
    fn a_full_host_makes_jobs_wait_with_the_reason_until_one_ends() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Catalogue::open(&dir.path().join("c.db")).unwrap();
        c.put_policy(DAILY, at("2026-06-01T00:00:00Z")).unwrap();
        for i in 0..3 {
            c.protect(&vm(&format!("vm-{i}"), "kvm-1"), at("2026-06-01T00:00:00Z")).unwrap();
        }
        plan(&mut c, at("2026-06-01T02:00:00Z")).unwrap();
        let limits = Limits { per_host: 2, per_datastore: 8, per_vault: 8 };
        // After every VM's jittered start (within the hour).
        let d = dispatch(&mut c, &limits, at("2026-06-01T03:00:00Z")).unwrap();
        assert_eq!(d.started.len(), 2, "{d:?}");
        assert_eq!(d.waiting.len(), 1);
        assert!(d.waiting[0].1.contains("host kvm-1 runs 2 backup(s)"), "{d:?}");
        let waiting = c.jobs(None).unwrap().into_iter().find(|j| j.id == d.waiting[0].0).unwrap();
        assert_eq!(waiting.state, JobState::Queued);
        assert!(waiting.reason.unwrap().contains("kvm-1"));
        // Nothing more starts while both run; once one ends, the third does.
        let again = dispatch(&mut c, &limits, at("2026-06-01T03:00:01Z")).unwrap();
        assert!(again.started.is_empty());
        c.finish_job(d.started[0], JobState::Done, None, at("2026-06-01T03:10:00Z")).unwrap();
        let last = dispatch(&mut c, &limits, at("2026-06-01T03:10:01Z")).unwrap();
        assert_eq!(last.started, vec![d.waiting[0].0]);
    }

    #[test]
    fn ten_thousand_vms_on_one_schedule_each_start_once_at_their_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Catalogue::open(&dir.path().join("c.db")).unwrap();
        c.put_policy(DAILY, at("2026-06-01T00:00:00Z")).unwrap();
        for i in 0..10_000 {
            c.protect(
                &vm(&format!("vm-{i}"), &format!("kvm-{}", i % 500)),
                at("2026-06-01T00:00:00Z"),
            )
            .unwrap();
        }
        let limits = Limits { per_host: 10, per_datastore: 10, per_vault: 100_000 };
        let mut started = 0;
        // One pass a minute over the jitter's hour (the service runs one a second): every job
        // starts in the first pass at or after its time, none waits, none starts twice.
        for minute in 0..=60 {
            let now = at("2026-06-01T02:00:00Z") + jiff::SignedDuration::from_mins(minute);
            plan(&mut c, now).unwrap();
            let d = dispatch(&mut c, &limits, now).unwrap();
            assert!(d.waiting.is_empty(), "minute {minute}: {:?}", d.waiting.first());
            started += d.started.len();
            // Each backup ends within the minute.
            for id in d.started {
                c.finish_job(id, JobState::Done, None, now).unwrap();
            }
        }
        assert_eq!(started, 10_000);
        let jobs = c.jobs(None).unwrap();
        assert_eq!(jobs.len(), 10_000, "one job per VM");
        assert!(jobs.iter().all(|j| j.state == JobState::Done));
    }
}
