//! Sizes and rates for people: parsing `64K`, `4G`, printing `1.5 GiB`.

/// Parses a byte count: a number with an optional K, M, G or T suffix (powers of 1024,
/// optionally followed by `iB` or `B`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4096, 64K, 512M or 4G"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{s:?} is too large"))
}

/// `1536` -> `1.5 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// Bytes over seconds as `x.y GiB/s` or `MiB/s`.
pub fn rate(n: u64, secs: f64) -> String {
    if secs <= 0.0 {
        return "-".into();
    }
    format!("{}/s", bytes((n as f64 / secs) as u64))
}

/// Parses a duration: `14d`, `36h`, `90m`, `2w`, or ISO 8601 `P14D`. Days are 24 hours here
/// (a grace time, not a calendar rule); months and years are refused as ambiguous.
pub fn parse_duration(s: &str) -> Result<jiff::SignedDuration, String> {
    if s.trim() == "0" {
        return Ok(jiff::SignedDuration::ZERO);
    }
    let span: jiff::Span = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a duration like 14d, 36h or 2w: {e}"))?;
    let opts = jiff::SpanTotal::from(jiff::Unit::Second).days_are_24_hours();
    let secs = span
        .total(opts)
        .map_err(|_| format!("{s:?}: give weeks, days or hours, not months or years"))?;
    if secs < 0.0 {
        return Err(format!("{s:?} is negative"));
    }
    Ok(jiff::SignedDuration::from_secs_f64(secs))
}

/// Parses a point in time: RFC 3339 (`2027-01-31T12:00:00Z`), a date (`2027-01-31`, its
/// midnight UTC), or a span from now (`30d`, `12h`).
pub fn parse_time(s: &str) -> Result<jiff::Timestamp, String> {
    let t = s.trim();
    if let Ok(ts) = t.parse::<jiff::Timestamp>() {
        return Ok(ts);
    }
    if let Ok(date) = t.parse::<jiff::civil::Date>() {
        return date
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map(|z| z.timestamp())
            .map_err(|e| format!("{s:?}: {e}"));
    }
    match parse_duration(t) {
        Ok(d) => {
            jiff::Timestamp::now().checked_add(d).map_err(|e| format!("{s:?} is too far: {e}"))
        }
        Err(_) => Err(format!(
            "{s:?} is not a time: give 2027-01-31, 2027-01-31T12:00:00Z, or a span from now such as 30d"
        )),
    }
}

/// `1209600s` -> `14d`, `5400s` -> `90m`: a duration as people write it.
pub fn duration(d: jiff::SignedDuration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => "0".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A time for people, to the second: `2026-12-16T14:31:54Z`.
pub fn when(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times() {
        assert_eq!(parse_duration("14d").unwrap().as_secs(), 14 * 86_400);
        assert_eq!(parse_duration("0").unwrap().as_secs(), 0);
        assert_eq!(parse_duration("36h").unwrap().as_secs(), 36 * 3600);
        assert!(parse_duration("1mo").is_err(), "months are ambiguous");
        assert!(parse_duration("-1d").is_err());
        assert_eq!(duration(parse_duration("2w").unwrap()), "14d");
        assert_eq!(parse_time("2027-01-31").unwrap().to_string(), "2027-01-31T00:00:00Z");
        assert_eq!(parse_time("2027-01-31T12:00:00Z").unwrap().to_string(), "2027-01-31T12:00:00Z");
        let soon = parse_time("1d").unwrap();
        assert!(soon > jiff::Timestamp::now());
        assert!(parse_time("tomorrow-ish").is_err());
        assert_eq!(when("2027-01-31T12:00:00.123Z".parse().unwrap()), "2027-01-31T12:00:00Z");
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
