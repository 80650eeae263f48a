//! The address-allocation components: `MN/address-allocation` and the legacy
//! `MN/hyperty-address-allocation` and `MN/object-address-allocation`.
//!
//! `create` allocates `body.value.number` (default 1) addresses `<scheme>://<D>/<uuid>` under
//! an allocation key (`body.value.allocationKey`, else a new one), binds them to the
//! requesting runtime and stores the runtime's record before answering `200 {value:
//! {allocated, allocationKey}}`. Nothing is created in Matrix for an address: no address
//! acts there (the node's own users write the journal, inboxes and state). `delete`
//! releases `body.childrenResources`, or the block under the key `body.resource`. The
//! request is a policy decision too: the message's input carries `allocation`
//! (`{action, scheme, number, held}`) so quotas and schemes are the policy's call.

use std::sync::Arc;

use serde_json::{json, Value};

use axum::extract::ws::Utf8Bytes;

use super::metrics::refused;
use super::outbound::{NoRoom, Refused};
use super::owners::Turn;
use super::runtimes::{Runtime, Table};
use super::{Bus, Connection};
use crate::persist::record::Item;
use crate::persist::store::LiveRecord;
#[cfg(test)]
use crate::persist::store::RuntimeRecord;
use crate::policy::input::{Allocation, AllocationAction};
use crate::rethink::address::Component;
use crate::rethink::message::{response, url_problem};
use crate::rethink::{BusError, Message};

/// Most addresses one request may allocate, whatever the policy allows (a backstop).
pub const MAX_PER_REQUEST: u64 = 1000;

/// A parsed allocation request.
#[derive(Debug, Clone, PartialEq)]
pub enum AllocationRequest {
    /// Allocate `number` addresses of `scheme`, under `key` when given.
    Create {
        /// Address scheme (`hyperty`, `comm`, …), lowercased.
        scheme: String,
        /// How many.
        number: u64,
        /// The allocation key the block is kept under.
        key: Option<String>,
    },
    /// Release these addresses.
    Release(Vec<String>),
    /// Release the block under this key.
    ReleaseKey(String),
}

impl AllocationRequest {
    /// Reads the request `message` makes of `component`.
    ///
    /// # Errors
    /// 400 naming the missing or mistyped field.
    pub fn parse(component: Component, message: &Message) -> Result<AllocationRequest, BusError> {
        let body = message.body();
        let value = body.get("value");
        if message.kind_is("create") {
            let scheme = match component {
                Component::HypertyAllocation => Some("hyperty"),
                Component::ObjectAllocation => body.get("scheme").and_then(Value::as_str),
                _ => body
                    .get("scheme")
                    .or_else(|| value.and_then(|v| v.get("scheme")))
                    .and_then(Value::as_str)
                    .or(Some("hyperty")),
            }
            .ok_or_else(|| BusError::BadRequest("object allocation needs body.scheme".into()))?
            .to_ascii_lowercase();
            if scheme.is_empty()
                || !scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(BusError::BadRequest(format!("invalid scheme {scheme:?}")));
            }
            let number = match value.and_then(|v| v.get("number")) {
                None | Some(Value::Null) => 1,
                Some(n) => n.as_u64().ok_or_else(|| {
                    BusError::BadRequest(format!(
                        "body.value.number must be a positive integer, not {n}"
                    ))
                })?,
            };
            if number == 0 || number > MAX_PER_REQUEST {
                return Err(BusError::BadRequest(format!(
                    "body.value.number must be between 1 and {MAX_PER_REQUEST}, not {number}"
                )));
            }
            let key = value
                .and_then(|v| v.get("allocationKey"))
                .and_then(Value::as_str)
                .map(str::to_string);
            return Ok(AllocationRequest::Create {
                scheme,
                number,
                key,
            });
        }
        if message.kind_is("delete") {
            if let Some(children) = children_resources(body)? {
                if children.is_empty() {
                    return Err(BusError::BadRequest(
                        "body.childrenResources is empty".into(),
                    ));
                }
                return Ok(AllocationRequest::Release(children));
            }
            // The key as a string, or (as the reference suite sends it) a one-element array.
            let key = match body.get("resource") {
                Some(Value::Array(keys)) if keys.len() == 1 => keys[0].as_str(),
                Some(key) => key.as_str(),
                None => None,
            };
            if let Some(key) = key {
                return Ok(AllocationRequest::ReleaseKey(key.to_string()));
            }
            return Err(BusError::BadRequest(
                "release needs body.childrenResources or body.resource (an allocation key)".into(),
            ));
        }
        Err(BusError::BadRequest(format!(
            "address allocation answers create and delete, not '{}'",
            message.kind
        )))
    }

    /// The policy input's `allocation` for a runtime holding `held` addresses.
    pub fn input(&self, held: usize) -> Allocation {
        let (action, scheme, number) = match self {
            AllocationRequest::Create { scheme, number, .. } => {
                (AllocationAction::Create, Some(scheme.clone()), *number)
            }
            AllocationRequest::Release(addresses) => {
                (AllocationAction::Delete, None, addresses.len() as u64)
            }
            AllocationRequest::ReleaseKey(_) => (AllocationAction::Delete, None, 1),
        };
        Allocation {
            action,
            scheme,
            number,
            held,
        }
    }
}

