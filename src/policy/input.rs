//! The policy input contract: the one document every decision is asked with, as
//! `schemas/input.schema.json` describes it. Every enforcement point builds its inputs here,
//! from typed values, and nowhere else; the schema test below builds every kind of input
//! the node makes and checks it against the schema and against the exact JSON the shipped
//! policies read.
//!
//! Kinds: `message` (a reTHINK message, with `targets` — what each `to` is — and
//! `allocation` for allocation requests), `claim` (a principal taking an address nobody
//! holds, a runtime URL at the handshake),
//! `subscription` (one resource of a subscribe request, or a re-decision of a held
//! subscription), `matrix_event` (an event a Matrix client or the homeserver would create)
//! and `membership` (a membership change). Absent optional fields are left out, never
//! `null`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::pdp::cache::{KeyWriter, Keyed};
use crate::pdp::TypedInput;

/// One decision's input document.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Input<'a> {
    /// A reTHINK message from a connection.
    Message(MessageInput<'a>),
    /// A principal taking an address no one holds yet (a runtime URL at the handshake).
    Claim(ClaimInput),
    /// One subscription.
    Subscription(SubscriptionInput<'a>),
    /// A Matrix event.
    MatrixEvent(MatrixEventInput),
    /// A Matrix membership change.
    Membership(MembershipInput),
}

impl Input<'_> {
    /// The document as JSON (what a remote PDP receives).
    pub fn to_value(&self) -> Value {
        // These types serialise to JSON infallibly (string keys, no custom serialisers).
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The document as regorus evaluates it, built from the typed fields: the same document
    /// as [`Input::to_value`] without writing JSON in between (what the in-process PDP
    /// evaluates). The received message is the one part that is converted from JSON.
    pub fn to_rego(&self) -> regorus::Value {
        let mut doc = Doc::default();
        match self {
            Input::Message(m) => {
                doc.put("kind", "message");
                doc.put("message", json(m.message));
                doc.put("subject", m.subject.to_rego());
                doc.put("context", m.context.to_rego());
                doc.put("targets", list(&m.targets, Target::to_rego));
                if let Some(allocation) = &m.allocation {
                    doc.put("allocation", allocation.to_rego());
                }
            }
            Input::Claim(c) => {
                doc.put("kind", "claim");
                let mut claim = Doc::default();
                claim.put("address", c.claim.address.as_str());
                claim.put("kind", c.claim.kind);
                claim.opt("domain", c.claim.domain.as_deref());
                doc.put("claim", claim);
                doc.put("subject", c.subject.to_rego());
                doc.put("context", c.context.to_rego());
            }
            Input::Subscription(s) => {
                doc.put("kind", "subscription");
                if let Some(message) = s.message {
                    doc.put("message", json(message));
                }
                let sub = &s.subscription;
                let mut subscription = Doc::default();
                subscription.put("resource", sub.resource);
                subscription.put("subscriber", sub.subscriber);
                subscription.opt("topic", sub.topic);
                subscription.opt("holder", sub.holder.as_deref());
                subscription.put("held_by_subscriber", sub.held_by_subscriber);
                doc.put("subscription", subscription);
                doc.put("subject", s.subject.to_rego());
                doc.put("context", s.context.to_rego());
            }
            Input::MatrixEvent(e) => {
                doc.put("kind", "matrix_event");
                let mut matrix = Doc::default();
                matrix.put("room_id", e.matrix.room_id.as_str());
                matrix.put("event_type", e.matrix.event_type.as_str());
                matrix.put("sender", e.matrix.sender.as_str());
                matrix.put("content", json(&e.matrix.content));
                matrix.opt("state_key", e.matrix.state_key.as_deref());
                e.matrix.door.put_into(&mut matrix);
                doc.put("matrix", matrix);
                doc.put("context", e.context.to_rego());
            }
            Input::Membership(m) => {
                doc.put("kind", "membership");
                let mut matrix = Doc::default();
                matrix.put("room_id", m.matrix.room_id.as_str());
                matrix.put("event_type", m.matrix.event_type);
                matrix.put("sender", m.matrix.sender.as_str());
                matrix.put("membership", m.matrix.membership.as_str());
                matrix.put("target", m.matrix.target.as_str());
                matrix.put(
                    "room_members",
                    list(&m.matrix.room_members, |s| s.as_str().into()),
                );
                m.matrix.door.put_into(&mut matrix);
                doc.put("matrix", matrix);
                doc.put("context", m.context.to_rego());
            }
        }
        doc.into()
    }
}

impl TypedInput for Input<'_> {
    fn to_rego(&self) -> regorus::Value {
        Input::to_rego(self)
    }
    fn to_value(&self) -> Value {
        Input::to_value(self)
    }
}

