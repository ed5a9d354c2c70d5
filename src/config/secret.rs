//! Files that hold secrets (the CA key, proxy users' password hashes,
//! regcache's registry passwords and tokens): refused when other users can
//! read or write them, so that a mistake in permissions stops regcache at
//! start instead of exposing the secret.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// Other users can read or write the file.
    #[error("{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")]
    Exposed {
        /// The file concerned.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Refuses a file that other users can read or write.
pub fn check_private(path: &Path) -> Result<(), SecretFileError> {
    check_mode(path, 0o007)
}

/// Refuses a file that its group or other users can read or write.
pub fn check_owner_only(path: &Path) -> Result<(), SecretFileError> {
    check_mode(path, 0o077)
}

/// Refuses a file with any of the permission bits of `forbidden`.
fn check_mode(path: &Path, forbidden: u32) -> Result<(), SecretFileError> {
    let meta = fs::metadata(path).map_err(|source| SecretFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & forbidden != 0 {
        return Err(SecretFileError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// The secret in `path`, trimmed, after [`check_private`].
pub fn read_secret(path: &Path) -> Result<String, SecretFileError> {
    check_private(path)?;
    read_trimmed(path)
}

/// The secret in `path`, trimmed, after [`check_owner_only`].
pub fn read_owner_secret(path: &Path) -> Result<String, SecretFileError> {
    check_owner_only(path)?;
    read_trimmed(path)
}

fn read_trimmed(path: &Path) -> Result<String, SecretFileError> {
    let text = fs::read_to_string(path).map_err(|source| SecretFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_others_can_read_is_refused_and_a_private_one_read_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, "s3cret\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&path).unwrap_err();
        assert!(matches!(err, SecretFileError::Exposed { mode: 0o644, .. }));
        assert!(err.to_string().contains("chmod 600"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(read_secret(&path).unwrap(), "s3cret");
        let missing = dir.path().join("missing");
        assert!(matches!(
            check_private(&missing),
            Err(SecretFileError::Io { .. })
        ));
    }

    #[test]
    fn an_owner_only_secret_is_refused_when_its_group_can_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        fs::write(&path, "t0ken\n").unwrap();
        for mode in [0o640, 0o604, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_owner_secret(&path).unwrap_err();
            assert!(matches!(err, SecretFileError::Exposed { .. }), "{mode:o}");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_owner_secret(&path).unwrap(), "t0ken");
    }
}