/// `body.childrenResources` as a flat list (some clients nest it one level: `[[a, b]]`): at
/// most [`MAX_PER_REQUEST`] addresses, each one the bus takes (`url_problem`).
fn children_resources(
    body: &serde_json::Map<String, Value>,
) -> Result<Option<Vec<String>>, BusError> {
    let Some(value) = body.get("childrenResources").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad =
        || BusError::BadRequest("body.childrenResources must be an array of addresses".into());
    let items = value.as_array().ok_or_else(bad)?;
    let mut addresses = Vec::new();
    let mut add = |s: &str| {
        if addresses.len() as u64 >= MAX_PER_REQUEST {
            return Err(BusError::BadRequest(format!(
                "body.childrenResources names more than {MAX_PER_REQUEST} addresses"
            )));
        }
        if let Some(problem) = url_problem("an address of body.childrenResources", s) {
            return Err(BusError::BadRequest(problem));
        }
        addresses.push(s.to_string());
        Ok(())
    };
    for item in items {
        match item {
            Value::String(s) => add(s)?,
            Value::Array(inner) => {
                for s in inner {
                    add(s.as_str().ok_or_else(bad)?)?;
                }
            }
            _ => return Err(bad()),
        }
    }
    Ok(Some(addresses))
}

/// Takes back an allocation whose write failed: `addresses` leave `runtime`'s block `key`,
/// and are unbound where `runtime` still holds them (an address bound to another runtime
/// meanwhile stays that runtime's).
fn undo_allocation(table: &Table, runtime: &Arc<Runtime>, key: &str, addresses: &[String]) {
    runtime.update(|r| {
        if let Some(block) = r.allocations.get_mut(key) {
            block.retain(|a| !addresses.contains(a));
            if block.is_empty() {
                r.allocations.remove(key);
            }
        }
    });
    for address in addresses {
        table.unbind(address, runtime);
    }
}

