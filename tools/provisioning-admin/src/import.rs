//! An import in two steps: the plan (which entries are new, which change, which are already
//! so: one batched read), then the writes. New entries are put 32 at a time, each only if the
//! device still has no item; entries that exist are updated one by one, so that what
//! the functions recorded on them (registrations, certificates) is kept, and only while their
//! status is still what the plan read. An entry written meanwhile (SORACOM's event blocked the
//! SIM, say) is left as it is and named: the import never turns a block it did not see into
//! `allowed`.
//!
//! A file does not unblock what the table blocks unless told (`--unblock`): an export taken
//! before an operator's or SORACOM's block would otherwise lift it.

use std::collections::BTreeMap;

use shared::registry::{
    DeviceId, DeviceRecord, DeviceStatus, DynamoRegistry, Listing, RegistryError,
};

use crate::rows::Entry;
use crate::{AdminError, Progress};

/// Updates of existing entries in flight at once.
const CONCURRENT_UPDATES: usize = 16;

pub struct Plan {
    /// Devices with no item yet, in file order.
    new: Vec<DeviceRecord>,
    /// Devices whose item lists them otherwise, in file order, with the status the plan read.
    changed: Vec<(DeviceId, Listing, DeviceStatus)>,
    unchanged: usize,
    /// Blocked devices the file would allow, left blocked (no `--unblock`).
    kept_blocked: usize,
}

impl Plan {
    pub fn summary(&self, dry_run: bool) -> String {
        let entries = self.new.len() + self.changed.len() + self.unchanged;
        let (new, changed) = if dry_run {
            ("would add", "would change")
        } else {
            ("added", "changed")
        };
        let entries = entries + self.kept_blocked;
        let mut summary = format!(
            "{entries} entries: {new} {}, {changed} {}, {} already so",
            self.new.len(),
            self.changed.len(),
            self.unchanged
        );
        if self.kept_blocked > 0 {
            summary.push_str(&format!(
                ", {} kept blocked (the table blocks them; --unblock lets the file allow them)",
                self.kept_blocked
            ));
        }
        summary
    }

    fn total(&self) -> usize {
        self.new.len() + self.changed.len()
    }
}

/// What importing `entries` would do; `unblock`: entries the table blocks may be allowed.
pub async fn plan(
    registry: &DynamoRegistry,
    entries: Vec<Entry>,
    unblock: bool,
) -> Result<Plan, RegistryError> {
    let ids: Vec<DeviceId> = entries.iter().map(|e| e.id.clone()).collect();
    let existing = registry.existing(&ids).await?;
    let mut plan = Plan {
        new: Vec::new(),
        changed: Vec::new(),
        unchanged: 0,
        kept_blocked: 0,
    };
    for entry in entries {
        match existing.get(&entry.id.key()) {
            Some(record) if entry.listing.matches(record) => plan.unchanged += 1,
            Some(record)
                if record.status == DeviceStatus::Blocked
                    && entry.listing.status != DeviceStatus::Blocked
                    && !unblock =>
            {
                plan.kept_blocked += 1
            }
            Some(record) => plan.changed.push((entry.id, entry.listing, record.status)),
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
    let mut meanwhile = match registry
        .put_new(&plan.new, |done| {
            written = done;
            progress.show(done);
        })
        .await
    {
        Ok(taken) => taken,
        Err(cause) => {
            progress.finish();
            return Err(partial(written, cause));
        }
    };
    for chunk in plan.changed.chunks(CONCURRENT_UPDATES) {
        let results = futures::future::join_all(
            chunk
                .iter()
                .map(|(id, listing, seen)| registry.list_device_if(id, listing, Some(*seen))),
        )
        .await;
        // Entries are written in file order; a failure in a chunk may leave later ones of the
        // same chunk written, which are counted: the message must not claim less than is so.
        let mut failed = BTreeMap::new();
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(true) => written += 1,
                Ok(false) => meanwhile.push(chunk[i].0.key()),
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
    if !meanwhile.is_empty() {
        return Err(AdminError::ChangedMeanwhile {
            written,
            total,
            keys: meanwhile,
        });
    }
    Ok(())
}
