//! Table tests (one case per rule and boundary) and properties of [`evaluate`].

use super::*;
use proptest::prelude::*;

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn facts(times: &[&str]) -> Vec<PointFacts> {
    times.iter().map(|t| PointFacts::at(ts(t))).collect()
}

/// Which of `points` (by index) `retention` keeps.
fn kept(retention: &Retention, points: &[PointFacts], now: &str) -> Vec<usize> {
    let verdicts = evaluate(retention, points, ts(now)).unwrap();
    verdicts.iter().enumerate().filter(|(_, v)| v.keep()).map(|(i, _)| i).collect()
}

const NOW: &str = "2030-01-01T00:00:00Z";

struct Case {
    name: &'static str,
    retention: Retention,
    points: Vec<PointFacts>,
    kept: Vec<usize>,
}

fn tz(name: &str) -> Option<String> {
    Some(name.into())
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "keep-last keeps the N newest, whatever the input order",
            retention: Retention { keep_last: Some(2), ..Default::default() },
            points: facts(&[
                "2026-01-03T00:00:00Z",
                "2026-01-01T00:00:00Z",
                "2026-01-02T00:00:00Z",
            ]),
            kept: vec![0, 2],
        },
        Case {
            name: "keep-last larger than the point count keeps all",
            retention: Retention { keep_last: Some(10), ..Default::default() },
            points: facts(&["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]),
            kept: vec![0, 1],
        },
        Case {
            name: "keep-hourly keeps the newest point of each of the N newest hours",
            retention: Retention { keep_hourly: Some(2), ..Default::default() },
            points: facts(&[
                "2026-05-01T10:10:00Z",
                "2026-05-01T10:50:00Z",
                "2026-05-01T11:05:00Z",
                "2026-05-01T11:59:59Z",
                "2026-05-01T12:00:00Z",
            ]),
            kept: vec![3, 4],
        },
        Case {
            name: "the hour repeated when clocks go back counts as two hours",
            // Europe/Amsterdam, 2026-10-25: 02:30 CEST (+02) is 00:30Z, 02:30 CET (+01) 01:30Z.
            retention: Retention {
                keep_hourly: Some(2),
                time_zone: tz("Europe/Amsterdam"),
                ..Default::default()
            },
            points: facts(&[
                "2026-10-25T00:30:00Z",
                "2026-10-25T01:30:00Z",
                "2026-10-24T23:30:00Z",
            ]),
            kept: vec![0, 1],
        },
        Case {
            name: "keep-daily takes the newest of each day, and empty days do not count",
            retention: Retention { keep_daily: Some(3), ..Default::default() },
            points: facts(&[
                "2026-05-01T01:00:00Z",
                "2026-05-01T23:00:00Z",
                "2026-05-02T12:00:00Z",
                "2026-05-09T12:00:00Z",
                "2026-04-01T12:00:00Z",
            ]),
            kept: vec![1, 2, 3],
        },
        Case {
            name: "days are local days: two points one hour apart across local midnight",
            // 22:30Z on the 28th is 23:30 CET; 23:30Z is 00:30 CET on the 29th (the 23-hour day).
            retention: Retention {
                keep_daily: Some(2),
                time_zone: tz("Europe/Amsterdam"),
                ..Default::default()
            },
            points: facts(&["2026-03-28T22:30:00Z", "2026-03-28T23:30:00Z"]),
            kept: vec![0, 1],
        },
        Case {
            name: "the same two points are one day in UTC",
            retention: Retention { keep_daily: Some(2), ..Default::default() },
            points: facts(&["2026-03-28T22:30:00Z", "2026-03-28T23:30:00Z"]),
            kept: vec![1],
        },
        Case {
            name: "keep-weekly uses ISO weeks: Thursday 31 December and Sunday 3 January are one week",
            retention: Retention { keep_weekly: Some(2), ..Default::default() },
            points: facts(&[
                "2026-12-31T12:00:00Z",
                "2027-01-03T12:00:00Z",
                "2026-12-27T12:00:00Z",
            ]),
            kept: vec![1, 2],
        },
        Case {
            name: "a Monday starts a new ISO week",
            retention: Retention { keep_weekly: Some(2), ..Default::default() },
            points: facts(&[
                "2027-01-03T23:59:59Z",
                "2027-01-04T00:00:00Z",
                "2026-12-28T00:00:00Z",
            ]),
            kept: vec![0, 1],
        },
        Case {
            name: "keep-monthly in New York: 1 March 03:00Z is still 29 February (leap year)",
            retention: Retention {
                keep_monthly: Some(2),
                time_zone: tz("America/New_York"),
                ..Default::default()
            },
            points: facts(&[
                "2028-02-29T23:30:00Z",
                "2028-03-01T03:00:00Z",
                "2028-01-15T12:00:00Z",
            ]),
            kept: vec![1, 2],
        },
        Case {
            name: "keep-monthly counts months that have points",
            retention: Retention { keep_monthly: Some(3), ..Default::default() },
            points: facts(&[
                "2026-01-31T12:00:00Z",
                "2026-03-01T12:00:00Z",
                "2026-03-31T12:00:00Z",
                "2026-07-15T12:00:00Z",
                "2025-12-31T12:00:00Z",
            ]),
            kept: vec![0, 2, 3],
        },
        Case {
            name: "keep-yearly in Tokyo: 31 December 23:30Z is already next year",
            retention: Retention {
                keep_yearly: Some(2),
                time_zone: tz("Asia/Tokyo"),
                ..Default::default()
            },
            points: facts(&[
                "2026-12-31T14:30:00Z",
                "2026-12-31T23:30:00Z",
                "2026-06-01T00:00:00Z",
            ]),
            kept: vec![0, 1],
        },
        Case {
            name: "keep-within keeps the boundary itself and nothing a second older",
            retention: Retention {
                keep_within: Some("14d".parse().unwrap()),
                ..Default::default()
            },
            points: facts(&[
                "2026-05-15T00:00:00Z",
                "2026-05-01T00:00:00Z",
                "2026-04-30T23:59:59Z",
            ]),
            kept: vec![0, 1],
        },
        Case {
            name: "keep-within counts back from the newest point, not from now",
            retention: Retention { keep_within: Some("1d".parse().unwrap()), ..Default::default() },
            points: facts(&[
                "2020-01-02T00:00:00Z",
                "2020-01-01T00:00:00Z",
                "2019-12-31T00:00:00Z",
            ]),
            kept: vec![0, 1],
        },
        Case {
            name: "keep-within 1mo from 31 March reaches 28 February",
            retention: Retention {
                keep_within: Some("1mo".parse().unwrap()),
                ..Default::default()
            },
            points: facts(&[
                "2026-03-31T00:00:00Z",
                "2026-02-28T00:00:00Z",
                "2026-02-27T23:59:59Z",
            ]),
            kept: vec![0, 1],
        },
        Case {
            name: "keep-within 1d across spring-forward is 23 hours",
            retention: Retention {
                keep_within: Some("1d".parse().unwrap()),
                time_zone: tz("Europe/Amsterdam"),
                ..Default::default()
            },
            // Newest: 29 March 12:00 CEST (10:00Z); one local day before: 28 March 12:00 CET (11:00Z).
            points: facts(&[
                "2026-03-29T10:00:00Z",
                "2026-03-28T11:00:00Z",
                "2026-03-28T10:59:59Z",
            ]),
            kept: vec![0, 1],
        },
        Case {
            name: "retain-until later than now keeps a point the rules expire; earlier or equal does not",
            retention: Retention { keep_last: Some(1), ..Default::default() },
            points: vec![
                PointFacts::at(ts("2029-12-31T00:00:00Z")),
                PointFacts {
                    retain_until: Some(ts("2030-01-01T00:00:01Z")),
                    ..PointFacts::at(ts("2029-01-01T00:00:00Z"))
                },
                PointFacts {
                    retain_until: Some(ts(NOW)),
                    ..PointFacts::at(ts("2028-01-01T00:00:00Z"))
                },
            ],
            kept: vec![0, 1],
        },
        Case {
            name: "a lock later than now keeps a point; an expired one does not",
            retention: Retention { keep_last: Some(1), ..Default::default() },
            points: vec![
                PointFacts::at(ts("2029-12-31T00:00:00Z")),
                PointFacts {
                    locked_until: Some(ts("2031-01-01T00:00:00Z")),
                    ..PointFacts::at(ts("2029-01-01T00:00:00Z"))
                },
                PointFacts {
                    locked_until: Some(ts("2029-06-01T00:00:00Z")),
                    ..PointFacts::at(ts("2028-01-01T00:00:00Z"))
                },
            ],
            kept: vec![0, 1],
        },
        Case {
            name: "the newest verified point is kept whatever the rules say, older verified ones are not",
            retention: Retention { keep_last: Some(1), ..Default::default() },
            points: vec![
                PointFacts::at(ts("2029-12-31T00:00:00Z")),
                PointFacts { verified: true, ..PointFacts::at(ts("2029-06-01T00:00:00Z")) },
                PointFacts { verified: true, ..PointFacts::at(ts("2029-01-01T00:00:00Z")) },
            ],
            kept: vec![0, 1],
        },
        Case {
            name: "the newest point a drill restored is kept whatever the rules say, older ones are not",
            retention: Retention { keep_last: Some(1), ..Default::default() },
            points: vec![
                PointFacts::at(ts("2029-12-31T00:00:00Z")),
                PointFacts::at(ts("2029-09-01T00:00:00Z")),
                PointFacts { restores: true, ..PointFacts::at(ts("2029-06-01T00:00:00Z")) },
                PointFacts { restores: true, ..PointFacts::at(ts("2029-01-01T00:00:00Z")) },
            ],
            kept: vec![0, 2],
        },
    ]
}