/// The cache key's canonical form, written from the typed fields (keys in byte order) as the
/// JSON form would be: a cache hit builds neither the JSON nor regorus's value. The schema
/// test below checks that every kind of input has the form of its JSON.
impl Keyed for Input<'_> {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.object(|o| match self {
            Input::Message(m) => {
                o.opt("allocation", m.allocation.as_ref())
                    .field("context", &m.context)
                    .field("kind", "message")
                    .field("message", m.message)
                    .field("subject", &m.subject)
                    .field("targets", &m.targets);
            }
            Input::Claim(c) => {
                o.field("claim", &c.claim)
                    .field("context", &c.context)
                    .field("kind", "claim")
                    .field("subject", &c.subject);
            }
            Input::Subscription(s) => {
                o.field("context", &s.context)
                    .field("kind", "subscription")
                    .opt("message", s.message)
                    .field("subject", &s.subject)
                    .field("subscription", &s.subscription);
            }
            Input::MatrixEvent(e) => {
                o.field("context", &e.context)
                    .field("kind", "matrix_event")
                    .field("matrix", &e.matrix);
            }
            Input::Membership(m) => {
                o.field("context", &m.context)
                    .field("kind", "membership")
                    .field("matrix", &m.matrix);
            }
        });
    }
}

impl Keyed for Claim {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.object(|o| {
            o.field("address", &self.address)
                .opt("domain", self.domain.as_ref())
                .field("kind", self.kind);
        });
    }
}

impl Keyed for Subscription<'_> {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.object(|o| {
            o.field("held_by_subscriber", &self.held_by_subscriber)
                .opt("holder", self.holder.as_ref())
                .field("resource", self.resource)
                .field("subscriber", self.subscriber)
                .opt("topic", self.topic);
        });
    }
}

impl Keyed for MatrixEvent {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        let door = &self.door;
        out.object(|o| {
            o.field("content", &self.content)
                .opt("event_id", door.event_id.as_ref())
                .field("event_type", &self.event_type)
                .opt("origin", door.origin.as_ref())
                .field("room_id", &self.room_id)
                .field("sender", &self.sender)
                .opt("state_key", self.state_key.as_ref())
                .opt("via", door.via.map(Via::name));
        });
    }
}

impl Keyed for Membership {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        let door = &self.door;
        out.object(|o| {
            o.opt("event_id", door.event_id.as_ref())
                .field("event_type", self.event_type)
                .field("membership", &self.membership)
                .opt("origin", door.origin.as_ref())
                .field("room_id", &self.room_id)
                .field("room_members", &self.room_members)
                .field("sender", &self.sender)
                .field("target", &self.target)
                .opt("via", door.via.map(Via::name));
        });
    }
}

impl Keyed for Subject {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.object(|o| {
            o.field("authenticated", &self.authenticated)
                .opt("holds_from", self.holds_from.as_ref())
                .opt("identity", self.identity.as_ref())
                .opt("network_server", self.network_server.as_ref())
                .opt("peer", self.peer.as_ref())
                .opt("principal", self.principal.as_ref())
                .field("runtime", &self.runtime)
                .opt("user", self.user.as_ref());
        });
    }
}

impl Keyed for Totals {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.object(|o| {
            o.field("addresses", &self.addresses)
                .field("foreign_routes", &self.foreign_routes)
                .opt("registry_entries", self.registry_entries.as_ref())
                .field("runtimes", &self.runtimes)
                .opt("subscriptions", self.subscriptions.as_ref());
        });
    }
}

