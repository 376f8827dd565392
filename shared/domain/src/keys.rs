//! Symmetric keys as Azure DPS uses them, and the enrollment-group key derivation.
//!
//! A [`SymmetricKey`] holds decoded key bytes. Its `Debug` output is redacted and its memory is
//! wiped on drop (`zeroize`), so a key that ends up in a log line or an error by mistake shows
//! nothing, and a dropped one does not linger in freed memory.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::hmac;
use zeroize::Zeroizing;

/// Why a key was refused. Carries no part of the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key is empty")]
    Empty,
    #[error("key is not valid base64")]
    NotBase64,
}

/// A symmetric key (group key or device key), as decoded bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SymmetricKey(Zeroizing<Vec<u8>>);

impl SymmetricKey {
    /// Decodes a key as the Azure portal and CLI show it: standard base64 with padding.
    /// Surrounding whitespace (a trailing newline from `aws ssm put-parameter --value file://`)
    /// is ignored.
    pub fn from_base64(encoded: &str) -> Result<Self, KeyError> {
        let trimmed = encoded.trim();
        if trimmed.is_empty() {
            return Err(KeyError::Empty);
        }
        let bytes = Zeroizing::new(STANDARD.decode(trimmed).map_err(|_| KeyError::NotBase64)?);
        if bytes.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self(bytes))
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, KeyError> {
        if bytes.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self(Zeroizing::new(bytes)))
    }

    /// The key in the form devices and connection strings carry it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.as_slice())
    }

    /// HMAC-SHA256 of `message` under this key.
    pub fn sign(&self, message: &[u8]) -> [u8; 32] {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let tag = hmac::sign(&key, message);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Checks `tag` against the HMAC-SHA256 of `message` in constant time.
    pub fn verify(&self, message: &[u8], tag: &[u8]) -> bool {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        hmac::verify(&key, message, tag).is_ok()
    }

    /// Which key this is, without being the key: 128 bits of SHA-256 over a label and the key,
    /// in hex. Recorded next to a registration so that a later call can tell whether the
    /// registration was made with the key it holds now (a rotated group key derives other
    /// device keys). The key is random and 256 bits long: the fingerprint reveals nothing of it.
    pub fn fingerprint(&self) -> String {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(b"soracom-provisioning key fingerprint v1\0");
        context.update(&self.0);
        hex::encode(&context.finish().as_ref()[..16])
    }

    /// The device key of `registration_id` in the enrollment group whose key this is:
    /// `HMAC-SHA256(key = group key, msg = registration id)`, as every Azure device SDK derives it.
    pub fn derive_device_key(&self, registration_id: &str) -> SymmetricKey {
        SymmetricKey(Zeroizing::new(
            self.sign(registration_id.as_bytes()).to_vec(),
        ))
    }
}

impl std::fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKey([redacted])")
    }
}

/// Compares two byte strings in time that depends only on their lengths, for comparing
/// signatures or tokens that an attacker may probe byte by byte.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_tells_keys_apart_and_shows_none_of_them() {
        let a = SymmetricKey::from_bytes(vec![7; 32]).unwrap();
        let b = SymmetricKey::from_bytes(vec![8; 32]).unwrap();
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 32);
        // Neither the key's bytes nor its base64 form appear in it.
        assert!(!a.fingerprint().contains(&hex::encode([7u8; 4])));
        assert!(!a.fingerprint().contains(&a.to_base64()[..8]));
        // Derived device keys of two registration ids differ, and so do their fingerprints.
        assert_ne!(
            a.derive_device_key("x").fingerprint(),
            a.derive_device_key("y").fingerprint()
        );
    }

    #[test]
    fn derives_the_documented_device_key() {
        let group = SymmetricKey::from_base64(
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
        )
        .unwrap();
        let device = group.derive_device_key("sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6");
        assert_eq!(
            device.to_base64(),
            "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="
        );
    }

    #[test]
    fn derivation_depends_on_registration_id() {
        let group =
            SymmetricKey::from_base64("VGhpcyB0aGluZyBhbGwgdGhpbmdzIGl0IGRldm91cnM=").unwrap();
        assert_ne!(group.derive_device_key("a"), group.derive_device_key("b"));
    }

    #[test]
    fn refuses_bad_keys_without_echoing_them() {
        assert_eq!(SymmetricKey::from_base64("  \n"), Err(KeyError::Empty));
        let err = SymmetricKey::from_base64("not*base64!secret").unwrap_err();
        assert_eq!(err, KeyError::NotBase64);
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn tolerates_trailing_newline() {
        let key =
            SymmetricKey::from_base64("VGhpcyB0aGluZyBhbGwgdGhpbmdzIGl0IGRldm91cnM=\n").unwrap();
        assert_eq!(
            key.to_base64(),
            "VGhpcyB0aGluZyBhbGwgdGhpbmdzIGl0IGRldm91cnM="
        );
    }

    #[test]
    fn debug_is_redacted() {
        let key =
            SymmetricKey::from_base64("VGhpcyB0aGluZyBhbGwgdGhpbmdzIGl0IGRldm91cnM=").unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains("VGhp"));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn verify_accepts_own_tag_and_rejects_others() {
        let key =
            SymmetricKey::from_base64("VGhpcyB0aGluZyBhbGwgdGhpbmdzIGl0IGRldm91cnM=").unwrap();
        let tag = key.sign(b"message");
        assert!(key.verify(b"message", &tag));
        assert!(!key.verify(b"massage", &tag));
        assert!(!key.verify(b"message", &tag[..31]));
    }

    #[test]
    fn ct_eq_compares_content_and_length() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(ct_eq(b"", b""));
    }
}
