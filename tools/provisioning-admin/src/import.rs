//! An import in two steps: the plan (which entries are new, which change, which are already
//! so: one batched read), then the writes. New entries go in batches of 25 (`BatchWriteItem`,
//! unprocessed items retried); entries that exist are updated one by one, so that what the
//! functions recorded on them (registrations, certificates) is kept.

use std::collections::BTreeMap;

use shared::registry::{DeviceId, DeviceRecord, DynamoRegistry, Listing, RegistryError};

use crate::rows::Entry;
use crate::{AdminError, Progress};

/// Updates of existing entries in flight at once.
const CONCURRENT_UPDATES: usize = 16;

pub struct Plan {
    /// Devices with no item yet, in file order.
    new: Vec<DeviceRecord>,
    /// Devices whose item lists them otherwise, in file order.
    changed: Vec<(DeviceId, Listing)>,
    unchanged: usize,
}

impl Plan {
    pub fn summary(&self, dry_run: bool) -> String {
        let entries = self.new.len() + self.changed.len() + self.unchanged;
        let (new, changed) = if dry_run {
            ("would add", "would change")
        } else {
            ("added", "changed")
        };
        format!(
            "{entries} entries: {new} {}, {changed} {}, {} already so",
            self.new.len(),
            self.changed.len(),
            self.unchanged
        )
    }

    fn total(&self) -> usize {
        self.new.len() + self.changed.len()
    }
}

pub async fn plan(registry: &DynamoRegistry, entries: Vec<Entry>) -> Result<Plan, RegistryError> {
    let ids: Vec<DeviceId> = entries.iter().map(|e| e.id.clone()).collect();
    let existing = registry.existing(&ids).await?;
    let mut plan = Plan {
        new: Vec::new(),
        changed: Vec::new(),
        unchanged: 0,
    };
    for entry in entries {
        match existing.get(&entry.id.key()) {
            Some(record) if entry.listing.matches(record) => plan.unchanged += 1,
            Some(_) => plan.changed.push((entry.id, entry.listing)),
            None => {
                let mut record = DeviceRecord::allowed(entry.id);
                record.status = entry.listing.status;
                record.valid_until = entry.listing.valid_until;
                record.allow_reprovision = entry.listing.allow_reprovision;
                plan.new.push(record);
            }
        }
    }
    Ok(plan)
}

/// Writes the plan. On a failure the error says how many entries were written (new entries
/// first, in file order, then changed ones): nothing is half-written silently.
pub async fn apply(
    registry: &DynamoRegistry,
    plan: &Plan,
    progress: &mut Progress<'_>,
) -> Result<(), AdminError> {
    let total = plan.total();
    progress.start(total);
    let mut written = 0;
    let partial = |written, cause| AdminError::Partial {
        written,
        total,
        cause,
    };
    if let Err(cause) = registry
        .put_new(&plan.new, |done| {
            written = done;
            progress.show(done);
        })
        .await
    {
        progress.finish();
        return Err(partial(written, cause));
    }
    for chunk in plan.changed.chunks(CONCURRENT_UPDATES) {
        let results = futures::future::join_all(
            chunk
                .iter()
                .map(|(id, listing)| registry.list_device(id, listing)),
        )
        .await;
        // Entries are written in file order; a failure in a chunk may leave later ones of the
        // same chunk written, which are counted: the message must not claim less than is so.
        let mut failed = BTreeMap::new();
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(()) => written += 1,
                Err(cause) => {
                    failed.insert(i, cause);
                }
            }
        }
        progress.show(written);
        if let Some((_, cause)) = failed.into_iter().next() {
            progress.finish();
            return Err(partial(written, cause));
        }
    }
    progress.finish();
    Ok(())
}