impl Keyed for Target {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.object(|o| {
            o.field("address", &self.address)
                .field("held_by_sender", &self.held_by_sender)
                .opt("topic", self.topic);
        });
    }
}

impl Keyed for Context {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.object(|o| {
            o.field("node", &self.node).field("time", &self.time);
        });
    }
}

impl Keyed for Allocation {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.object(|o| {
            o.field("action", self.action.name())
                .field("held", &self.held)
                .field("number", &self.number)
                .opt("scheme", self.scheme.as_ref());
        });
    }
}

/// An object being built for regorus.
#[derive(Default)]
struct Doc(BTreeMap<regorus::Value, regorus::Value>);

impl Doc {
    fn put(&mut self, key: &str, value: impl Into<regorus::Value>) {
        self.0.insert(key.into(), value.into());
    }

    /// Absent fields are left out, as in the JSON form.
    fn opt(&mut self, key: &str, value: Option<impl Into<regorus::Value>>) {
        if let Some(value) = value {
            self.put(key, value);
        }
    }
}

impl From<Doc> for regorus::Value {
    fn from(doc: Doc) -> Self {
        regorus::Value::from(doc.0)
    }
}

fn json(value: &Value) -> regorus::Value {
    // Deserialising from a reference: no copy of the JSON first.
    <regorus::Value as serde::Deserialize>::deserialize(value).unwrap_or(regorus::Value::Null)
}

fn list<T>(items: &[T], each: impl Fn(&T) -> regorus::Value) -> regorus::Value {
    regorus::Value::from(items.iter().map(each).collect::<Vec<_>>())
}

impl Subject {
    fn to_rego(&self) -> regorus::Value {
        let mut doc = Doc::default();
        doc.opt("user", self.user.as_deref());
        doc.put("runtime", self.runtime.as_str());
        doc.opt("holds_from", self.holds_from);
        doc.put("authenticated", self.authenticated);
        doc.opt("identity", self.identity.as_deref());
        doc.opt("network_server", self.network_server.as_deref());
        doc.opt("peer", self.peer.as_deref());
        if let Some(totals) = &self.principal {
            let mut principal = Doc::default();
            principal.put("runtimes", totals.runtimes);
            principal.put("addresses", totals.addresses);
            principal.put("foreign_routes", totals.foreign_routes);
            principal.opt("registry_entries", totals.registry_entries);
            principal.opt("subscriptions", totals.subscriptions);
            doc.put("principal", principal);
        }
        doc.into()
    }
}

impl Door {
    /// Its fields, flattened into the event's object as in the JSON form.
    fn put_into(&self, doc: &mut Doc) {
        doc.opt("via", self.via.map(Via::name));
        doc.opt("origin", self.origin.as_deref());
        doc.opt("event_id", self.event_id.as_deref());
    }
}

impl Target {
    fn to_rego(&self) -> regorus::Value {
        let mut doc = Doc::default();
        doc.put("address", self.address.as_str());
        doc.opt("topic", self.topic);
        doc.put("held_by_sender", self.held_by_sender);
        doc.into()
    }
}

impl Context {
    fn to_rego(&self) -> regorus::Value {
        let mut doc = Doc::default();
        doc.put("node", self.node.as_str());
        doc.put("time", self.time.as_str());
        doc.into()
    }
}

impl Allocation {
    fn to_rego(&self) -> regorus::Value {
        let mut doc = Doc::default();
        doc.put("action", self.action.name());
        doc.opt("scheme", self.scheme.as_deref());
        doc.put("number", self.number);
        doc.put("held", self.held);
        doc.into()
    }
}

/// `kind: "message"`.
#[derive(Debug, Clone, Serialize)]
pub struct MessageInput<'a> {
    /// The message as received (the whole JSON object).
    pub message: &'a Value,
    /// The sending connection.
    pub subject: Subject,
    /// When and where.
    pub context: Context,
    /// What each `to` is, as the node knows it.
    pub targets: Vec<Target>,
    /// For a request to an address-allocation component.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Allocation>,
}

