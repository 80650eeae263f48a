//! Publish/subscribe: which subscriber (and so which runtime) listens to which resource.
//!
//! A subscription binds a resource URL (`<object>/changes`, `<url>/registration`, …) to a
//! subscriber address held by a runtime. A message addressed to a resource reaches each
//! subscribed runtime once. Subscriptions are decided by the PDP when made, and again for
//! every new policy revision (see `Bus::revalidate`); the durable copy is each runtime's
//! record in the store.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use super::runtimes::Runtime;

/// One subscriber of a resource.
#[derive(Clone)]
pub struct Subscriber {
    /// The subscribing address (`body.source`, else the subscribing runtime).
    pub address: String,
    /// The runtime that receives the updates.
    pub runtime: Arc<Runtime>,
}

/// Resource → subscribing runtime URL → its subscriber.
///
/// Invariant: the index mirrors the runtimes' records, which keep one subscriber per
/// resource: a runtime is in a resource's map at most once, so a new `body.source` for a
/// resource replaces the runtime's entry instead of adding one beside it (the count the
/// limits see is the count the fan-out serves). Each runtime's resources are indexed too,
/// so releasing a runtime costs its own subscriptions, not every resource's.
#[derive(Default)]
pub struct Subscriptions {
    index: RwLock<Index>,
}

#[derive(Default)]
struct Index {
    by_resource: HashMap<String, BTreeMap<String, Subscriber>>,
    /// Runtime URL → the resources it subscribes to.
    by_runtime: HashMap<String, BTreeSet<String>>,
}

impl Index {
    fn remove(&mut self, resource: &str, runtime: &str) -> bool {
        let Some(subscribers) = self.by_resource.get_mut(resource) else {
            return false;
        };
        let removed = subscribers.remove(runtime).is_some();
        if subscribers.is_empty() {
            self.by_resource.remove(resource);
        }
        if let Some(resources) = self.by_runtime.get_mut(runtime) {
            resources.remove(resource);
            if resources.is_empty() {
                self.by_runtime.remove(runtime);
            }
        }
        removed
    }
}

impl Subscriptions {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or replaces) the subscription of `subscriber`'s runtime to `resource`.
    pub fn add(&self, resource: &str, subscriber: Subscriber) {
        let mut index = self.write();
        index
            .by_runtime
            .entry(subscriber.runtime.url.clone())
            .or_default()
            .insert(resource.to_string());
        index
            .by_resource
            .entry(resource.to_string())
            .or_default()
            .insert(subscriber.runtime.url.clone(), subscriber);
    }

    /// Removes the subscription of the runtime `runtime` to `resource`; whether there was
    /// one.
    pub fn remove(&self, resource: &str, runtime: &str) -> bool {
        self.write().remove(resource, runtime)
    }

    /// Removes every subscription delivered to the runtime `url`.
    pub fn remove_runtime(&self, url: &str) {
        let mut index = self.write();
        let resources = index.by_runtime.remove(url).unwrap_or_default();
        for resource in resources {
            index.remove(&resource, url);
        }
    }

    /// The subscribers of `resource` (empty when none).
    pub fn subscribers(&self, resource: &str) -> Vec<Subscriber> {
        self.read()
            .by_resource
            .get(resource)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every (resource, subscriber), for re-deciding after a policy change.
    pub fn all(&self) -> Vec<(String, Subscriber)> {
        self.read()
            .by_resource
            .iter()
            .flat_map(|(resource, subs)| subs.values().map(|s| (resource.clone(), s.clone())))
            .collect()
    }
}

/// What kind of topic `url` is, if any. Only data objects (`comm`, `connection`, `ctxt`,
/// `context`) have `changes` and `children`; any address has `registration` (status
/// published by the registry). A hyperty's or runtime's `…/changes` or `…/children/…` is
/// not a topic: it goes to their holder.
pub fn topic(url: &str) -> Option<Topic> {
    topic_of(url).map(|(kind, _)| kind)
}

