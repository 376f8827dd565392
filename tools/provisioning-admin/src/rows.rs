//! Import files, read whole and checked whole before anything is written: every malformed row
//! is reported with its line, and one bad row means nothing of the file is written.
//!
//! - SIMs, CSV: `imsi[,simId][,valid_until]` by position, or any order under a header row
//!   naming `imsi`, `simId`, `valid_until`, `status`.
//! - SIMs, JSON: what `soracom subscribers list` (or `soracom sims list`) prints: an array of
//!   objects with `imsi`, optional `simId` and SORACOM's `status`.
//! - Serials, CSV: `serial[,valid_until]`, or under a header naming `serial`, `valid_until`,
//!   `status`.

use std::collections::HashMap;

use serde_json::Value;
use shared::registry::{DeviceId, DeviceStatus, Listing};

use crate::dates;
use crate::ids::{self, SerialRule};

/// What an import lists.
pub enum Subject<'a> {
    /// SIMs by IMSI; with `cards`, each row's SIM card (`simId`) too, so that every IMSI of a
    /// multi-IMSI SIM registers.
    Sims {
        cards: bool,
    },
    Serials(&'a SerialRule),
}

/// One entry to write, and where in the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub at: Place,
    pub id: DeviceId,
    pub listing: Listing,
}

/// A row's place in its file: a CSV line or a JSON array element (both 1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Line(u64),
    Element(usize),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Line(n) => write!(f, "line {n}"),
            Self::Element(n) => write!(f, "entry {n}"),
        }
    }
}

/// A row that cannot be imported, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub at: Place,
    pub message: String,
}

/// How the rows of a file are listed unless a row says otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub status: DeviceStatus,
    /// Now, in Unix seconds: a row's `valid_until` must be later.
    pub now: u64,
}

/// The entries of `text`, or every row's error.
pub fn parse(
    text: &str,
    subject: &Subject,
    defaults: Defaults,
) -> Result<Vec<Entry>, Vec<RowError>> {
    let looks_like_json = text.trim_start().starts_with('[');
    let (entries, mut errors) = match (subject, looks_like_json) {
        (Subject::Sims { cards }, true) => soracom_json(text, *cards, defaults),
        (Subject::Serials(_), true) => (
            Vec::new(),
            vec![RowError {
                at: Place::Line(1),
                message: "serials are imported from CSV (serial[,valid_until])".into(),
            }],
        ),
        (_, false) => csv_rows(text, subject, defaults),
    };
    let entries = merge(entries, &mut errors);
    if errors.is_empty() {
        Ok(entries)
    } else {
        errors.sort_by_key(|e| match e.at {
            Place::Line(n) => n,
            Place::Element(n) => n as u64,
        });
        Err(errors)
    }
}

/// A device named twice: the same listing twice is one entry (a multi-IMSI SIM's card on each
/// of its rows); two different listings are an error naming both rows, since either choice
/// would silently drop one.
fn merge(entries: Vec<Entry>, errors: &mut Vec<RowError>) -> Vec<Entry> {
    let mut first: HashMap<String, usize> = HashMap::new();
    let mut kept: Vec<Entry> = Vec::with_capacity(entries.len());
    for entry in entries {
        let key = entry.id.key();
        match first.get(&key) {
            Some(&i) if kept[i].listing == entry.listing => {}
            Some(&i) => errors.push(RowError {
                at: entry.at,
                message: format!(
                    "{} is also on {} and listed differently there",
                    ids::display(&entry.id),
                    kept[i].at
                ),
            }),
            None => {
                first.insert(key, kept.len());
                kept.push(entry);
            }
        }
    }
    kept
}

/// The columns a CSV row may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Id,
    SimId,
    ValidUntil,
    Status,
}

/// One CSV line's fields (quotes as CSV has them), or why it is not CSV. Lines are read one
/// by one so that every error names the line a text editor shows.
fn fields(line: &str) -> Result<csv::StringRecord, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(line.as_bytes());
    match reader.records().next() {
        Some(Ok(record)) => Ok(record),
        Some(Err(e)) => Err(format!("not CSV: {e}")),
        None => Ok(csv::StringRecord::new()),
    }
}