/// One `to` of a message, as the node knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// The address.
    pub address: String,
    /// `changes`, `registration` or `children` when it is a topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<&'static str>,
    /// Whether the sender holds the address (for a topic: the address it is a topic of).
    pub held_by_sender: bool,
}

/// `kind: "claim"`.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimInput {
    /// What is claimed.
    pub claim: Claim,
    /// Who claims it (with what its principal holds, for the limits).
    pub subject: Subject,
    /// When and where.
    pub context: Context,
}

/// An address a principal takes for good.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Claim {
    /// The address.
    pub address: String,
    /// What is claimed: `runtime` (a runtime URL, at a socket's handshake),
    /// `runtime_address` (a `from` under a runtime scheme of the node's domain that nobody
    /// holds, on first use), `hyperty` (a hyperty address of the node's domain used as a
    /// `from` before anybody held it) or `identity` (a `user://` identity a registration
    /// names but the connection did not verify).
    pub kind: &'static str,
    /// The address's domain (absent when it has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// `kind: "subscription"`.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionInput<'a> {
    /// The subscribe request; absent when a held subscription is re-decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a Value>,
    /// What is subscribed to, by whom.
    pub subscription: Subscription<'a>,
    /// The subscribing connection (its runtime, when re-decided).
    pub subject: Subject,
    /// When and where.
    pub context: Context,
}

/// One resource of a subscription.
#[derive(Debug, Clone, Serialize)]
pub struct Subscription<'a> {
    /// The topic URL (`comm://D/x/changes`).
    pub resource: &'a str,
    /// The address that receives what is published (`body.source`, else the runtime).
    pub subscriber: &'a str,
    /// `changes`, `registration` or `children` (absent: not a topic, the subscriber's own
    /// address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<&'static str>,
    /// Whose object the resource belongs to: the owner of the runtime holding it (a Matrix
    /// user id, `network-server:<name>` or `peer:<domain>`); absent when no runtime here
    /// holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// Whether the subscribing runtime holds that object itself.
    pub held_by_subscriber: bool,
}

/// `kind: "matrix_event"`.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixEventInput {
    /// The event.
    pub matrix: MatrixEvent,
    /// When and where.
    pub context: Context,
}

/// A Matrix event as it would be created.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MatrixEvent {
    /// Its room (`""`: none yet, or every room of the sender).
    pub room_id: String,
    /// Its type.
    pub event_type: String,
    /// Who sends it.
    pub sender: String,
    /// Its content.
    pub content: Value,
    /// For state events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_key: Option<String>,
    /// Which door the event came through, when it was not the proxy or the appservice.
    #[serde(flatten)]
    pub door: Door,
}

/// How an event reached the node, for the doors that say more than the event itself: a
/// homeserver asking the node's policy server (`via: "policy_server"`) names itself and the
/// event. Empty (no fields) for the proxy and the appservice.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Door {
    /// `policy_server`: a homeserver asked before accepting the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
    /// The homeserver that asked (authenticated by its federation signature).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The event's id (computed from the event by its room version's rules).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

/// The doors of `matrix.via`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// A homeserver asked the node's policy server (MSC4284) to sign the event.
    PolicyServer,
}

impl Via {
    /// Its name in the input.
    fn name(self) -> &'static str {
        match self {
            Via::PolicyServer => "policy_server",
        }
    }
}

/// `kind: "membership"`.
#[derive(Debug, Clone, Serialize)]
pub struct MembershipInput {
    /// The change.
    pub matrix: Membership,
    /// When and where.
    pub context: Context,
}

/// A membership change, as the room will record it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Membership {
    /// The room (`""` for a room being created).
    pub room_id: String,
    /// Always `m.room.member`.
    pub event_type: &'static str,
    /// Who makes the change.
    pub sender: String,
    /// `invite`, `join`, `leave`, `ban` or `knock`.
    pub membership: String,
    /// Whose membership changes.
    pub target: String,
    /// The room's joined members, when the enforcement point knows them.
    pub room_members: Vec<String>,
    /// Which door the change came through (see [`Door`]).
    #[serde(flatten)]
    pub door: Door,
}

