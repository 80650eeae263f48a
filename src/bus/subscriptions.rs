//! The subscription manager (`MN/sm`): `subscribe` decides each resource (`kind:
//! "subscription"`, at most `[bus] max_destinations` of them, each input carrying the
//! message's `id`/`type`/`from`/`to` but not its body) and binds all of them to the
//! subscriber, or none; `unsubscribe` removes
//! them; every held subscription is decided again when a new policy revision is active
//! ([`Bus::revalidate`]) and a revoked one is unsubscribed and told why. Only topics may be
//! subscribed to by others (see `pubsub::topic`); the durable copy is each runtime's record.

use std::sync::Arc;

use serde_json::{json, Value};

use super::connection::Connection;
use super::pubsub::{self, Subscriber};
use super::runtimes::Runtime;
use super::Bus;
use crate::persist::shares::{Charge, NODE};
use crate::policy::input::{Input, Subscription, SubscriptionInput, Totals};
use crate::rethink::message::url_problem;
use crate::rethink::{BusError, Message};

/// Most subscriptions one runtime may hold.
const MAX_SUBSCRIPTIONS_PER_RUNTIME: usize = 10_000;

impl Bus {
    /// Whether `runtime` may subscribe to `resource`: only topics reach subscribers; anything
    /// else reaches its holder, so only that holder may subscribe to it (a reporter listing
    /// its own object).
    fn may_subscribe(&self, resource: &str, runtime: &Arc<Runtime>) -> bool {
        pubsub::is_topic(resource)
            || self
                .inner
                .table
                .holder_of(resource)
                .is_some_and(|h| Arc::ptr_eq(&h, runtime))
    }

