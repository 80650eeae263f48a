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

use super::runtimes::Runtime;
use super::{Bus, Connection};
use crate::policy::input::{Allocation, AllocationAction};
use crate::rethink::address::Component;
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

/// `body.childrenResources` as a flat list (some clients nest it one level: `[[a, b]]`).
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
    for item in items {
        match item {
            Value::String(s) => addresses.push(s.clone()),
            Value::Array(inner) => {
                for s in inner {
                    addresses.push(s.as_str().ok_or_else(bad)?.to_string());
                }
            }
            _ => return Err(bad()),
        }
    }
    Ok(Some(addresses))
}

impl Bus {
    /// Carries out an allowed allocation request.
    pub(super) async fn allocate(
        &self,
        conn: &Connection,
        message: &Message,
        request: AllocationRequest,
    ) -> Result<String, BusError> {
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
                let record = runtime.update(|r| {
                    r.allocations
                        .entry(key.clone())
                        .or_default()
                        .extend(addresses.iter().cloned());
                });
                if let Err(e) = self.persist(&runtime.url, &record).await {
                    runtime.update(|r| {
                        if let Some(block) = r.allocations.get_mut(&key) {
                            block.retain(|a| !addresses.contains(a));
                            if block.is_empty() {
                                r.allocations.remove(&key);
                            }
                        }
                    });
                    return Err(e);
                }
                for address in &addresses {
                    self.inner.table.bind(address, runtime);
                }
                self.inner.metrics.count("component");
                tracing::debug!(runtime = %runtime.url, number, %scheme, "addresses allocated");
                Ok(message.response(
                    200,
                    "allocated",
                    Some(json!({"allocated": addresses, "allocationKey": key})),
                ))
            }
            // Releasing is idempotent, as in the reference nodes: what this runtime no longer
            // holds (released before, or before a disconnect) is simply 200; only an address
            // another runtime holds is refused.
            AllocationRequest::Release(addresses) => {
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
                self.release_addresses(runtime, &addresses, None).await?;
                Ok(message.response(200, "released", Some(json!({"released": addresses}))))
            }
            AllocationRequest::ReleaseKey(key) => {
                let addresses = runtime
                    .record()
                    .allocations
                    .get(&key)
                    .cloned()
                    .unwrap_or_default();
                self.release_addresses(runtime, &addresses, Some(&key))
                    .await?;
                Ok(message.response(200, "released", Some(json!({"released": addresses}))))
            }
        }
    }

    async fn release_addresses(
        &self,
        runtime: &Arc<Runtime>,
        addresses: &[String],
        key: Option<&str>,
    ) -> Result<(), BusError> {
        let record = runtime.update(|r| {
            if let Some(key) = key {
                r.allocations.remove(key);
            }
            for block in r.allocations.values_mut() {
                block.retain(|a| !addresses.contains(a));
            }
            r.allocations.retain(|_, block| !block.is_empty());
        });
        self.persist(&runtime.url, &record).await?;
        for address in addresses {
            self.inner.table.unbind(address, runtime);
        }
        self.inner.metrics.count("component");
        Ok(())
    }
}