/// The topic `url` is and the address it is a topic of (`comm://d/x/changes` →
/// `comm://d/x`).
pub fn topic_of(url: &str) -> Option<(Topic, &str)> {
    let object = matches!(
        crate::rethink::address::scheme(url).as_deref(),
        Some("comm" | "connection" | "ctxt" | "context")
    );
    let (scheme_end, rest) = url.find("://").map(|i| (i + 3, &url[i + 3..]))?;
    let segments: Vec<&str> = rest.split('/').collect();
    // authority, object id, then the sub-resource
    let kind = match segments.as_slice() {
        [_, _, "registration"] => Topic::Registration,
        [_, _, "changes"] if object => Topic::Changes,
        [_, _, "children", _, ..] if object => Topic::Children,
        _ => return None,
    };
    let base_len = scheme_end + segments[0].len() + 1 + segments[1].len();
    Some((kind, &url[..base_len]))
}

/// The kinds of topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// `<object>/changes`: the holder publishes, subscribers receive; with none, nobody.
    Changes,
    /// `<address>/registration`: the registry (or the holder) publishes status changes;
    /// subscribers receive; with none, nobody.
    Registration,
    /// `<object>/children/…`: the object's holder (the reporter) always receives, and so do
    /// its subscribers.
    Children,
}

impl Topic {
    /// The name policies see (`subscription.topic`, `targets[].topic`).
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Changes => "changes",
            Topic::Registration => "registration",
            Topic::Children => "children",
        }
    }

    /// Whether only the object's holder (or the node) may send to it.
    pub fn holder_publishes(self) -> bool {
        matches!(self, Topic::Changes | Topic::Registration)
    }
}

/// Whether `url` is a topic (see [`topic`]): the only addresses others may subscribe to.
pub fn is_topic(url: &str) -> bool {
    topic(url).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_subscribes_to_a_resource_once_whatever_its_source() {
        let subscriptions = Subscriptions::default();
        let table = super::super::runtimes::Table::default();
        let runtime = table.runtime("runtime://d/r", Default::default);
        for source in ["runtime://d/r", "runtime://d/r/1", "runtime://d/r/2"] {
            subscriptions.add(
                "comm://d/x/changes",
                Subscriber {
                    address: source.into(),
                    runtime: Arc::clone(&runtime),
                },
            );
        }
        let now = subscriptions.subscribers("comm://d/x/changes");
        assert_eq!(now.len(), 1);
        assert_eq!(
            now[0].address, "runtime://d/r/2",
            "the last source replaced the rest"
        );
        assert!(subscriptions.remove("comm://d/x/changes", "runtime://d/r"));
        assert!(subscriptions.all().is_empty());
    }

    #[test]
    fn releasing_a_runtime_removes_its_subscriptions_only() {
        let subscriptions = Subscriptions::default();
        let table = super::super::runtimes::Table::default();
        let (r, s) = (
            table.runtime("runtime://d/r", Default::default),
            table.runtime("runtime://d/s", Default::default),
        );
        for n in 0..100 {
            for runtime in [&r, &s] {
                subscriptions.add(
                    &format!("comm://d/{n}/changes"),
                    Subscriber {
                        address: runtime.url.clone(),
                        runtime: Arc::clone(runtime),
                    },
                );
            }
        }
        subscriptions.remove_runtime("runtime://d/r");
        let left = subscriptions.all();
        assert_eq!(left.len(), 100);
        assert!(left
            .iter()
            .all(|(_, sub)| sub.runtime.url == "runtime://d/s"));
        subscriptions.remove_runtime("runtime://d/s");
        let index = subscriptions.read();
        assert!(index.by_resource.is_empty() && index.by_runtime.is_empty());
    }

    #[test]
    fn topics() {
        assert_eq!(topic("comm://d/x/changes"), Some(Topic::Changes));
        assert_eq!(
            topic("hyperty://d/h/registration"),
            Some(Topic::Registration)
        );
        assert_eq!(topic("comm://d/x/children/chat"), Some(Topic::Children));
        assert_eq!(topic("comm://d/x/children/chat/1"), Some(Topic::Children));
        assert_eq!(topic("hyperty://d/h/changes"), None);
        assert_eq!(topic("hyperty://d/h/children/x"), None);
        assert_eq!(topic("runtime://d/r/children/x"), None);
        assert_eq!(topic("comm://d/x/subscription"), None);
        assert_eq!(topic("comm://d/x"), None);
        assert_eq!(topic("comm://d/x/y/changes"), None);
        assert_eq!(
            topic_of("comm://d/x/children/chat/1"),
            Some((Topic::Children, "comm://d/x"))
        );
        assert_eq!(
            topic_of("hyperty://d/h/registration"),
            Some((Topic::Registration, "hyperty://d/h"))
        );
        assert_eq!(topic_of("mn:/session"), None);
    }
}