    /// The policy's view of `subscriber` (of `runtime`) subscribing to `resource`: the topic
    /// it is, and whose object it belongs to.
    fn subscription<'a>(
        &self,
        resource: &'a str,
        subscriber: &'a str,
        runtime: &Arc<Runtime>,
    ) -> Subscription<'a> {
        let (topic, object) = match pubsub::topic_of(resource) {
            Some((topic, object)) => (Some(topic.as_str()), object),
            None => (None, resource),
        };
        let holder = self.inner.table.holder_of(object);
        Subscription {
            resource,
            subscriber,
            topic,
            held_by_subscriber: holder.as_ref().is_some_and(|h| Arc::ptr_eq(h, runtime)),
            holder: holder.and_then(|h| h.user()),
        }
    }

    /// Subscribe: one decision per resource (`kind: "subscription"`); all allowed → all bound
    /// to the subscriber and stored, 200; any denied → none bound, 403 with every reason.
    pub(super) async fn subscribe(
        &self,
        conn: &Connection,
        message: &Message,
        turn: Option<super::owners::Turn<'_>>,
    ) -> Result<String, BusError> {
        let mut resources = message.body_strings("resources")?.unwrap_or_default();
        resources.extend(message.body_strings("subscribe")?.unwrap_or_default());
        if resources.is_empty() {
            return Err(BusError::BadRequest(
                "subscribe needs body.resources (or the legacy body.subscribe)".into(),
            ));
        }
        // Each resource is one decision: as many as one message may have destinations.
        let most = self.inner.config.max_destinations;
        if resources.len() > most {
            return Err(BusError::BadRequest(format!(
                "a subscribe may name at most {most} resources ([bus] max_destinations), not {}",
                resources.len()
            )));
        }
        // `body.source` when it names an address someone holds; one nobody holds (the
        // reference suite names its stub's URL) falls back to the runtime, as the reference
        // nodes do — what is published reaches this connection either way.
        let subscriber = message
            .body()
            .get("source")
            .and_then(Value::as_str)
            .filter(|source| self.inner.table.holder_of(source).is_some())
            .unwrap_or(conn.runtime.url.as_str())
            .to_string();
        let runtime = self
            .inner
            .table
            .holder_of(&subscriber)
            .filter(|r| Arc::ptr_eq(r, &conn.runtime))
            .ok_or_else(|| {
                BusError::Forbidden(format!(
                    "subscriber '{subscriber}' is not an address of this connection"
                ))
            })?;
        for resource in &resources {
            if let Some(problem) = url_problem("a subscribed resource", resource) {
                return Err(BusError::BadRequest(format!("subscribe: {problem}")));
            }
            if !self.may_subscribe(resource, &runtime) {
                return Err(BusError::Forbidden(format!(
                    "'{resource}' is not a topic (…/changes, …/registration, <object>/children/…): only its holder receives what is sent to it"
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        resources.retain(|resource| seen.insert(resource.clone()));
        // What the subscribe adds (a resource the runtime holds already is replaced), counted
        // in the principal's turn (see `owners::Turns`).
        let new: Vec<bool> = runtime.with_record(|r| {
            resources
                .iter()
                .map(|resource| !r.subscriptions.contains_key(resource))
                .collect()
        });
        let adds = new.iter().filter(|n| **n).count();
        if runtime.with_record(|r| r.subscriptions.len()) + adds > MAX_SUBSCRIPTIONS_PER_RUNTIME {
            return Err(BusError::Forbidden(format!(
                "a runtime may hold at most {MAX_SUBSCRIPTIONS_PER_RUNTIME} subscriptions"
            )));
        }
        let owner = conn.principal.owner();
        let held = self
            .inner
            .table
            .owner(&owner)
            .map_or(0, |h| h.subscriptions());
        let limit = self.inner.config.limits.subscriptions_per_principal;
        if held + adds > limit {
            self.inner.metrics.limited("subscriptions");
            return Err(BusError::Forbidden(format!(
                "this user holds {held} subscriptions (the limit is {limit})"
            )));
        }
        let mut reasons = Vec::new();
        let mut subject = self.subject(conn);
        subject.holds_from = Some(self.holds_from(conn, message));
        // What the principal holds: the subscriptions for the policy's limit, and the return
        // routes when the `from` may become one.
        let totals = self.totals(&owner, false);
        let context = self.context();
        // Each decision sees the message without its body (the resources are in
        // `subscription`): what is serialised and digested per resource stays small.
        let compact = json!({"id": message.id, "type": message.kind, "from": message.from,
            "to": message.value.get("to")});
        let mut counted = held;
        for (resource, new) in resources.iter().zip(&new) {
            subject.principal = Some(Totals {
                subscriptions: Some(counted),
                ..totals
            });
            counted += usize::from(*new);
            let input = Input::Subscription(SubscriptionInput {
                message: Some(&compact),
                subscription: self.subscription(resource, &subscriber, &runtime),
                subject: subject.clone(),
                context: context.clone(),
            });
            if let Err(e) = self.allowed(&input).await {
                reasons.push(e.to_string());
            }
        }
        if !reasons.is_empty() {
            reasons.sort();
            reasons.dedup();
            return Err(BusError::Forbidden(reasons.join("; ")));
        }
        self.check_from(conn, message).await?;
        let before = runtime.record().subscriptions;
        let record = runtime.update(|r| {
            for resource in &resources {
                r.subscriptions.insert(resource.clone(), subscriber.clone());
            }
        });
        // Placed in line in the principal's turn, which is given back before the write is
        // waited for: the subscriptions are counted, and the principal's other runtimes'
        // records go out with this one.
        let stored = match self.persist_queued(&runtime.url, &record) {
            Ok(stored) => stored,
            Err(e) => {
                runtime.update(|r| r.subscriptions = before);
                return Err(e);
            }
        };
        drop(turn);
        if let Err(e) = stored.await {
            runtime.update(|r| r.subscriptions = before);
            return Err(super::store_error(e));
        }
        for resource in &resources {
            self.inner.subscriptions.add(
                resource,
                Subscriber {
                    address: subscriber.clone(),
                    runtime: Arc::clone(&runtime),
                },
            );
        }
        self.inner.metrics.count("component");
        Ok(message.response(200, "subscribed", Some(json!({"subscribed": resources}))))
    }

    /// Unsubscribe: removes the runtime's subscriptions to `body.resources` (those it does not
    /// hold are ignored), 200 with the removed ones.
    pub(super) async fn unsubscribe(
        &self,
        conn: &Connection,
        message: &Message,
    ) -> Result<String, BusError> {
        if !message.kind_is("unsubscribe") {
            return Err(BusError::BadRequest(format!(
                "the subscription manager answers subscribe and unsubscribe, not '{}'",
                message.kind
            )));
        }
        let mut resources = message.body_strings("resources")?.unwrap_or_default();
        resources.extend(message.body_strings("unsubscribe")?.unwrap_or_default());
        if resources.is_empty() {
            return Err(BusError::BadRequest(
                "unsubscribe needs body.resources (or the legacy body.unsubscribe)".into(),
            ));
        }
        let record = conn.runtime.record();
        let mut removed = Vec::new();
        for resource in &resources {
            if record.subscriptions.contains_key(resource) {
                self.inner.subscriptions.remove(resource, &conn.runtime.url);
                removed.push(resource.clone());
            }
        }
        let record = conn.runtime.update(|r| {
            for resource in &removed {
                r.subscriptions.remove(resource);
            }
        });
        self.persist(&conn.runtime.url, &record).await?;
        self.inner.metrics.count("component");
        Ok(message.response(200, "unsubscribed", Some(json!({"unsubscribed": removed}))))
    }

    /// Adds the subscriptions in `runtime`'s record to the fan-out.
    pub(super) fn subscribe_stored(&self, runtime: &Arc<Runtime>) {
        let (url, subscriptions) =
            runtime.with_record(|r| (runtime.url.clone(), r.subscriptions.clone()));
        for (resource, subscriber) in subscriptions {
            if !self.may_subscribe(&resource, runtime) {
                tracing::warn!(%resource, runtime = %url, "stored subscription to a non-topic not restored");
                continue;
            }
            self.inner.subscriptions.add(
                &resource,
                Subscriber {
                    address: subscriber,
                    runtime: Arc::clone(runtime),
                },
            );
        }
    }

    /// Re-decides every subscription now.
    pub async fn revalidate(&self) {
        for (resource, subscriber) in self.inner.subscriptions.all() {
            if self.held_elsewhere(&subscriber.runtime) {
                continue; // that replica re-decides it
            }
            let input = Input::Subscription(SubscriptionInput {
                message: None,
                subscription: self.subscription(
                    &resource,
                    &subscriber.address,
                    &subscriber.runtime,
                ),
                subject: (*subscriber.runtime.subject()).clone(),
                context: self.context(),
            });
            let Err(reason) = self.allowed(&input).await else {
                continue;
            };
            self.inner
                .subscriptions
                .remove(&resource, &subscriber.runtime.url);
            let record = subscriber.runtime.update(|r| {
                r.subscriptions.remove(&resource);
            });
            if let Err(e) = self.persist(&subscriber.runtime.url, &record).await {
                tracing::warn!(%e, runtime = %subscriber.runtime.url, "cannot store a revoked subscription");
            }
            tracing::info!(%resource, subscriber = %subscriber.address, %reason, "subscription revoked by a policy change");
            self.inner.metrics.count("revoked");
            self.publish(json!({
                "type": "unsubscribe",
                "from": self.inner.nodes.subscription_manager,
                "to": subscriber.address,
                "body": {"resources": [resource], "code": 403, "description": reason.to_string()},
            }), &Charge::from(NODE))
            .await;
        }
    }
}
