//! Times as operators write them (a date, an RFC 3339 time, Unix seconds) and as the table
//! keeps them (Unix seconds).

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime, Time};

/// Unix seconds from `2027-03-31` (the start of that day, UTC), `2027-03-31T12:00:00Z` (any
/// RFC 3339 offset) or `1806451200`. The message says which forms are accepted, so that a
/// typo in row 9,000 of an import reads as a typo.
pub fn parse(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let refuse =
        || format!("{text:?} is not a date (YYYY-MM-DD), an RFC 3339 time or Unix seconds");
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map_err(|_| refuse());
    }
    let at = if text.len() == 10 {
        Date::parse(text, format_description!("[year]-[month]-[day]"))
            .map(|d| d.with_time(Time::MIDNIGHT).assume_utc())
            .map_err(|_| refuse())?
    } else {
        OffsetDateTime::parse(text, &Rfc3339).map_err(|_| refuse())?
    };
    u64::try_from(at.unix_timestamp()).map_err(|_| refuse())
}

/// RFC 3339 in UTC, to the second (`2027-03-31T00:00:00Z`).
pub fn format(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_accepted_form_names_the_same_instant() {
        let midnight = 1_806_451_200; // 2027-03-31T00:00:00Z
        assert_eq!(parse("2027-03-31"), Ok(midnight));
        assert_eq!(parse("2027-03-31T00:00:00Z"), Ok(midnight));
        assert_eq!(parse("2027-03-31T09:00:00+09:00"), Ok(midnight));
        assert_eq!(parse(" 1806451200 "), Ok(midnight));
        assert_eq!(format(midnight), "2027-03-31T00:00:00Z");
    }

    #[test]
    fn what_is_not_a_time_is_refused_with_the_forms_that_are() {
        for bad in ["", "2027-02-30", "31/03/2027", "tomorrow", "-5", "1e9"] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("YYYY-MM-DD"), "{bad}: {err}");
        }
    }
}