fn csv_rows(text: &str, subject: &Subject, defaults: Defaults) -> (Vec<Entry>, Vec<RowError>) {
    let positional = match subject {
        Subject::Sims { .. } => vec![Column::Id, Column::SimId, Column::ValidUntil],
        Subject::Serials(_) => vec![Column::Id, Column::ValidUntil],
    };
    let mut columns: Option<Vec<Column>> = None;
    let (mut entries, mut errors) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let at = Place::Line(i as u64 + 1);
        let line = line.trim_start_matches('\u{feff}');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let record = match fields(line) {
            Ok(record) => record,
            Err(message) => {
                errors.push(RowError { at, message });
                continue;
            }
        };
        if columns.is_none() {
            // A header names the identifier column; no identifier is a column name.
            let named = record
                .iter()
                .any(|f| f.eq_ignore_ascii_case("imsi") || f.eq_ignore_ascii_case("serial"));
            if named {
                match header(&record, subject) {
                    Ok(named) => columns = Some(named),
                    Err(message) => {
                        errors.push(RowError { at, message });
                        columns = Some(positional.clone());
                    }
                }
                continue;
            }
            columns = Some(positional.clone());
        }
        let columns = columns.as_deref().unwrap_or(&positional);
        if record.len() > columns.len() {
            errors.push(RowError {
                at,
                message: format!(
                    "{} fields; this file's rows have at most {}",
                    record.len(),
                    columns.len()
                ),
            });
            continue;
        }
        let field = |wanted: Column| {
            columns
                .iter()
                .position(|c| *c == wanted)
                .and_then(|i| record.get(i))
                .filter(|v| !v.is_empty())
        };
        match row(subject, defaults, at, field) {
            Ok(mut row) => entries.append(&mut row),
            Err(message) => errors.push(RowError { at, message }),
        }
    }
    (entries, errors)
}

fn header(record: &csv::StringRecord, subject: &Subject) -> Result<Vec<Column>, String> {
    let expected = match subject {
        Subject::Sims { .. } => "imsi, simId, valid_until, status",
        Subject::Serials(_) => "serial, valid_until, status",
    };
    let mut columns = Vec::new();
    for name in record.iter() {
        let column = match (name.to_ascii_lowercase().replace('_', "").as_str(), subject) {
            ("imsi", Subject::Sims { .. }) | ("serial", Subject::Serials(_)) => Column::Id,
            ("simid", Subject::Sims { .. }) => Column::SimId,
            ("validuntil", _) => Column::ValidUntil,
            ("status", _) => Column::Status,
            _ => return Err(format!("unknown column {name:?}; expected {expected}")),
        };
        if columns.contains(&column) {
            return Err(format!("column {name:?} appears twice"));
        }
        columns.push(column);
    }
    Ok(columns)
}

/// One CSV row's entries: the device, and with `cards` its SIM card.
fn row<'r>(
    subject: &Subject,
    defaults: Defaults,
    at: Place,
    field: impl Fn(Column) -> Option<&'r str>,
) -> Result<Vec<Entry>, String> {
    let id_text = field(Column::Id).ok_or("no identifier in the first column")?;
    let status = match field(Column::Status) {
        None => defaults.status,
        Some(text) => match text.to_ascii_lowercase().as_str() {
            "allowed" => DeviceStatus::Allowed,
            "blocked" => DeviceStatus::Blocked,
            _ => return Err(format!("status {text:?} is neither allowed nor blocked")),
        },
    };
    let valid_until = field(Column::ValidUntil)
        .map(|text| future(text, defaults.now))
        .transpose()?;
    let listing = Listing {
        status,
        valid_until,
        allow_reprovision: false,
    };
    let id = match subject {
        Subject::Sims { .. } => ids::imsi(id_text)?,
        Subject::Serials(rule) => rule.serial(id_text)?,
    };
    let card = match (subject, field(Column::SimId)) {
        (Subject::Sims { cards: true }, Some(text)) => Some(ids::sim_id(text)?),
        (_, Some(text)) => {
            ids::sim_id(text)?;
            None
        }
        _ => None,
    };
    Ok(std::iter::once(id)
        .chain(card)
        .map(|id| Entry {
            at,
            id,
            listing: listing.clone(),
        })
        .collect())
}

