//! What the end-to-end tests and the demo build the same way: environment maps for the
//! functions' configuration loaders, the sample events, temporary directories.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::Value;

pub use crate::stack::{temp_dir, TempDir};

/// An environment for a configuration loader: `base`, then `extra` (which wins).
pub fn env(base: &[(&str, &str)], extra: &[(&str, &str)]) -> HashMap<String, String> {
    base.iter()
        .chain(extra)
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `events/<function>/<name>`.
pub fn event_path(function: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../events")
        .join(function)
        .join(name)
}

/// The sample event `events/<function>/<name>`, as text.
pub fn event_text(function: &str, name: &str) -> String {
    let path = event_path(function, name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The sample event `events/<function>/<name>`, parsed.
pub fn event(function: &str, name: &str) -> Value {
    let text = event_text(function, name);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("events/{function}/{name}: {e}"))
}
