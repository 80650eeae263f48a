//! The policy server's two ed25519 keys, generated once and kept in `[policy_server]
//! state_dir`, readable by the owner only: the federation key (`ed25519:a_<random>`,
//! published on `/_matrix/key/v2/server`, signs requests and its own membership events) and
//! the policy key (`ed25519:policy_server`, published only in `m.room.policy` and
//! `/.well-known/matrix/policy_server`, signs the events it allows). Kept apart as MSC4284
//! asks: a leaked policy key cannot impersonate the server, and the other way round.
//!
//! File format: one line `ed25519 <key version> <PKCS#8 DER, standard base64>`.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use ruma::signatures::Ed25519KeyPair;

/// The key version (key id `ed25519:policy_server`) MSC4284 fixes for the policy key.
pub const POLICY_KEY_VERSION: &str = "policy_server";

/// Why the keys could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing a key file failed.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a key this server wrote.
    #[error("{file}: not an ed25519 key file ({why})")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Both keys.
pub struct Keys {
    /// Signs federation requests, the key server answer and our membership events.
    pub federation: Ed25519KeyPair,
    /// Signs the events the policy allows.
    pub policy: Ed25519KeyPair,
}

impl Keys {
    /// Reads both keys from `dir`, making (and writing) the missing ones.
    ///
    /// # Errors
    /// `dir` cannot be created, a key file cannot be read or written, or is not a key.
    pub fn load_or_generate(dir: &Path) -> Result<Self, KeyError> {
        create_private_dir(dir)?;
        let federation = load_or_generate(&dir.join("federation.key"), || {
            format!("a_{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
        })?;
        let policy = load_or_generate(&dir.join("policy.key"), || POLICY_KEY_VERSION.to_string())?;
        if policy.version() != POLICY_KEY_VERSION {
            return Err(KeyError::Invalid {
                file: dir.join("policy.key"),
                why: format!(
                    "key version {:?}, not {POLICY_KEY_VERSION}",
                    policy.version()
                ),
            });
        }
        Ok(Self { federation, policy })
    }

    /// Two fresh keys that are never written (tests, benchmarks).
    pub fn ephemeral() -> Result<Self, KeyError> {
        let make = |version: &str| {
            Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), version.to_string()).map_err(
                |e| KeyError::Invalid {
                    file: PathBuf::from("<generated>"),
                    why: e.to_string(),
                },
            )
        };
        Ok(Self {
            federation: make("a_test")?,
            policy: make(POLICY_KEY_VERSION)?,
        })
    }

    /// The policy key's public half, unpadded standard base64 (as `m.room.policy` has it).
    pub fn policy_public_key(&self) -> String {
        ruma::serde::Base64::<ruma::serde::base64::Standard, _>::new(self.policy.public_key())
            .encode()
    }

    /// The federation key's id (`ed25519:a_…`).
    pub fn federation_key_id(&self) -> String {
        format!("ed25519:{}", self.federation.version())
    }
}

fn create_private_dir(dir: &Path) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        file: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

fn load_or_generate(
    path: &Path,
    new_version: impl FnOnce() -> String,
) -> Result<Ed25519KeyPair, KeyError> {
    let io = |source| KeyError::Io {
        file: path.to_path_buf(),
        source,
    };
    let invalid = |why: String| KeyError::Invalid {
        file: path.to_path_buf(),
        why,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            restrict(path).map_err(io)?;
            let mut words = text.split_whitespace();
            let (Some("ed25519"), Some(version), Some(der), None) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                return Err(invalid("expected `ed25519 <version> <base64>`".to_string()));
            };
            let der = base64::engine::general_purpose::STANDARD
                .decode(der)
                .map_err(|e| invalid(e.to_string()))?;
            Ed25519KeyPair::from_der(&der, version.to_string()).map_err(|e| invalid(e.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let version = new_version();
            let der = Ed25519KeyPair::generate();
            let key = Ed25519KeyPair::from_der(&der, version.clone())
                .map_err(|e| invalid(e.to_string()))?;
            let line = format!(
                "ed25519 {version} {}\n",
                base64::engine::general_purpose::STANDARD.encode(&*der)
            );
            write_private(path, line.as_bytes()).map_err(io)?;
            tracing::info!(file = %path.display(), key_id = %format!("ed25519:{version}"), "policy server key generated");
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Writes a new file readable by its owner only (fails if it appeared meanwhile).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes an existing key file owner-only again (someone may have copied it loosely).
fn restrict(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "key file was readable by others; now 0600");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_once_kept_private_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("ps");
        let first = Keys::load_or_generate(&state).expect("generate");
        assert_eq!(first.policy.version(), POLICY_KEY_VERSION);
        assert!(first.federation.version().starts_with("a_"));
        assert_ne!(first.policy.public_key(), first.federation.public_key());
        let again = Keys::load_or_generate(&state).expect("read");
        assert_eq!(again.policy.public_key(), first.policy.public_key());
        assert_eq!(again.federation.public_key(), first.federation.public_key());
        assert_eq!(again.federation_key_id(), first.federation_key_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for file in ["federation.key", "policy.key"] {
                let mode = std::fs::metadata(state.join(file))
                    .expect("meta")
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{file}");
            }
        }
        std::fs::write(state.join("policy.key"), "not a key").expect("write");
        let err = Keys::load_or_generate(&state).err().expect("invalid");
        assert!(err.to_string().contains("not an ed25519 key file"), "{err}");
    }
}