fn future(text: &str, now: u64) -> Result<u64, String> {
    let until = dates::parse(text)?;
    if until <= now {
        return Err(format!(
            "valid_until {} is not in the future",
            dates::format(until)
        ));
    }
    Ok(until)
}

/// SORACOM's statuses: a suspended or terminated SIM is blocked, every other state (ready,
/// active, inactive, standby, in stock, shipped) may register once it is online.
fn soracom_status(status: &str) -> Option<DeviceStatus> {
    match status {
        "suspended" | "terminated" => Some(DeviceStatus::Blocked),
        "ready" | "active" | "inactive" | "standby" | "instock" | "shipped" => {
            Some(DeviceStatus::Allowed)
        }
        _ => None,
    }
}

fn soracom_json(text: &str, cards: bool, defaults: Defaults) -> (Vec<Entry>, Vec<RowError>) {
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => {
            let at = Place::Line(e.line() as u64);
            let message = format!("not JSON: {e}");
            return (Vec::new(), vec![RowError { at, message }]);
        }
    };
    let Some(subscribers) = value.as_array() else {
        let message = "expected the array `soracom subscribers list` prints".into();
        return (
            Vec::new(),
            vec![RowError {
                at: Place::Line(1),
                message,
            }],
        );
    };
    let (mut entries, mut errors) = (Vec::new(), Vec::new());
    for (i, subscriber) in subscribers.iter().enumerate() {
        let at = Place::Element(i + 1);
        match subscriber_entries(subscriber, cards, defaults, at) {
            Ok(mut found) => entries.append(&mut found),
            Err(message) => errors.push(RowError { at, message }),
        }
    }
    (entries, errors)
}

