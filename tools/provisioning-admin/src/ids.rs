//! The identifiers an operator types or imports, checked before anything is written: a
//! malformed one would be an entry no device ever matches.

use regex_lite::Regex;
use shared::registry::DeviceId;

/// An IMSI: 5 to 15 digits (MCC + MNC + subscriber number; SORACOM's are 15).
pub fn imsi(text: &str) -> Result<DeviceId, String> {
    let text = text.trim();
    if (5..=15).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit()) {
        Ok(DeviceId::Sim(text.to_owned()))
    } else {
        Err(format!("{text:?} is not an IMSI (5 to 15 digits)"))
    }
}

/// A SORACOM SIM ID (the card; 19 or 20 characters today): 1 to 32 letters and digits.
pub fn sim_id(text: &str) -> Result<DeviceId, String> {
    let text = text.trim();
    if (1..=32).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(DeviceId::SimCard(text.to_owned()))
    } else {
        Err(format!(
            "{text:?} is not a SIM ID (1 to 32 letters and digits)"
        ))
    }
}

/// Serials as fleet-prehook accepts them (`SERIAL_PATTERN`, whole string).
#[derive(Debug, Clone)]
pub struct SerialRule(Regex);

impl SerialRule {
    pub fn new(pattern: &str) -> Result<Self, String> {
        Regex::new(&format!("^(?:{pattern})$"))
            .map(Self)
            .map_err(|e| format!("serial pattern {pattern:?} is not a regular expression: {e}"))
    }

    pub fn serial(&self, text: &str) -> Result<DeviceId, String> {
        let text = text.trim();
        if self.0.is_match(text) {
            Ok(DeviceId::Serial(text.to_owned()))
        } else {
            Err(format!(
                "{text:?} does not match the serial pattern {}",
                self.0.as_str()
            ))
        }
    }
}

/// How an identifier is written back to the operator.
pub fn display(id: &DeviceId) -> String {
    match id {
        DeviceId::Sim(imsi) => imsi.clone(),
        DeviceId::SimCard(sim_id) => format!("card {sim_id}"),
        DeviceId::Serial(serial) => serial.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::registry::DEFAULT_SERIAL_PATTERN;

    #[test]
    fn identifiers_are_checked_whole() {
        assert_eq!(
            imsi("440103123456789"),
            Ok(DeviceId::Sim("440103123456789".into()))
        );
        assert!(imsi("44010312345678x").is_err());
        assert!(imsi("4401031234567890").is_err());
        assert!(sim_id("8942310000000000000").is_ok());
        assert!(sim_id("89423-1").is_err());
        let rule = SerialRule::new(DEFAULT_SERIAL_PATTERN).unwrap();
        assert!(rule.serial("SN-0001").is_ok());
        // A partial match is not a match: the hook anchors the pattern too.
        assert!(rule.serial("SN-0001 extra").is_err());
        assert!(rule.serial("SN.1").is_err());
    }
}