#[test]
fn table() {
    for case in cases() {
        assert_eq!(kept(&case.retention, &case.points, NOW), case.kept, "{}", case.name);
    }
}

#[test]
fn reasons_say_which_rule_kept_a_point() {
    let retention = Retention {
        keep_last: Some(1),
        keep_daily: Some(2),
        time_zone: tz("Europe/Amsterdam"),
        ..Default::default()
    };
    let points = facts(&["2026-03-29T10:00:00Z", "2026-03-28T10:00:00Z"]);
    let v = evaluate(&retention, &points, ts(NOW)).unwrap();
    let said: Vec<Vec<String>> =
        v.iter().map(|v| v.reasons.iter().map(ToString::to_string).collect()).collect();
    assert_eq!(said[0], ["keep-last (newest #1)", "keep-daily (day 2026-03-29)"]);
    assert_eq!(said[1], ["keep-daily (day 2026-03-28)"]);
}

#[test]
fn bad_policies_are_refused() {
    let none = Retention::default();
    assert_eq!(evaluate(&none, &[], ts(NOW)), Err(Error::NoRules));
    let zero = Retention { keep_last: Some(0), keep_daily: Some(0), ..Default::default() };
    assert_eq!(zero.check().unwrap_err(), Error::NoRules);
    let zone =
        Retention { keep_last: Some(1), time_zone: tz("Mars/Olympus"), ..Default::default() };
    assert!(matches!(zone.check(), Err(Error::UnknownTimeZone { .. })));
    assert!(matches!("-3d".parse::<KeepWithin>(), Err(Error::BadDuration { .. })));
    assert!(matches!("fortnight".parse::<KeepWithin>(), Err(Error::BadDuration { .. })));
}

