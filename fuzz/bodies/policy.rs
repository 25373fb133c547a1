//! Fuzz bodies for cairn-policy: retention policies read from hostile files.

/// A retention policy in TOML: parsing never panics, and a policy that checks evaluates over
/// a few points without panicking, keeping a subset of them.
pub fn retention(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(r) = toml::from_str::<cairn_policy::Retention>(text) else { return };
    if r.check().is_err() {
        return;
    }
    let points: Vec<cairn_policy::PointFacts> = (0..40)
        .map(|i| {
            cairn_policy::PointFacts::at(
                jiff::Timestamp::from_second(1_700_000_000 + i * 20_000).expect("in range"),
            )
        })
        .collect();
    let now = jiff::Timestamp::from_second(1_800_000_000).expect("in range");
    let verdicts = cairn_policy::evaluate(&r, &points, now).expect("a checked policy evaluates");
    assert_eq!(verdicts.len(), points.len());
}

/// A whole policy file in TOML (schedule, retention and the rest): parsing and checking never
/// panic, an error names a field, and a policy that checks yields increasing runs.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match cairn_policy::Policy::parse(text) {
        Ok(p) => {
            let from = jiff::Timestamp::from_second(1_700_000_000).expect("in range");
            let to = jiff::Timestamp::from_second(1_700_000_000 + 8 * 86_400).expect("in range");
            let runs = p.schedule.between(from, to);
            assert!(!runs.is_empty(), "a checked schedule runs within eight days");
            assert!(runs.windows(2).all(|w| w[0] < w[1]));
            let _ = p.schedule.start_for(runs[0], "vm");
        }
        Err(cairn_policy::Error::Field { field, .. }) => assert!(!field.is_empty()),
        Err(_) => {}
    }
}
