//! Table tests of schedules (one case per rule, DST edge and error) and properties.

use super::*;
use proptest::prelude::*;

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn spec(toml_text: &str) -> ScheduleSpec {
    toml::from_str(toml_text).unwrap()
}

struct Case {
    name: &'static str,
    spec: &'static str,
    from: &'static str,
    to: &'static str,
    /// The runs in (from, to], as UTC instants.
    runs: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "daily at two times, in UTC",
            spec: "kind = \"daily\"\ntimes = [\"14:00\", \"02:00\"]",
            from: "2026-06-01T00:00:00Z",
            to: "2026-06-02T23:59:59Z",
            runs: &[
                "2026-06-01T02:00:00Z",
                "2026-06-01T14:00:00Z",
                "2026-06-02T02:00:00Z",
                "2026-06-02T14:00:00Z",
            ],
        },
        Case {
            name: "the bound is exclusive before, inclusive after",
            spec: "kind = \"daily\"\ntimes = [\"02:00\"]",
            from: "2026-06-01T02:00:00Z",
            to: "2026-06-02T02:00:00Z",
            runs: &["2026-06-02T02:00:00Z"],
        },
        Case {
            name: "daily in a time zone: local wall-clock time, summer and winter",
            spec: "kind = \"daily\"\ntimes = [\"02:30\"]\ntime-zone = \"Europe/Amsterdam\"",
            from: "2026-03-27T00:00:00Z",
            to: "2026-03-31T00:00:00Z",
            runs: &[
                "2026-03-27T01:30:00Z",
                "2026-03-28T01:30:00Z",
                // 29 March: 02:30 does not exist (02:00 -> 03:00): it runs at 03:30 CEST.
                "2026-03-29T01:30:00Z",
                "2026-03-30T00:30:00Z",
            ],
        },
        Case {
            name: "a time in the hour repeated in autumn runs once, the first time",
            spec: "kind = \"daily\"\ntimes = [\"02:30\"]\ntime-zone = \"Europe/Amsterdam\"",
            from: "2026-10-24T00:00:00Z",
            to: "2026-10-27T00:00:00Z",
            runs: &["2026-10-24T00:30:00Z", "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"],
        },
        Case {
            name: "two times that the spring gap maps to one instant run once",
            spec: "kind = \"daily\"\ntimes = [\"02:30\", \"03:30\"]\ntime-zone = \"Europe/Amsterdam\"",
            from: "2026-03-29T00:00:00Z",
            to: "2026-03-29T12:00:00Z",
            runs: &["2026-03-29T01:30:00Z"],
        },
        Case {
            name: "weekly on two days, New York, across the US spring change",
            spec: "kind = \"weekly\"\ndays = [\"mon\", \"Thursday\"]\ntimes = [\"22:00\"]\ntime-zone = \"America/New_York\"",
            from: "2026-03-01T00:00:00Z",
            to: "2026-03-13T03:00:00Z",
            runs: &[
                "2026-03-03T03:00:00Z",
                "2026-03-06T03:00:00Z",
                // 8 March: clocks go forward; Monday 9 March 22:00 is EDT (UTC-4).
                "2026-03-10T02:00:00Z",
                "2026-03-13T02:00:00Z",
            ],
        },
        Case {
            name: "hourly every 4 h in a 12 h window from 08:00",
            spec: "kind = \"hourly\"\nevery-hours = 4\nwindow-start = \"08:00\"\nwindow-hours = 12",
            from: "2026-06-01T00:00:00Z",
            to: "2026-06-02T00:00:00Z",
            runs: &["2026-06-01T08:00:00Z", "2026-06-01T12:00:00Z", "2026-06-01T16:00:00Z"],
        },
        Case {
            name: "a window that crosses midnight",
            spec: "kind = \"hourly\"\nevery-hours = 6\nwindow-start = \"20:00\"\nwindow-hours = 12",
            from: "2026-06-01T00:00:00Z",
            to: "2026-06-02T12:00:00Z",
            runs: &["2026-06-01T02:00:00Z", "2026-06-01T20:00:00Z", "2026-06-02T02:00:00Z"],
        },
        Case {
            name: "every 24 h: once a day at the window's start",
            spec: "kind = \"hourly\"\nevery-hours = 24\nwindow-start = \"23:00\"",
            from: "2026-06-01T00:00:00Z",
            to: "2026-06-03T00:00:00Z",
            runs: &["2026-06-01T23:00:00Z", "2026-06-02T23:00:00Z"],
        },
        Case {
            name: "hourly on the wall clock across the autumn change: no run doubled",
            spec: "kind = \"hourly\"\nevery-hours = 4\ntime-zone = \"Europe/Amsterdam\"",
            from: "2026-10-24T22:00:00Z",
            to: "2026-10-25T23:00:00Z",
            // 00:00 CEST (22:00Z) is `from`, excluded; 04:00 is CET by then.
            runs: &[
                "2026-10-25T03:00:00Z",
                "2026-10-25T07:00:00Z",
                "2026-10-25T11:00:00Z",
                "2026-10-25T15:00:00Z",
                "2026-10-25T19:00:00Z",
                "2026-10-25T23:00:00Z",
            ],
        },
    ]
}

#[test]
fn every_case_runs_when_it_says() {
    for case in cases() {
        let schedule = spec(case.spec).check().unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let runs = schedule.between(ts(case.from), ts(case.to));
        let want: Vec<Timestamp> = case.runs.iter().map(|r| ts(r)).collect();
        assert_eq!(runs, want, "{}", case.name);
    }
}