#[test]
fn policy_files_use_the_flag_names() {
    let r: Retention = toml::from_str(
        "keep-last = 3\nkeep-daily = 7\nkeep-within = \"14d\"\ntime-zone = \"Europe/Amsterdam\"\n",
    )
    .unwrap();
    assert_eq!(r.keep_last, Some(3));
    assert_eq!(r.keep_daily, Some(7));
    assert_eq!(r.keep_within, Some("14d".parse().unwrap()));
    let back: Retention = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
    let e = toml::from_str::<Retention>("keep-dayly = 7\n").unwrap_err().to_string();
    assert!(e.contains("keep-dayly"), "{e}");
    let e = toml::from_str::<Retention>("keep-within = \"soon\"\n").unwrap_err().to_string();
    assert!(e.contains("soon"), "{e}");
}

fn any_retention() -> impl Strategy<Value = Retention> {
    let count = proptest::option::of(0u32..6);
    let zone = proptest::sample::select(vec![
        None,
        tz("Europe/Amsterdam"),
        tz("America/New_York"),
        tz("Australia/Lord_Howe"),
    ]);
    let within = proptest::option::of((0i64..400).prop_map(|h| KeepWithin(Span::new().hours(h))));
    (count.clone(), count.clone(), count.clone(), count.clone(), count.clone(), count, within, zone)
        .prop_map(|(l, h, d, w, m, y, within, time_zone)| Retention {
            keep_last: l,
            keep_hourly: h,
            keep_daily: d,
            keep_weekly: w,
            keep_monthly: m,
            keep_yearly: y,
            keep_within: within,
            time_zone,
        })
        .prop_filter("at least one rule", |r| !r.is_empty())
}

fn any_points() -> impl Strategy<Value = Vec<PointFacts>> {
    // Three years from 2026, on the hour scale that makes buckets collide often.
    let one = (0i64..3 * 365 * 24 * 4, any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>())
        .prop_map(|(q, retain, lock, verified, restores)| {
            let time = Timestamp::from_second(1_767_225_600 + q * 900).unwrap();
            let later = Timestamp::from_second(1_767_225_600 + 3 * 365 * 86_400 + q).unwrap();
            PointFacts {
                time,
                retain_until: retain.then_some(later),
                locked_until: lock.then_some(later),
                verified,
                restores,
            }
        });
    proptest::collection::vec(one, 0..60)
}

