//! The application-service registration shared with the homeserver.
//!
//! msgnode owns a virtual-user namespace (`@_msgnode_.*` by default) for hyperties, node
//! components and foreign addresses, and acts as those users with its `as_token`; the
//! homeserver authenticates its pushes to msgnode with the `hs_token`. The file is the ruma
//! `Registration` type serialised as YAML, as Synapse reads it (at start-up only).

use std::io::Write;
use std::path::Path;

use ruma::api::appservice::{Namespace, Namespaces, Registration, RegistrationInit};

/// Why a registration could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The output file exists and overwriting was not asked for (its tokens are in use).
    #[error("{0} exists; its tokens are what the homeserver knows (use --force to replace it)")]
    Exists(String),
    /// Reading or writing failed.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a registration.
    #[error("{file}: not an appservice registration: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
}

/// Settings of a new registration.
#[derive(Debug, Clone)]
pub struct RegistrationSpec {
    /// Appservice id, unique on the homeserver.
    pub id: String,
    /// Where the homeserver pushes transactions (msgnode's appservice listener).
    pub url: String,
    /// Localpart of the appservice's own user.
    pub sender_localpart: String,
    /// Prefix of the virtual users' and aliases' localparts (exclusive namespace).
    pub prefix: String,
    /// The homeserver's server name: the namespace covers local users only, so a remote
    /// user whose localpart happens to match is never mistaken for one of ours.
    pub server_name: String,
}

impl Default for RegistrationSpec {
    fn default() -> Self {
        Self {
            id: "msgnode".to_string(),
            url: "http://127.0.0.1:8009".to_string(),
            sender_localpart: "_msgnode".to_string(),
            prefix: "_msgnode_".to_string(),
            server_name: "localhost".to_string(),
        }
    }
}

/// A random token: two v4 UUIDs (244 random bits from a CSPRNG), 64 hex digits.
fn token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// A new registration with fresh random tokens.
pub fn generate(spec: &RegistrationSpec) -> Registration {
    let prefix = regex::escape(&spec.prefix);
    let server = regex::escape(&spec.server_name);
    let mut namespaces = Namespaces::new();
    namespaces.users = vec![Namespace::new(true, format!("@{prefix}.*:{server}"))];
    namespaces.aliases = vec![Namespace::new(true, format!("#{prefix}.*:{server}"))];
    let mut registration: Registration = RegistrationInit {
        id: spec.id.clone(),
        url: Some(spec.url.clone()),
        as_token: token(),
        hs_token: token(),
        sender_localpart: spec.sender_localpart.clone(),
        namespaces,
        rate_limited: Some(false),
        protocols: None,
    }
    .into();
    registration.receive_ephemeral = false;
    registration
}

/// Writes `registration` as YAML to `path`, readable by its owner only.
///
/// # Errors
/// `path` exists and `force` is off, or the file cannot be written.
pub fn write(
    registration: &Registration,
    path: &Path,
    force: bool,
) -> Result<(), RegistrationError> {
    let shown = path.display().to_string();
    if path.exists() && !force {
        return Err(RegistrationError::Exists(shown));
    }
    let yaml = yaml_serde::to_string(registration).map_err(|e| RegistrationError::Invalid {
        file: shown.clone(),
        message: e.to_string(),
    })?;
    let io = |source| RegistrationError::Io {
        file: shown.clone(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io)?;
    file.write_all(yaml.as_bytes()).map_err(io)
}

/// Reads a registration file.
///
/// # Errors
/// The file cannot be read or is not a registration.
pub fn read(path: &Path) -> Result<Registration, RegistrationError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RegistrationError::Io {
        file: shown.clone(),
        source,
    })?;
    yaml_serde::from_str(&text).map_err(|e| RegistrationError::Invalid {
        file: shown,
        message: e.to_string(),
    })
}

/// The registration's user namespace as one matcher (each regex anchored to the whole id).
///
/// # Errors
/// A namespace regex that does not compile.
pub fn user_namespace(registration: &Registration) -> Result<regex::RegexSet, regex::Error> {
    regex::RegexSet::new(
        registration
            .namespaces
            .users
            .iter()
            .map(|n| format!("^(?:{})$", n.regex)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_registration_round_trips_and_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("as/appservice.yaml");
        let registration = generate(&RegistrationSpec::default());
        assert_eq!(registration.as_token.len(), 64);
        assert_ne!(registration.as_token, registration.hs_token);
        write(&registration, &path, false).expect("write");
        let back = read(&path).expect("read");
        assert_eq!(back.hs_token, registration.hs_token);
        assert_eq!(back.namespaces.users[0].regex, "@_msgnode_.*:localhost");
        assert!(back.namespaces.users[0].exclusive);
        assert_eq!(back.url.as_deref(), Some("http://127.0.0.1:8009"));
        assert_eq!(back.rate_limited, Some(false));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let err = write(&generate(&RegistrationSpec::default()), &path, false).expect_err("exists");
        assert!(err.to_string().contains("--force"), "{err}");
        write(&generate(&RegistrationSpec::default()), &path, true).expect("forced");
        assert_ne!(read(&path).expect("read").hs_token, registration.hs_token);
    }

    #[test]
    fn prefixes_are_regex_escaped() {
        let spec = RegistrationSpec {
            prefix: "_a.b".into(),
            server_name: "m.example".into(),
            ..RegistrationSpec::default()
        };
        let users = &generate(&spec).namespaces.users[0].regex;
        assert_eq!(users, "@_a\\.b.*:m\\.example");
        let registration = generate(&spec);
        let namespace = user_namespace(&registration).expect("regex");
        assert!(namespace.is_match("@_a.bob:m.example"));
        assert!(!namespace.is_match("@_aXbob:m.example"));
        assert!(!namespace.is_match("@_a.bob:mXexample"));
    }
}