fn subscriber_entries(
    subscriber: &Value,
    cards: bool,
    defaults: Defaults,
    at: Place,
) -> Result<Vec<Entry>, String> {
    let text = |name: &str| subscriber.get(name).and_then(Value::as_str);
    let imsi = text("imsi").ok_or("no \"imsi\" string")?;
    let status = match text("status") {
        None => defaults.status,
        Some(status) => soracom_status(status)
            .ok_or_else(|| format!("SORACOM status {status:?} is not one this tool knows"))?,
    };
    let listing = Listing {
        status,
        valid_until: None,
        allow_reprovision: false,
    };
    let mut ids = vec![ids::imsi(imsi)?];
    if let (true, Some(sim_id)) = (cards, text("simId")) {
        ids.push(ids::sim_id(sim_id)?);
    }
    Ok(ids
        .into_iter()
        .map(|id| Entry {
            at,
            id,
            listing: listing.clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::registry::DEFAULT_SERIAL_PATTERN;

    const NOW: u64 = 1_800_000_000;
    const ALLOW: Defaults = Defaults {
        status: DeviceStatus::Allowed,
        now: NOW,
    };

    fn sims(text: &str, cards: bool) -> Result<Vec<Entry>, Vec<RowError>> {
        parse(text, &Subject::Sims { cards }, ALLOW)
    }

    fn keys(entries: &[Entry]) -> Vec<String> {
        entries.iter().map(|e| e.id.key()).collect()
    }

    #[test]
    fn positional_rows_name_imsi_then_sim_id_then_validity() {
        let entries = sims(
            "440103000000001\n440103000000002,8942310000000000002\n440103000000003,,2030-01-01\n",
            true,
        )
        .unwrap();
        assert_eq!(
            keys(&entries),
            [
                "sim#440103000000001",
                "sim#440103000000002",
                "simid#8942310000000000002",
                "sim#440103000000003"
            ]
        );
        assert_eq!(entries[3].listing.valid_until, Some(1_893_456_000));
        assert_eq!(entries[3].at, Place::Line(3));
    }

    #[test]
    fn a_header_row_orders_the_columns() {
        let entries = sims(
            "valid_until,status,IMSI\n2030-01-01,blocked,440103000000001\n",
            false,
        )
        .unwrap();
        assert_eq!(keys(&entries), ["sim#440103000000001"]);
        assert_eq!(entries[0].listing.status, DeviceStatus::Blocked);
        assert!(sims("imsi,colour\n440103000000001,red\n", false).is_err());
    }

    #[test]
    fn every_bad_row_is_reported_with_its_line_and_nothing_is_returned() {
        let text = "# SIMs for site 7\n440103000000001\n44010300000000x\n\n440103000000003,,yesterday\n440103000000004,a,b,c\n";
        let errors = sims(text, false).unwrap_err();
        let lines: Vec<Place> = errors.iter().map(|e| e.at).collect();
        assert_eq!(lines, [Place::Line(3), Place::Line(5), Place::Line(6)]);
        assert!(errors[0].message.contains("not an IMSI"), "{errors:?}");
        assert!(errors[1].message.contains("YYYY-MM-DD"), "{errors:?}");
    }

    #[test]
    fn a_validity_already_past_is_a_mistake() {
        let errors = sims("440103000000001,,2020-01-01\n", false).unwrap_err();
        assert!(errors[0].message.contains("not in the future"));
    }

    #[test]
    fn the_same_device_twice_merges_when_identical_and_fails_when_not() {
        // Two IMSIs of one multi-IMSI card: the card is listed once.
        let text = "440103000000001,8942310000000000001\n440103000000002,8942310000000000001\n";
        assert_eq!(sims(text, true).unwrap().len(), 3);
        let conflict = "440103000000001\n440103000000001,,2030-01-01\n";
        let errors = sims(conflict, false).unwrap_err();
        assert_eq!(errors[0].at, Place::Line(2));
        assert!(errors[0].message.contains("also on line 1"), "{errors:?}");
    }

    #[test]
    fn soracom_subscriber_lists_map_suspended_and_terminated_to_blocked() {
        let json = r#"[
          {"imsi": "440103000000001", "simId": "8942310000000000001", "status": "active", "speedClass": "s1.fast"},
          {"imsi": "440103000000002", "status": "terminated"},
          {"imsi": "440103000000003", "status": "suspended"}
        ]"#;
        let entries = sims(json, true).unwrap();
        let statuses: Vec<(String, DeviceStatus)> = entries
            .iter()
            .map(|e| (e.id.key(), e.listing.status))
            .collect();
        assert_eq!(
            statuses,
            [
                ("sim#440103000000001".into(), DeviceStatus::Allowed),
                ("simid#8942310000000000001".into(), DeviceStatus::Allowed),
                ("sim#440103000000002".into(), DeviceStatus::Blocked),
                ("sim#440103000000003".into(), DeviceStatus::Blocked),
            ]
        );
        let errors = sims(r#"[{"imsi": "1"}, {"status": "active"}, {"imsi": "440103000000009", "status": "lost"}]"#, false).unwrap_err();
        let places: Vec<Place> = errors.iter().map(|e| e.at).collect();
        assert_eq!(
            places,
            [Place::Element(1), Place::Element(2), Place::Element(3)]
        );
    }

    #[test]
    fn serials_follow_the_hooks_pattern() {
        let rule = SerialRule::new(DEFAULT_SERIAL_PATTERN).unwrap();
        let entries = parse(
            "serial,valid_until\nSN-1,2030-01-01\n",
            &Subject::Serials(&rule),
            ALLOW,
        )
        .unwrap();
        assert_eq!(keys(&entries), ["serial#SN-1"]);
        let errors = parse("SN 1\n", &Subject::Serials(&rule), ALLOW).unwrap_err();
        assert!(errors[0].message.contains("serial pattern"));
    }
}
