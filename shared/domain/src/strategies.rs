//! Hostile input for the property tests of every parser of outside input (this crate's and the
//! functions'): arbitrary JSON, biased towards the field names the parsers look for so that
//! generated documents get past the first checks and exercise the deeper ones.

use proptest::prelude::*;
use serde_json::{Map, Value};

/// Any text, including control characters, non-ASCII and very long lines.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[0-9]{0,20}",
        "[ -~]{0,300}",
        Just(String::new()),
    ]
}

/// Arbitrary JSON whose object keys are drawn from `keys` (and a few strangers).
pub fn json_with_keys(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    let key = prop_oneof![
        4 => proptest::sample::select(keys).prop_map(str::to_owned),
        1 => "[a-zA-Z_:]{1,12}",
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..8)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}
