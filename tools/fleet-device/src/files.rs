//! Where the permanent identity is kept: a directory only its owner can enter, the key file
//! readable only by its owner from the moment it exists (never chmod-ed after the fact), and
//! every file written whole or not at all.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::DeviceError;

pub const CERTIFICATE_FILE: &str = "certificate.pem.crt";
pub const PRIVATE_KEY_FILE: &str = "private.pem.key";
pub const THING_FILE: &str = "thing.json";
const PENDING: &str = ".pending";

fn io(path: &Path, what: &str, e: std::io::Error) -> DeviceError {
    DeviceError::Setup(format!("cannot {what} {}: {e}", path.display()))
}

/// The output directory, created with mode 0700 if missing. An existing identity is not
/// overwritten unless `force`: a device that loses its key loses its thing.
pub fn prepare(dir: &Path, force: bool) -> Result<(), DeviceError> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io(dir, "create directory", e))?;
    } else if !dir.is_dir() {
        return Err(DeviceError::Setup(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let existing = [CERTIFICATE_FILE, PRIVATE_KEY_FILE]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists());
    if let (Some(path), false) = (existing, force) {
        return Err(DeviceError::Setup(format!(
            "{} already exists: this device already has an identity (use --force to replace it)",
            path.display()
        )));
    }
    Ok(())
}

/// Writes `contents` to `dir/name.pending` with `mode`, created with that mode.
pub fn write_pending(
    dir: &Path,
    name: &str,
    contents: &[u8],
    mode: u32,
) -> Result<PathBuf, DeviceError> {
    let path = dir.join(format!("{name}{PENDING}"));
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| io(&path, "create", e))?;
    // The umask can only remove bits; make the mode exact.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| io(&path, "set permissions on", e))?;
    file.write_all(contents)
        .and_then(|_| file.sync_all())
        .map_err(|e| io(&path, "write", e))?;
    Ok(path)
}

/// Moves `dir/name.pending` to `dir/name`.
pub fn commit(dir: &Path, name: &str) -> Result<PathBuf, DeviceError> {
    let from = dir.join(format!("{name}{PENDING}"));
    let to = dir.join(name);
    std::fs::rename(&from, &to).map_err(|e| io(&to, "move into place", e))?;
    Ok(to)
}

/// Removes pending files after a refusal: that certificate will never be activated.
pub fn discard(dir: &Path) {
    for name in [CERTIFICATE_FILE, PRIVATE_KEY_FILE, THING_FILE] {
        let _ = std::fs::remove_file(dir.join(format!("{name}{PENDING}")));
    }
}