impl Bus {
    /// Carries out an allowed allocation request; the answer, unless it follows once the
    /// change is stored (see [`Bus::answer_when_stored`]). The principal's `turn` is given
    /// back once the addresses are counted, before the answer waits for anything.
    pub(super) async fn allocate(
        &self,
        conn: &Connection,
        message: &Message,
        request: AllocationRequest,
        turn: Option<Turn<'_>>,
    ) -> Result<Option<String>, BusError> {
        let runtime = &conn.runtime;
        match request {
            AllocationRequest::Create {
                scheme,
                number,
                key,
            } => {
                let domain = self.inner.nodes.domain();
                let addresses: Vec<String> = (0..number)
                    .map(|_| format!("{scheme}://{domain}/{}", uuid::Uuid::new_v4()))
                    .collect();
                let key = key.unwrap_or_else(|| format!("{}", uuid::Uuid::new_v4()));
                runtime.allocated(&key, &addresses);
                let added: Vec<Item> = addresses
                    .iter()
                    .map(|a| Item::Allocation(key.clone(), a.clone()))
                    .collect();
                // Bound at once: only the answer tells anyone the addresses.
                for address in &addresses {
                    self.inner.table.bind(address, runtime);
                }
                // Counted: the principal's next request may read the counts.
                drop(turn);
                self.inner.metrics.count("component");
                tracing::debug!(runtime = %runtime.url, number, %scheme, "addresses allocated");
                let ok = message.response(
                    200,
                    "allocated",
                    Some(json!({"allocated": addresses, "allocationKey": key})),
                );
                let (bus, runtime) = (self.clone(), Arc::clone(runtime));
                let undo = move || undo_allocation(&bus.inner.table, &runtime, &key, &addresses);
                self.answer_when_stored(conn, message, &added, ok, undo)
                    .await
            }
            // Releasing is idempotent, as in the reference nodes: what this runtime no longer
            // holds (released before, or before a disconnect) is simply 200; only an address
            // another runtime holds is refused.
            AllocationRequest::Release(addresses) => {
                drop(turn); // a release only lowers the counts
                if let Some(theirs) = addresses.iter().find(|a| {
                    self.inner
                        .table
                        .holder(a)
                        .is_some_and(|h| !Arc::ptr_eq(&h, runtime))
                }) {
                    return Err(BusError::Forbidden(format!(
                        "'{theirs}' is allocated to another runtime"
                    )));
                }
                // The answer names what was released, never more of what was sent.
                let released = self.release_addresses(runtime, &addresses, None);
                let ok = message.response(200, "released", Some(json!({"released": released})));
                self.answer_when_stored(conn, message, &[], ok, || {}).await
            }
            AllocationRequest::ReleaseKey(key) => {
                drop(turn);
                let addresses = runtime
                    .with_record(|r| r.allocations.get(&key).cloned())
                    .unwrap_or_default();
                let released = self.release_addresses(runtime, &addresses, Some(&key));
                let ok = message.response(200, "released", Some(json!({"released": released})));
                self.answer_when_stored(conn, message, &[], ok, || {}).await
            }
        }
    }

    /// Releases `addresses` (and the block under `key`) of `runtime`: unbound now; the
    /// addresses of its blocks that were released.
    fn release_addresses(
        &self,
        runtime: &Arc<Runtime>,
        addresses: &[String],
        key: Option<&str>,
    ) -> Vec<String> {
        let released = runtime.release(addresses, key);
        for address in addresses {
            self.inner.table.unbind(address, runtime);
        }
        self.inner.metrics.count("component");
        released
    }