#[test]
fn every_bad_field_is_named() {
    let cases = [
        ("kind = \"monthly\"\ntimes = [\"02:00\"]", "schedule.kind"),
        ("kind = \"daily\"", "schedule.times"),
        ("kind = \"daily\"\ntimes = [\"2:00\"]", "schedule.times[0]"),
        ("kind = \"daily\"\ntimes = [\"02:00\", \"24:00\"]", "schedule.times[1]"),
        ("kind = \"daily\"\ntimes = [\"02:00\"]\ndays = [\"mon\"]", "schedule.days"),
        ("kind = \"daily\"\ntimes = [\"02:00\"]\nevery-hours = 4", "schedule.every-hours"),
        ("kind = \"weekly\"\ntimes = [\"02:00\"]", "schedule.days"),
        ("kind = \"weekly\"\ntimes = [\"02:00\"]\ndays = [\"funday\"]", "schedule.days[0]"),
        ("kind = \"hourly\"", "schedule.every-hours"),
        ("kind = \"hourly\"\nevery-hours = 5", "schedule.every-hours"),
        ("kind = \"hourly\"\nevery-hours = 4\nwindow-hours = 25", "schedule.window-hours"),
        ("kind = \"hourly\"\nevery-hours = 4\nwindow-start = \"8\"", "schedule.window-start"),
        ("kind = \"hourly\"\nevery-hours = 4\ntimes = [\"02:00\"]", "schedule.times"),
        (
            "kind = \"daily\"\ntimes = [\"02:00\"]\ntime-zone = \"Mars/Olympus\"",
            "schedule.time-zone",
        ),
        ("kind = \"daily\"\ntimes = [\"02:00\"]\njitter-minutes = 181", "schedule.jitter-minutes"),
        (
            "kind = \"daily\"\ntimes = [\"02:00\", \"02:30\"]\njitter-minutes = 30",
            "schedule.jitter-minutes",
        ),
        ("kind = \"hourly\"\nevery-hours = 4\njitter-minutes = 240", "schedule.jitter-minutes"),
    ];
    for (text, field_name) in cases {
        match spec(text).check() {
            Err(Error::Field { field, message }) => {
                assert_eq!(field, field_name, "{text}: {message}");
                assert!(!message.is_empty());
            }
            other => panic!("{text}: {other:?}"),
        }
    }
    assert!(toml::from_str::<ScheduleSpec>("kind = \"daily\"\ntime = [\"02:00\"]").is_err());
}

#[test]
fn jitter_is_stable_per_vm_and_spreads_ten_thousand_vms() {
    let s = spec("kind = \"daily\"\ntimes = [\"02:00\"]\njitter-minutes = 60").check().unwrap();
    let at = ts("2026-06-01T02:00:00Z");
    assert_eq!(s.start_for(at, "vm-7"), s.start_for(at, "vm-7"));
    let offset = s.offset_for("vm-7");
    let tomorrow = ts("2026-06-02T02:00:00Z");
    assert_eq!(s.start_for(tomorrow, "vm-7").duration_since(tomorrow), offset);
    // 10,000 VMs over 3,600 seconds: about 2.8 a second; no second gets more than a few
    // times that, and every minute of the hour gets some.
    let mut per_second = vec![0u32; 3600];
    for i in 0..10_000 {
        let offset = s.offset_for(&format!("vm-{i}"));
        assert!(offset >= SignedDuration::ZERO && offset < SignedDuration::from_mins(60));
        per_second[offset.as_secs() as usize] += 1;
    }
    assert!(*per_second.iter().max().unwrap() <= 14, "{:?}", per_second.iter().max());
    for minute in per_second.chunks(60) {
        assert!(minute.iter().sum::<u32>() > 100);
    }
    let none = spec("kind = \"daily\"\ntimes = [\"02:00\"]").check().unwrap();
    assert_eq!(none.start_for(at, "vm-7"), at);
}

proptest! {
    #[test]
    fn runs_are_increasing_and_each_is_the_next_of_the_one_before(
        every in proptest::sample::select(HOURLY_INTERVALS.to_vec()),
        start_hour in 0i8..24,
        hours in 1i64..=24,
        zone in proptest::sample::select(vec!["UTC", "Europe/Amsterdam", "America/New_York", "Australia/Lord_Howe"]),
        from in 1_700_000_000i64..1_900_000_000,
    ) {
        let text = format!(
            "kind = \"hourly\"\nevery-hours = {every}\nwindow-start = \"{start_hour:02}:00\"\nwindow-hours = {hours}\ntime-zone = \"{zone}\""
        );
        let s = spec(&text).check().unwrap();
        let from = Timestamp::from_second(from).unwrap();
        let runs = s.between(from, from + SignedDuration::from_hours(24 * 9));
        prop_assert!(runs.len() >= 8, "at least one run a day: {}", runs.len());
        prop_assert!(runs.windows(2).all(|w| w[0] < w[1]));
        prop_assert!(runs.first().is_some_and(|r| *r > from));
        for w in runs.windows(2) {
            prop_assert_eq!(s.next_after(w[0]), Some(w[1]));
        }
    }

    #[test]
    fn any_spec_text_checks_or_names_a_schedule_field(text in "[a-z\\-]{1,12} = \"[a-z0-9:]{0,6}\"") {
        if let Ok(spec) = toml::from_str::<ScheduleSpec>(&text) {
            match spec.check() {
                Ok(_) => {}
                Err(Error::Field { field, .. }) => prop_assert!(field.starts_with("schedule.")),
                Err(other) => prop_assert!(false, "{other}"),
            }
        }
    }
}
