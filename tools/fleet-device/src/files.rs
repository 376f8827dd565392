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

/// The output directory, created with mode 0700 if missing; an existing one must be 0700
/// already (anyone who may enter it may swap the key file between our write and the
/// device's next read, or read a key someone made readable). An existing identity is not
/// overwritten unless `force`: a device that loses its key loses its thing.
pub fn prepare(dir: &Path, force: bool) -> Result<(), DeviceError> {
    match std::fs::symlink_metadata(dir) {
        Err(_) => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io(dir, "create directory", e))?;
        }
        Ok(meta) if !meta.is_dir() => {
            return Err(DeviceError::Setup(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
            return Err(DeviceError::Setup(format!(
                "{} is open to others (mode {:o}): make it 0700 (chmod 700) or choose a new \
                 directory, which is created 0700",
                dir.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        Ok(_) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue: 0700 was enforced only on a directory fleet-device created.
    #[test]
    fn an_existing_directory_open_to_others_is_refused() {
        let base = std::env::temp_dir().join(format!("fleet-device-files-{}", std::process::id()));
        let open = base.join("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = prepare(&open, false).unwrap_err().to_string();
        assert!(
            err.contains("mode 755") && err.contains("chmod 700"),
            "{err}"
        );
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(prepare(&open, false).is_ok());
        let created = base.join("new/identity");
        prepare(&created, false).unwrap();
        let mode = std::fs::metadata(&created).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let file = base.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(prepare(&file, false).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