    /// Stores the runtime's record (changed by `message`, which `added` entries to it: see
    /// [`Store::put_runtime_live`](crate::persist::store::Store::put_runtime_live)) and
    /// answers `message` with `ok` once it is stored — or with the error, after `undo`. The
    /// write is placed in line now
    /// (a later change of the runtime supersedes it) and awaited in the background, at most
    /// [`MAX_PENDING_ANSWERS`](super::connection::MAX_PENDING_ANSWERS) per socket (the socket is not read while that many wait): a
    /// runtime's pipelined requests share the homeserver's writes instead of waiting for one
    /// each. The answers may so overtake each other; each carries its request's id. In
    /// memory, stored and answered at once.
    pub(super) async fn answer_when_stored(
        &self,
        conn: &Connection,
        message: &Message,
        added: &[Item],
        ok: String,
        undo: impl FnOnce() + Send + 'static,
    ) -> Result<Option<String>, BusError> {
        let store = &self.inner.persistence.store;
        let live = Arc::clone(&conn.runtime) as Arc<dyn LiveRecord>;
        let stored = match store.put_runtime_live(&conn.runtime.url, live, added) {
            Ok(stored) => stored,
            Err(too_large) => {
                // Checked before anything is written: taken back at once.
                undo();
                return Err(super::store_error(too_large.into()));
            }
        };
        if store.room().is_none() {
            return match stored.await {
                Ok(()) => Ok(Some(ok)),
                Err(e) => {
                    undo();
                    Err(super::store_error(e))
                }
            };
        }
        let permit = Arc::clone(&conn.pending)
            .acquire_owned()
            .await
            .map_err(|_| BusError::Unavailable("the connection is closing".into()))?;
        // The answer's room in the socket's budget, held while it waits (the socket is not
        // read meanwhile): pending answers and the queue share the socket's bytes. A socket
        // that makes no room in time is closed, as for any answer (`Bus::respond`); the change
        // is still stored (or undone) in the background.
        let deadline = tokio::time::Instant::now() + self.config().slow_receiver_close_after;
        let reserved = tokio::select! {
            reserved = conn.tx.reserve(ok.len(), deadline) => reserved,
            () = conn.close.cancelled() => Err(NoRoom::Closed),
        };
        let reserved = match reserved {
            Ok(reserved) => Some(reserved),
            Err(NoRoom::Full) => {
                self.inner.metrics.refuse(refused::SLOW_SOCKET);
                conn.close.cancel();
                None
            }
            Err(NoRoom::Closed) => None,
        };
        // What the answer needs, not the request.
        let (close, bus) = (conn.close.clone(), self.clone());
        let id = message.id.clone();
        let (from, to) = (
            message.to.first().cloned().unwrap_or_default(),
            message.from.clone(),
        );
        self.inner.tracker.spawn(async move {
            let answer = match stored.await {
                Ok(()) => ok,
                Err(e) => {
                    undo();
                    let e = super::store_error(e);
                    response(&id, &from, &to, e.code(), &e.to_string(), None)
                }
            };
            let Some(reserved) = reserved else {
                return;
            };
            let deadline = tokio::time::Instant::now() + bus.config().slow_receiver_close_after;
            tokio::select! {
                sent = reserved.send(Utf8Bytes::from(answer), deadline) => {
                    if matches!(sent, Err(Refused::Full(_))) {
                        bus.inner.metrics.refuse(refused::SLOW_SOCKET);
                        close.cancel();
                    }
                }
                () = close.cancelled() => {}
            }
            drop(permit);
        });
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undoing_a_failed_allocation_leaves_an_address_that_went_elsewhere() {
        let table = Table::default();
        let a = table.runtime("runtime://d/a", RuntimeRecord::default);
        let b = table.runtime("runtime://d/b", RuntimeRecord::default);
        let (kept, moved) = ("hyperty://d/1".to_string(), "hyperty://d/2".to_string());
        a.update(|r| {
            r.allocations
                .insert("k".into(), vec![kept.clone(), moved.clone()]);
            r.allocations
                .insert("other".into(), vec!["hyperty://d/3".into()]);
        });
        table.bind(&kept, &a);
        table.bind(&moved, &b); // meanwhile another runtime's
        undo_allocation(&table, &a, "k", &[kept.clone(), moved.clone()]);
        assert!(table.holder(&kept).is_none(), "a's own address unbound");
        assert!(
            table.holder(&moved).is_some_and(|h| Arc::ptr_eq(&h, &b)),
            "the address b holds now stays b's"
        );
        let record = a.record();
        assert!(
            !record.allocations.contains_key("k"),
            "the emptied block is gone"
        );
        assert_eq!(record.allocations["other"], ["hyperty://d/3"]);
    }
}