impl Membership {
    /// `sender` makes `target`'s membership in `room_id` be `membership`.
    pub fn new(
        room_id: &str,
        sender: &str,
        membership: &str,
        target: &str,
        room_members: Vec<String>,
    ) -> Self {
        Self {
            room_id: room_id.to_string(),
            event_type: "m.room.member",
            sender: sender.to_string(),
            membership: membership.to_string(),
            target: target.to_string(),
            room_members,
            door: Door::default(),
        }
    }
}

/// Who asks: the authenticated connection and its runtime.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Subject {
    /// The Matrix user the connection authenticated as (absent for network servers and
    /// peer nodes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The runtime URL of the connection.
    pub runtime: String,
    /// Whether the connection holds the message's `from` (or the address it is a
    /// sub-resource of): a peer node holds its own domain's addresses. Kinds message and
    /// subscription; one flag, however many addresses the runtime holds (the policy's
    /// anti-spoofing rule reads it; the node enforces the same rule itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holds_from: Option<bool>,
    /// Whether the connection authenticated (always, once connected).
    pub authenticated: bool,
    /// The identity the connection asserted and the IdM verified (`user://idp/name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The Network Server connector the connection is, by its configured name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_server: Option<String>,
    /// The peer node's domain, for messages another domain's node sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// What the principal holds across all its runtimes (for the decisions that add to it:
    /// claims, allocations, registrations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<Totals>,
}

/// What one principal holds across all its runtimes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Runtime URLs it owns.
    pub runtimes: usize,
    /// Addresses allocated to its runtimes.
    pub addresses: usize,
    /// Foreign addresses its runtimes use as return routes.
    pub foreign_routes: usize,
    /// Entries its runtimes registered in the built-in registry (absent with a domain
    /// registry, which the node does not count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_entries: Option<usize>,
    /// Subscriptions its runtimes hold, counting the resources of this subscribe before
    /// the one decided (only for subscription decisions of a subscribe).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriptions: Option<usize>,
}

/// When and where a decision is asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Context {
    /// The node's domain (its Matrix server name).
    pub node: String,
    /// Now, RFC 3339 in UTC.
    pub time: String,
}

impl Context {
    /// The context of a decision asked now at the node of `node`.
    pub fn now(node: &str) -> Self {
        Self {
            node: node.to_string(),
            time: crate::clock::now_rfc3339(),
        }
    }
}

/// What an allocation request asks (kind `message`, to an allocation component).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// `create` or `delete`.
    pub action: AllocationAction,
    /// The scheme of the addresses (create only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// How many addresses are allocated or released.
    pub number: u64,
    /// How many addresses the runtime holds already.
    pub held: usize,
}

/// The two allocation actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocationAction {
    /// Allocate.
    Create,
    /// Release.
    Delete,
}

