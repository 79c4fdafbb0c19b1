//! Serde for durations as human-readable strings (`90s`, `10m`, `1h`), the way operators write
//! them in YAML. Numbers are accepted too, as seconds.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Text(String),
    Seconds(u64),
}

/// Parses `90s`, `10m`, `1h 30m` or a bare number of seconds.
pub fn parse(text: &str) -> Result<Duration, humantime::DurationError> {
    match text.trim().parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(text),
    }
}

/// Formats a duration the way [`parse`] reads it.
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Serialises a [`Duration`] as text.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

/// Deserialises a [`Duration`] from text or seconds.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match Raw::deserialize(d)? {
        Raw::Seconds(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
    }
}

/// The same for `Option<Duration>`.
pub mod option {
    use super::*;

    /// Serialises an optional duration as text (or null).
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format(*d)),
            None => s.serialize_none(),
        }
    }

    /// Deserialises an optional duration from text, seconds or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Seconds(s)) => Ok(Some(Duration::from_secs(s))),
            Some(Raw::Text(t)) => super::parse(&t).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operator_forms() {
        assert_eq!(parse("90").expect("secs"), Duration::from_secs(90));
        assert_eq!(parse("10m").expect("mins"), Duration::from_secs(600));
        assert_eq!(parse("1h 30m").expect("mixed"), Duration::from_secs(5400));
        assert!(parse("soon").is_err());
        assert_eq!(
            parse(&format(Duration::from_secs(3725))).expect("round trip"),
            Duration::from_secs(3725)
        );
    }
}
