//! STUB (replaced by the bus-store branch): acting as appservice users.

/// Acts as appservice users.
pub struct Actor;

/// Failure.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    /// Unreachable.
    #[error("homeserver unavailable")]
    Unavailable,
}

impl Actor {
    /// Deterministic virtual user.
    pub fn virtual_user(&self, kind: &str, key: &str) -> String {
        format!("@_msgnode_{kind}.{key}:localhost")
    }
    /// Registers.
    pub async fn ensure_user(&self, _user_id: &str) -> Result<(), ActorError> {
        Ok(())
    }
}

impl Actor {
    /// Builds.
    pub fn new(
        _registration: &ruma::api::appservice::Registration,
        _server_name: &str,
        _homeserver: std::sync::Arc<super::homeserver::Homeserver>,
    ) -> anyhow::Result<Self> {
        Ok(Actor)
    }
}