impl AllocationAction {
    /// Its name in the input.
    fn name(self) -> &'static str {
        match self {
            AllocationAction::Create => "create",
            AllocationAction::Delete => "delete",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::pdp::cache::DecisionCache;
    use crate::pdp::schema::Schemas;

    fn schemas() -> Schemas {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let bindings: std::collections::BTreeMap<String, String> =
            [("msgnode".to_string(), "input.schema.json".to_string())].into();
        Schemas::load(&dir, &bindings).expect("schemas")
    }

    fn context() -> Context {
        Context {
            node: "localhost".into(),
            time: "2026-11-25T09:00:00Z".into(),
        }
    }

    fn subject() -> Subject {
        Subject {
            user: Some("@alice:localhost".into()),
            runtime: "runtime://localhost/1".into(),
            holds_from: Some(true),
            authenticated: true,
            ..Subject::default()
        }
    }

    fn targets() -> Vec<Target> {
        vec![
            Target {
                address: "hyperty://localhost/b".into(),
                topic: None,
                held_by_sender: false,
            },
            Target {
                address: "comm://localhost/x/changes".into(),
                topic: Some("changes"),
                held_by_sender: true,
            },
        ]
    }

    fn targets_json() -> Value {
        json!([{"address": "hyperty://localhost/b", "held_by_sender": false},
               {"address": "comm://localhost/x/changes", "topic": "changes", "held_by_sender": true}])
    }

    fn totals() -> Totals {
        Totals {
            runtimes: 2,
            addresses: 7,
            foreign_routes: 0,
            registry_entries: Some(1),
            subscriptions: None,
        }
    }

    fn context_json() -> Value {
        json!({"node": "localhost", "time": "2026-11-25T09:00:00Z"})
    }

    fn subject_json() -> Value {
        json!({"runtime": "runtime://localhost/1", "holds_from": true,
               "authenticated": true, "user": "@alice:localhost"})
    }

    fn message_input<'a>(
        message: &'a Value,
        subject: Subject,
        targets: Vec<Target>,
        allocation: Option<Allocation>,
    ) -> Input<'a> {
        Input::Message(MessageInput {
            message,
            subject,
            context: context(),
            targets,
            allocation,
        })
    }

    /// Every kind of input the node builds: validates against the schema, and its JSON is
    /// exactly the document the shipped policies read.
    #[test]
    fn every_input_matches_the_schema_and_the_policies_contract() {
        let schemas = schemas();
        let message = json!({"id": 1, "type": "create", "from": "hyperty://localhost/a",
                             "to": "hyperty://localhost/b", "body": {"value": {}}});
        let subscribe = json!({"id": 2, "type": "subscribe", "from": "runtime://localhost/1/sm",
                               "to": "domain://msg-node.localhost/sm",
                               "body": {"resources": ["comm://localhost/x/changes"]}});
        let content = json!({"msgtype": "m.text", "body": "hi"});
        let members = vec!["@alice:localhost".to_string()];
        let network_server = Subject {
            runtime: "runtime://localhost/ns".into(),
            authenticated: true,
            identity: Some("user://localhost/alice".into()),
            network_server: Some("gateway".into()),
            ..Subject::default()
        };
        let peer = Subject {
            runtime: "domain://msg-node.peer.example".into(),
            holds_from: Some(true),
            authenticated: true,
            peer: Some("peer.example".into()),
            ..Subject::default()
        };
        let mut with_totals = subject_json();
        with_totals["principal"] =
            json!({"runtimes": 2, "addresses": 7, "foreign_routes": 0, "registry_entries": 1});
        let subscription = |topic, holder: Option<&str>, held| Subscription {
            resource: "comm://localhost/x/changes",
            subscriber: "runtime://localhost/1",
            topic,
            holder: holder.map(str::to_string),
            held_by_subscriber: held,
        };
        let cases: Vec<(&str, Input, Value)> = vec![
            (
                "message",
                message_input(&message, subject(), targets(), None),
                json!({"kind": "message", "message": message, "context": context_json(),
                       "targets": targets_json(), "subject": subject_json()}),
            ),
            (
                "message from a network server with an identity",
                message_input(&message, network_server, vec![], None),
                json!({"kind": "message", "message": message, "context": context_json(), "targets": [],
                       "subject": {"runtime": "runtime://localhost/ns", "authenticated": true,
                                   "identity": "user://localhost/alice", "network_server": "gateway"}}),
            ),
            (
                "message from a peer node",
                message_input(&message, peer, vec![], None),
                json!({"kind": "message", "message": message, "context": context_json(), "targets": [],
                       "subject": {"runtime": "domain://msg-node.peer.example", "holds_from": true,
                                   "authenticated": true, "peer": "peer.example"}}),
            ),
            (
                "allocation create, with what the principal holds",
                message_input(
                    &message,
                    Subject {
                        principal: Some(totals()),
                        ..subject()
                    },
                    vec![],
                    Some(Allocation {
                        action: AllocationAction::Create,
                        scheme: Some("hyperty".into()),
                        number: 3,
                        held: 2,
                    }),
                ),
                json!({"kind": "message", "message": message, "context": context_json(), "targets": [],
                       "subject": with_totals,
                       "allocation": {"action": "create", "scheme": "hyperty", "number": 3, "held": 2}}),
            ),
            (
                "allocation delete",
                message_input(
                    &message,
                    subject(),
                    vec![],
                    Some(Allocation {
                        action: AllocationAction::Delete,
                        scheme: None,
                        number: 1,
                        held: 2,
                    }),
                ),
                json!({"kind": "message", "message": message, "context": context_json(), "targets": [],
                       "subject": subject_json(), "allocation": {"action": "delete", "number": 1, "held": 2}}),
            ),
            (
                "subscription to another holder's object",
                Input::Subscription(SubscriptionInput {
                    message: Some(&subscribe),
                    subscription: subscription(Some("changes"), Some("@carol:localhost"), false),
                    subject: subject(),
                    context: context(),
                }),
                json!({"kind": "subscription", "message": subscribe, "context": context_json(),
                       "subscription": {"resource": "comm://localhost/x/changes", "subscriber": "runtime://localhost/1",
                                        "topic": "changes", "holder": "@carol:localhost", "held_by_subscriber": false},
                       "subject": subject_json()}),
            ),
            (
                "subscription re-decided",
                Input::Subscription(SubscriptionInput {
                    message: None,
                    subscription: subscription(Some("changes"), None, false),
                    subject: subject(),
                    context: context(),
                }),
                json!({"kind": "subscription", "context": context_json(),
                       "subscription": {"resource": "comm://localhost/x/changes", "subscriber": "runtime://localhost/1",
                                        "topic": "changes", "held_by_subscriber": false},
                       "subject": subject_json()}),
            ),
            (
                "claim of a runtime URL",
                Input::Claim(ClaimInput {
                    claim: Claim {
                        address: "runtime://partner.example/7".into(),
                        kind: "runtime",
                        domain: Some("partner.example".into()),
                    },
                    subject: Subject {
                        principal: Some(totals()),
                        ..subject()
                    },
                    context: context(),
                }),
                json!({"kind": "claim", "context": context_json(),
                       "claim": {"address": "runtime://partner.example/7", "kind": "runtime", "domain": "partner.example"},
                       "subject": with_totals}),
            ),
            (
                "claim of a runtime-scheme address on first use",
                Input::Claim(ClaimInput {
                    claim: Claim {
                        address: "hyperty-runtime://localhost/protostub/1/sm".into(),
                        kind: "runtime_address",
                        domain: Some("localhost".into()),
                    },
                    subject: Subject {
                        user: None,
                        network_server: Some("gateway".into()),
                        holds_from: None,
                        principal: Some(totals()),
                        ..subject()
                    },
                    context: context(),
                }),
                json!({"kind": "claim", "context": context_json(),
                       "claim": {"address": "hyperty-runtime://localhost/protostub/1/sm", "kind": "runtime_address", "domain": "localhost"},
                       "subject": {"runtime": "runtime://localhost/1", "authenticated": true, "network_server": "gateway",
                                   "principal": {"runtimes": 2, "addresses": 7, "foreign_routes": 0, "registry_entries": 1}}}),
            ),
            (
                "claim of an unverified identity for a registration",
                Input::Claim(ClaimInput {
                    claim: Claim {
                        address: "user://google.com/openIdTest10".into(),
                        kind: "identity",
                        domain: Some("google.com".into()),
                    },
                    subject: Subject {
                        holds_from: None,
                        ..subject()
                    },
                    context: context(),
                }),
                json!({"kind": "claim", "context": context_json(),
                       "claim": {"address": "user://google.com/openIdTest10", "kind": "identity", "domain": "google.com"},
                       "subject": {"runtime": "runtime://localhost/1", "authenticated": true, "user": "@alice:localhost"}}),
            ),
            (
                "matrix event",
                Input::MatrixEvent(MatrixEventInput {
                    matrix: MatrixEvent {
                        room_id: "!r:localhost".into(),
                        event_type: "m.room.message".into(),
                        sender: "@alice:localhost".into(),
                        content: content.clone(),
                        state_key: None,
                        door: Door::default(),
                    },
                    context: context(),
                }),
                json!({"kind": "matrix_event", "context": context_json(),
                       "matrix": {"room_id": "!r:localhost", "event_type": "m.room.message", "sender": "@alice:localhost", "content": content}}),
            ),
            (
                "state event in a room being created",
                Input::MatrixEvent(MatrixEventInput {
                    matrix: MatrixEvent {
                        room_id: String::new(),
                        event_type: "m.room.topic".into(),
                        sender: "@alice:localhost".into(),
                        content: content.clone(),
                        state_key: Some(String::new()),
                        door: Door::default(),
                    },
                    context: context(),
                }),
                json!({"kind": "matrix_event", "context": context_json(),
                       "matrix": {"room_id": "", "event_type": "m.room.topic", "sender": "@alice:localhost", "content": content, "state_key": ""}}),
            ),
            (
                "event a homeserver asked the policy server about",
                Input::MatrixEvent(MatrixEventInput {
                    matrix: MatrixEvent {
                        room_id: "!4UsW2lhkAbCdEf".into(),
                        event_type: "m.room.message".into(),
                        sender: "@bob:127.0.0.1:8449".into(),
                        content: content.clone(),
                        state_key: None,
                        door: policy_server_door(),
                    },
                    context: context(),
                }),
                json!({"kind": "matrix_event", "context": context_json(),
                       "matrix": {"room_id": "!4UsW2lhkAbCdEf", "event_type": "m.room.message", "sender": "@bob:127.0.0.1:8449",
                                  "content": content, "via": "policy_server", "origin": "127.0.0.1:8449", "event_id": "$ev"}}),
            ),
            (
                "membership a homeserver asked the policy server about",
                Input::Membership(MembershipInput {
                    matrix: Membership {
                        door: policy_server_door(),
                        ..Membership::new(
                            "!4UsW2lhkAbCdEf",
                            "@bob:127.0.0.1:8449",
                            "join",
                            "@bob:127.0.0.1:8449",
                            vec![],
                        )
                    },
                    context: context(),
                }),
                json!({"kind": "membership", "context": context_json(),
                       "matrix": {"room_id": "!4UsW2lhkAbCdEf", "event_type": "m.room.member", "sender": "@bob:127.0.0.1:8449",
                                  "membership": "join", "target": "@bob:127.0.0.1:8449", "room_members": [],
                                  "via": "policy_server", "origin": "127.0.0.1:8449", "event_id": "$ev"}}),
            ),
            (
                "membership",
                Input::Membership(MembershipInput {
                    matrix: Membership::new(
                        "!r:localhost",
                        "@alice:localhost",
                        "invite",
                        "@bob:localhost",
                        members.clone(),
                    ),
                    context: context(),
                }),
                json!({"kind": "membership", "context": context_json(),
                       "matrix": {"room_id": "!r:localhost", "event_type": "m.room.member", "sender": "@alice:localhost",
                                  "membership": "invite", "target": "@bob:localhost", "room_members": members}}),
            ),
        ];
        // Keys with nothing ignored, the default ignored fields, and fields of every level.
        let caches = [
            vec![],
            crate::config::CacheConfig::default().ignore_fields,
            [
                "subject.principal.runtimes",
                "targets",
                "matrix.content.body",
                "message",
                "kind",
            ]
            .map(String::from)
            .to_vec(),
        ]
        .map(|ignore| DecisionCache::new(true, 1, std::time::Duration::from_secs(1), &ignore));
        for (what, input, expected) in cases {
            let value = input.to_value();
            assert_eq!(
                input.to_rego(),
                regorus::Value::from(value.clone()),
                "{what}: the document regorus evaluates is the JSON one"
            );
            assert_eq!(
                value.to_string(),
                expected.to_string(),
                "{what}: the JSON the policies read"
            );
            schemas
                .validate("input.schema.json", &value)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            for cache in &caches {
                assert_eq!(
                    cache.canonical(&input),
                    cache.canonical(&value),
                    "{what}: the cache key written from the typed input is the JSON one's"
                );
            }
        }
    }

    fn policy_server_door() -> Door {
        Door {
            via: Some(Via::PolicyServer),
            origin: Some("127.0.0.1:8449".into()),
            event_id: Some("$ev".into()),
        }
    }
}
