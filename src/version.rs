//! What this binary is: msgnode's version, the commit it was built from, and the versions of
//! the policy engine and Matrix library it embeds (recorded by `build.rs`).

/// msgnode's version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from (`unknown` outside a git checkout).
pub const GIT_COMMIT: &str = env!("MSGNODE_GIT_COMMIT");
/// regorus, the Rego engine.
pub const REGORUS: &str = env!("MSGNODE_REGORUS_VERSION");
/// ruma, the Matrix types.
pub const RUMA: &str = env!("MSGNODE_RUMA_VERSION");