/// The retention with only one of `r`'s rules.
fn single_rules(r: &Retention) -> Vec<Retention> {
    let base = Retention { time_zone: r.time_zone.clone(), ..Default::default() };
    let mut out = vec![];
    let mut push = |set: &dyn Fn(&mut Retention)| {
        let mut one = base.clone();
        set(&mut one);
        if !one.is_empty() {
            out.push(one);
        }
    };
    push(&|x| x.keep_last = r.keep_last);
    push(&|x| x.keep_hourly = r.keep_hourly);
    push(&|x| x.keep_daily = r.keep_daily);
    push(&|x| x.keep_weekly = r.keep_weekly);
    push(&|x| x.keep_monthly = r.keep_monthly);
    push(&|x| x.keep_yearly = r.keep_yearly);
    push(&|x| x.keep_within = r.keep_within);
    out
}

proptest! {
    #[test]
    fn a_point_is_kept_iff_some_rule_keeps_it(r in any_retention(), points in any_points(), now_h in 0i64..40_000) {
        let now = Timestamp::from_second(1_767_225_600 + now_h * 3600).unwrap();
        let all = evaluate(&r, &points, now).unwrap();
        let bare: Vec<PointFacts> = points.iter().map(|p| PointFacts::at(p.time)).collect();
        let singles: Vec<Vec<Verdict>> =
            single_rules(&r).iter().map(|one| evaluate(one, &bare, now).unwrap()).collect();
        let newest_verified = points
            .iter()
            .enumerate()
            .filter(|(_, p)| p.verified)
            .max_by(|(i, a), (j, b)| a.time.cmp(&b.time).then(j.cmp(i)))
            .map(|(i, _)| i);
        let newest_restored = points
            .iter()
            .enumerate()
            .filter(|(_, p)| p.restores)
            .max_by(|(i, a), (j, b)| a.time.cmp(&b.time).then(j.cmp(i)))
            .map(|(i, _)| i);
        for (i, p) in points.iter().enumerate() {
            let by_rule = singles.iter().any(|v| v[i].keep());
            let by_point = p.retain_until.is_some_and(|u| u > now)
                || p.locked_until.is_some_and(|u| u > now)
                || newest_verified == Some(i)
                || newest_restored == Some(i);
            prop_assert_eq!(all[i].keep(), by_rule || by_point, "point {}", i);
        }
    }

    #[test]
    fn a_calendar_rule_keeps_the_newest_of_its_newest_periods(
        r in any_retention(), points in any_points(), which in 0usize..5,
    ) {
        let (n, period) = match which {
            0 => (r.keep_hourly, Period::Hour),
            1 => (r.keep_daily, Period::Day),
            2 => (r.keep_weekly, Period::Week),
            3 => (r.keep_monthly, Period::Month),
            _ => (r.keep_yearly, Period::Year),
        };
        let Some(n) = n.filter(|n| *n > 0) else { return Ok(()) };
        let tz = time_zone(r.time_zone.as_deref()).unwrap();
        let mut one = Retention { time_zone: r.time_zone.clone(), ..Default::default() };
        match which {
            0 => one.keep_hourly = Some(n),
            1 => one.keep_daily = Some(n),
            2 => one.keep_weekly = Some(n),
            3 => one.keep_monthly = Some(n),
            _ => one.keep_yearly = Some(n),
        }
        let bare: Vec<PointFacts> = points.iter().map(|p| PointFacts::at(p.time)).collect();
        let verdicts = evaluate(&one, &bare, Timestamp::MAX).unwrap();
        let label = |p: &PointFacts| period.label(&p.time.to_zoned(tz.clone()));
        let mut periods: Vec<(Timestamp, String)> = bare.iter().map(|p| (p.time, label(p))).collect();
        periods.sort();
        let mut distinct: Vec<String> = vec![];
        for (_, l) in periods.iter().rev() {
            if !distinct.contains(l) {
                distinct.push(l.clone());
            }
        }
        let kept: Vec<&PointFacts> = bare.iter().zip(&verdicts).filter(|(_, v)| v.keep()).map(|(p, _)| p).collect();
        prop_assert_eq!(kept.len(), distinct.len().min(n as usize));
        for p in &kept {
            let l = label(p);
            prop_assert!(distinct.iter().take(n as usize).any(|d| *d == l));
            prop_assert!(bare.iter().all(|q| label(q) != l || q.time <= p.time));
        }
    }
}
