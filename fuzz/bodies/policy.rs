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
