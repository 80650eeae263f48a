//! Publish/subscribe: which subscriber (and so which runtime) listens to which resource.
//!
//! A subscription binds a resource URL (`<object>/changes`, `<url>/registration`, …) to a
//! subscriber address held by a runtime. A message addressed to a resource reaches each
//! subscribed runtime once. Subscriptions are decided by the PDP when made, and again for
//! every new policy revision (see `Bus::revalidate`); the durable copy is each runtime's
//! record in the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use super::router::Runtime;

/// One subscriber of a resource.
#[derive(Clone)]
pub struct Subscriber {
    /// The subscribing address (`body.source`, else the subscribing runtime).
    pub address: String,
    /// The runtime that receives the updates.
    pub runtime: Arc<Runtime>,
}

/// Resource → subscribers.
#[derive(Default)]
pub struct Subscriptions {
    by_resource: RwLock<HashMap<String, BTreeMap<String, Subscriber>>>,
}

impl Subscriptions {
    /// Adds (or replaces) `subscriber`'s subscription to `resource`.
    pub fn add(&self, resource: &str, subscriber: Subscriber) {
        self.by_resource
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(resource.to_string())
            .or_default()
            .insert(subscriber.address.clone(), subscriber);
    }

    /// Removes `address`'s subscription to `resource`; whether there was one.
    pub fn remove(&self, resource: &str, address: &str) -> bool {
        let mut map = self.by_resource.write().unwrap_or_else(|p| p.into_inner());
        let Some(subscribers) = map.get_mut(resource) else {
            return false;
        };
        let removed = subscribers.remove(address).is_some();
        if subscribers.is_empty() {
            map.remove(resource);
        }
        removed
    }

    /// Removes every subscription delivered to the runtime `url`.
    pub fn remove_runtime(&self, url: &str) {
        let mut map = self.by_resource.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, subscribers| {
            subscribers.retain(|_, s| s.runtime.url != url);
            !subscribers.is_empty()
        });
    }

    /// The subscribers of `resource` (empty when none).
    pub fn subscribers(&self, resource: &str) -> Vec<Subscriber> {
        self.by_resource
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(resource)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether anyone subscribed to `resource`.
    pub fn has_subscribers(&self, resource: &str) -> bool {
        self.by_resource
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(resource)
    }

    /// Every (resource, subscriber), for re-deciding after a policy change.
    pub fn all(&self) -> Vec<(String, Subscriber)> {
        self.by_resource
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flat_map(|(resource, subs)| subs.values().map(|s| (resource.clone(), s.clone())))
            .collect()
    }
}

/// Whether `url` names a topic: its last segment is `changes` or `registration`, or it is a
/// child collection (`<object>/children/<name>`). A topic reaches its subscribers only — with
/// none it reaches nobody, not the holder of the object it belongs to — and it is the only
/// kind of address that can be subscribed to while someone holds it.
pub fn is_topic(url: &str) -> bool {
    matches!(url.rsplit('/').next(), Some("changes" | "registration")) || url.contains("/children/")
}
