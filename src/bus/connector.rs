//! Handing an allowed message to a connector that answers it (the registry, the IdM): the
//! sender as the connector sees it (runtime, user, identity, what its runtime holds), the
//! response back, and a notification the connector asks for published through the bus.

use std::sync::Arc;

use super::connection::Connection;
use super::owners::Turn;
use super::Bus;
use crate::connectors::{Connector, Sender};
use crate::persist::shares::Charge;
use crate::rethink::Message;

impl Bus {
    /// The connector's response to `message` from `conn`. The principal's `turn` (a
    /// registration is counted once stored) is given back before the notification the
    /// connector asks for is published, charged to `conn`'s principal.
    pub(super) async fn to_connector(
        &self,
        conn: &Connection,
        message: &Message,
        connector: &dyn Connector,
        turn: Option<Turn<'_>>,
    ) -> Option<String> {
        let identity = conn.identity().or_else(|| {
            conn.user()
                .map(|u| self.inner.connectors.idm.own_identity(u))
        });
        let table = &self.inner.table;
        let runtime = &conn.runtime;
        let holds = |url: &str| {
            table
                .holder_of(url)
                .is_some_and(|holder| Arc::ptr_eq(&holder, runtime))
        };
        // A registration naming an identity the connection did not verify is filed under it
        // only when the policy accepts such claims (`kind: "claim"`, `identity`).
        let named = message
            .body()
            .get("value")
            .and_then(|v| v.get("user"))
            .and_then(serde_json::Value::as_str)
            .filter(|u| u.starts_with("user://") && Some(*u) != identity.as_deref());
        let accepted = match named {
            Some(user) if message.kind_is("create") && self.accepts_identity(conn, user).await => {
                Some(user)
            }
            _ => None,
        };
        let sender = Sender {
            runtime: &conn.runtime.url,
            user: conn.user(),
            identity: identity.as_deref(),
            accepted_identity: accepted,
            holds: &holds,
        };
        let reply = connector.handle(message, sender).await;
        self.inner.metrics.count("component");
        drop(turn);
        if let Some(publish) = reply.publish {
            // Its journal record is charged to whoever caused it, not the node; what waits
            // for an away subscriber, to the subscriber ([`Bus::publish`]).
            let charge = Charge::from(conn.principal.owner());
            self.publish(publish, &charge).await;
        }
        reply.response
    }
}
