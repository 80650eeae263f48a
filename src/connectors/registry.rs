//! The registry connector: messages to `domain://registry.<D>`.
//!
//! Built in (no `[bus.registry] url`): entries are kept in memory and, durably, as room state
//! of the bus's state room (`Store::put_registry`). `create` registers `body.value` under
//! `value.url`; `read` looks up one address, or the entries of a user URL (a map keyed by
//! URL), filtered by `criteria` (`dataSchemes`, `resources`) — in URL order, at most
//! `[bus] max_response_bytes` per answer: a longer list ends with `body.next` (the last URL
//! given), and `body.after: <that URL>` asks for the rest; `update` is a keep-alive, or a
//! status change (`attribute: "status"`) published to `<url>/registration`; `delete` removes.
//! Only the runtime that registered an entry may change or delete it.
//!
//! With `[bus.registry] url` the messages go to a reTHINK domain registry's REST API
//! (`PUT/GET/DELETE /hyperty/user/<user>/<hyperty>`, `/hyperty/dataobject/<url>`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::RwLock;

use futures_util::future::BoxFuture;
use serde_json::{json, Value};

use super::{answer, Connector, Reply, Sender};
use crate::clock::now_ms;
use crate::persist::store::{Store, StoreError};
use crate::rethink::{BusError, Message};

/// Most entries one runtime may register in the built-in registry.
const MAX_ENTRIES_PER_RUNTIME: usize = 1000;

/// The built-in registry.
pub struct BuiltinRegistry {
    entries: RwLock<Entries>,
    store: Store,
    /// Largest answer to one `read` of a user URL (entries past it come in later pages).
    max_read_bytes: usize,
}

/// The entries by URL, and the URLs each runtime registered and each user has entries under
/// (so a user's read, a runtime's count and a release never walk the other entries).
#[derive(Default)]
struct Entries {
    by_url: BTreeMap<String, Value>,
    by_runtime: HashMap<String, BTreeSet<String>>,
    by_user: HashMap<String, BTreeSet<String>>,
}

impl Entries {
    fn set(&mut self, url: &str, entry: Option<Value>) {
        let old = match entry {
            Some(entry) => {
                index(&mut self.by_runtime, &entry["runtime"], url, true);
                index(&mut self.by_user, &entry["user"], url, true);
                self.by_url.insert(url.to_string(), entry)
            }
            None => self.by_url.remove(url),
        };
        let Some(old) = old else { return };
        let new = self.by_url.get(url);
        for (index_of, field) in [
            (&mut self.by_runtime, "runtime"),
            (&mut self.by_user, "user"),
        ] {
            // Unindexed under the old value only when the new entry does not file it there.
            if new.is_none_or(|new| new[field] != old[field]) {
                index(index_of, &old[field], url, false);
            }
        }
    }
}

/// Files `url` under `key` (a string field of its entry; other values are not indexed), or
/// takes it out (`add: false`; an emptied set is forgotten).
fn index(index: &mut HashMap<String, BTreeSet<String>>, key: &Value, url: &str, add: bool) {
    let Some(key) = key.as_str() else { return };
    if add {
        index
            .entry(key.to_string())
            .or_default()
            .insert(url.to_string());
    } else if let Some(urls) = index.get_mut(key) {
        urls.remove(url);
        if urls.is_empty() {
            index.remove(key);
        }
    }
}

impl BuiltinRegistry {
    /// A registry holding `entries` (loaded from the store), writing changes to `store`,
    /// answering a `read` of a user URL with at most `max_read_bytes` of entries at a time.
    pub fn new(entries: BTreeMap<String, Value>, store: Store, max_read_bytes: usize) -> Self {
        let mut indexed = Entries::default();
        for (url, entry) in entries {
            indexed.set(&url, Some(entry));
        }
        Self {
            entries: RwLock::new(indexed),
            store,
            max_read_bytes,
        }
    }

    /// Takes a change another replica stored (`None`: removed), without storing it again.
    pub fn apply(&self, url: &str, entry: Option<Value>) {
        self.write().set(url, entry);
    }

    /// How many entries the runtimes `runtimes` registered.
    pub fn registered_by<'a>(&self, runtimes: impl IntoIterator<Item = &'a String>) -> usize {
        let entries = self.read();
        runtimes
            .into_iter()
            .filter_map(|r| entries.by_runtime.get(r))
            .map(BTreeSet::len)
            .sum()
    }

    /// Removes at most `at_most` of the entries `runtime` registered (it was released):
    /// stored, then forgotten; how many. (The caller bounds its writes per step: the rest
    /// are removed by its next call.)
    ///
    /// # Errors
    /// The store cannot record a removal now (the rest stay for a later call).
    pub async fn remove_runtime(&self, runtime: &str, at_most: usize) -> Result<usize, BusError> {
        let urls: Vec<String> = self
            .read()
            .by_runtime
            .get(runtime)
            .map(|urls| urls.iter().take(at_most).cloned().collect())
            .unwrap_or_default();
        for url in &urls {
            self.put(url, None).await?;
        }
        Ok(urls.len())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Entries> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Entries> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }

    async fn on_message(&self, message: &Message, sender: Sender<'_>) -> Result<Reply, BusError> {
        let body = message.body();
        let kind = message.kind.to_ascii_lowercase();
        match kind.as_str() {
            "create" => {
                let value = body.get("value").filter(|v| v.is_object()).ok_or_else(|| {
                    BusError::BadRequest("registry create needs body.value (an object)".into())
                })?;
                let url = entry_url(value)
                    .ok_or_else(|| {
                        BusError::BadRequest(
                            "registry create needs body.value.url (or hypertyURL)".into(),
                        )
                    })?
                    .to_string();
                sender.must_hold(&url)?;
                let (user, claimed) = sender.registrant(value.get("user").and_then(Value::as_str));
                match self.get(&url) {
                    Some(existing) if existing["runtime"] != sender.runtime => {
                        return Err(BusError::Forbidden(format!(
                            "'{url}' is registered by another runtime"
                        )));
                    }
                    Some(_) => {}
                    None if self.count_of(sender.runtime) >= MAX_ENTRIES_PER_RUNTIME => {
                        return Err(BusError::Forbidden(format!(
                            "a runtime may register at most {MAX_ENTRIES_PER_RUNTIME} entries"
                        )));
                    }
                    None => {}
                }
                let mut entry = value.clone();
                entry["runtime"] = json!(sender.runtime);
                entry["url"] = json!(url);
                match user {
                    Some(user) => entry["user"] = json!(user),
                    None => {
                        if let Some(object) = entry.as_object_mut() {
                            object.remove("user");
                        }
                    }
                }
                if let Some(claimed) = claimed {
                    entry["claimedUser"] = json!(claimed);
                }
                entry["status"] = entry.get("status").cloned().unwrap_or(json!("live"));
                entry["lastModified"] = json!(now_ms());
                self.put(&url, Some(entry)).await?;
                Ok(Reply::response(message.response(
                    200,
                    "registered",
                    Some(json!({"url": url})),
                )))
            }
            "read" => {
                let resource = body
                    .get("resource")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        BusError::BadRequest("registry read needs body.resource".into())
                    })?;
                let criteria = body.get("criteria");
                if resource.starts_with("user://") {
                    let after = body.get("after").and_then(Value::as_str);
                    return match self.user_page(resource, criteria, after) {
                        Some(body) => Ok(Reply::response(message.answer(body))),
                        None => Err(BusError::NotFound(format!(
                            "nothing registered for '{resource}'"
                        ))),
                    };
                }
                match self.get(resource).filter(|e| matches(e, criteria)) {
                    Some(value) => Ok(Reply::response(message.response(200, "", Some(value)))),
                    None => Err(BusError::NotFound(format!(
                        "nothing registered for '{resource}'"
                    ))),
                }
            }
            "update" => {
                let resource = body
                    .get("resource")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        BusError::BadRequest("registry update needs body.resource".into())
                    })?
                    .to_string();
                let mut entry = self.owned(&resource, sender)?;
                entry["lastModified"] = json!(now_ms());
                let mut publish = None;
                if let Some(status) = status_change(body) {
                    entry["status"] = status.clone();
                    publish = Some(status_notification(
                        registry_address(message),
                        &resource,
                        status,
                    ));
                }
                self.put(&resource, Some(entry)).await?;
                Ok(Reply {
                    response: Some(message.response(200, "updated", None)),
                    publish,
                })
            }
            "delete" => {
                let resource = target(body)
                    .ok_or_else(|| {
                        BusError::BadRequest("registry delete needs body.resource".into())
                    })?
                    .to_string();
                self.owned(&resource, sender)?;
                self.put(&resource, None).await?;
                Ok(Reply::response(message.response(200, "unregistered", None)))
            }
            _ => Err(BusError::BadRequest(format!(
                "the registry answers create, read, update and delete, not '{}'",
                message.kind
            ))),
        }
    }

    /// The answer body to a read of `user`'s entries after the URL `after`: up to
    /// `max_read_bytes` of them (at least one), and `next` when more follow.
    fn user_page(
        &self,
        user: &str,
        criteria: Option<&Value>,
        after: Option<&str>,
    ) -> Option<Value> {
        use std::ops::Bound;
        let entries = self.read();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut page = serde_json::Map::new();
        let (mut bytes, mut next) = (0, None);
        let mut last: Option<&String> = None;
        let urls = entries.by_user.get(user)?;
        for (url, entry) in urls
            .range::<str, _>((from, Bound::Unbounded))
            .filter_map(|url| Some((url, entries.by_url.get(url)?)))
            .filter(|(_, e)| matches(e, criteria))
        {
            let size = url.len() + entry.to_string().len();
            if bytes + size > self.max_read_bytes && !page.is_empty() {
                next = last.cloned();
                break;
            }
            bytes += size;
            page.insert(url.clone(), entry.clone());
            last = Some(url);
        }
        if page.is_empty() {
            return None;
        }
        let mut body = json!({"code": 200, "value": page});
        if let Some(next) = next {
            body["next"] = json!(next);
        }
        Some(body)
    }

    fn count_of(&self, runtime: &str) -> usize {
        self.read().by_runtime.get(runtime).map_or(0, BTreeSet::len)
    }

    fn get(&self, url: &str) -> Option<Value> {
        self.read().by_url.get(url).cloned()
    }

    fn owned(&self, url: &str, sender: Sender<'_>) -> Result<Value, BusError> {
        let entry = self
            .get(url)
            .ok_or_else(|| BusError::NotFound(format!("nothing registered for '{url}'")))?;
        if entry["runtime"] != sender.runtime {
            return Err(BusError::Forbidden(format!(
                "'{url}' is registered by another runtime"
            )));
        }
        Ok(entry)
    }

    async fn put(&self, url: &str, entry: Option<Value>) -> Result<(), BusError> {
        self.store
            .put_registry(url, entry.as_ref())
            .await
            .map_err(|e| match e {
                StoreError::TooLarge(why) => {
                    BusError::TooLarge(format!("registry cannot store the entry: {why}"))
                }
                StoreError::Homeserver(_) | StoreError::Batch(_) => {
                    BusError::Unavailable(format!("registry cannot store the entry now: {e}"))
                }
            })?;
        self.write().set(url, entry);
        Ok(())
    }
}

impl Connector for BuiltinRegistry {
    fn handle<'a>(&'a self, message: &'a Message, sender: Sender<'a>) -> BoxFuture<'a, Reply> {
        answer(message, self.on_message(message, sender))
    }
}

/// What a registry message is about: `body.resource`, else the entry's URL in `body.value`.
fn target(body: &serde_json::Map<String, Value>) -> Option<&str> {
    body.get("resource")
        .and_then(Value::as_str)
        .or_else(|| entry_url(body.get("value")?))
}

/// The URL an entry registers: `url`, or `hypertyURL` (2016 runtimes).
fn entry_url(value: &Value) -> Option<&str> {
    value
        .get("url")
        .or_else(|| value.get("hypertyURL"))
        .and_then(Value::as_str)
}

/// The new status an `update` sets: `{attribute: "status", value: S}`, or
/// `{value: {status: S}}`.
fn status_change(body: &serde_json::Map<String, Value>) -> Option<Value> {
    if body.get("attribute").and_then(Value::as_str) == Some("status") {
        return Some(body.get("value").cloned().unwrap_or(Value::Null));
    }
    body.get("value")?.get("status").cloned()
}

/// Whether `entry` meets the read `criteria` (every listed data scheme / resource present).
fn matches(entry: &Value, criteria: Option<&Value>) -> bool {
    let Some(criteria) = criteria else {
        return true;
    };
    ["dataSchemes", "resources"].iter().all(|field| {
        match criteria.get(*field).and_then(Value::as_array) {
            None => true,
            Some(wanted) => {
                let have = entry.get(*field).and_then(Value::as_array);
                wanted.iter().all(|w| have.is_some_and(|h| h.contains(w)))
            }
        }
    })
}

/// The notification of a status change, for subscribers of `<url>/registration`: from the
/// registry (`registry`, the address the update was sent to), as the reTHINK registration
/// spec has it.
fn status_notification(registry: &str, url: &str, status: Value) -> Value {
    json!({
        "type": "update", "from": registry, "to": format!("{url}/registration"),
        "body": {"attribute": "status", "value": status},
    })
}

/// The registry's own address: where `message` was sent.
fn registry_address(message: &Message) -> &str {
    message.to.first().map_or("", String::as_str)
}

/// A reTHINK domain registry over HTTP.
pub struct HttpRegistry {
    base: String,
    http: reqwest::Client,
    /// Longest answer read from the registry (longer: refused as its failure).
    max_answer_bytes: usize,
}

impl HttpRegistry {
    /// A client of the registry at `base`, reading answers of at most `max_answer_bytes`.
    pub fn new(base: &str, max_answer_bytes: usize) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            max_answer_bytes,
        }
    }

    async fn on_message(&self, message: &Message, sender: Sender<'_>) -> Result<Reply, BusError> {
        let body = message.body();
        let kind = message.kind.to_ascii_lowercase();
        let user = sender.identity.unwrap_or("anonymous").to_string();
        let resource = target(body).ok_or_else(|| {
            BusError::BadRequest("registry message needs body.resource or body.value.url".into())
        })?;
        // Writes only for what the sender holds: its addresses, or its own user entry.
        if kind != "read" {
            if resource.starts_with("user://") {
                if sender.identity != Some(resource) {
                    return Err(BusError::Forbidden(format!(
                        "only '{resource}' itself may change its registry entries"
                    )));
                }
            } else {
                sender.must_hold(resource)?;
            }
        }
        // A hyperty is filed under its user: the registrant's (reads of another user's
        // hyperty by address need `body.value.user`, as the registry's REST API does).
        let encode = |segment: &str| {
            percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        };
        let path = if resource.starts_with("user://") {
            format!("/hyperty/user/{}", encode(resource))
        } else if resource.starts_with("hyperty://") {
            format!("/hyperty/user/{}/{}", encode(&user), encode(resource))
        } else {
            format!("/hyperty/dataobject/{}", encode(resource))
        };
        let url = format!("{}{path}", self.base);
        let mut publish = None;
        let (code, value) = match kind.as_str() {
            "create" => {
                let value = body.get("value").cloned().unwrap_or(json!({}));
                self.call(self.http.put(&url).json(&value)).await?
            }
            "read" => self.call(self.http.get(&url)).await?,
            "delete" => self.call(self.http.delete(&url)).await?,
            "update" => {
                // Keep-alive or status change of the stored entry, never a replacement.
                let (code, current) = self.call(self.http.get(&url)).await?;
                let Some(mut entry) = current.filter(|v| v.is_object() && code < 300) else {
                    return Ok(Reply::response(message.response(
                        if code < 300 { 404 } else { code },
                        "domain registry has no such entry",
                        None,
                    )));
                };
                entry["lastModified"] = json!(now_ms());
                if let Some(status) = status_change(body) {
                    entry["status"] = status.clone();
                    publish = Some(status_notification(
                        registry_address(message),
                        resource,
                        status,
                    ));
                }
                self.call(self.http.put(&url).json(&entry)).await?
            }
            other => {
                return Err(BusError::BadRequest(format!(
                    "the registry answers create, read, update and delete, not '{other}'"
                )))
            }
        };
        let description = if code < 300 {
            ""
        } else {
            "domain registry refused"
        };
        Ok(Reply {
            response: Some(message.response(code, description, value)),
            publish: publish.filter(|_| code < 300),
        })
    }

    /// Sends one request; the status and JSON body (if any).
    async fn call(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, Option<Value>), BusError> {
        let answer = request
            .send()
            .await
            .map_err(|e| BusError::Unavailable(format!("domain registry unavailable: {e}")))?;
        let code = answer.status().as_u16();
        if answer.status().is_server_error() {
            return Err(BusError::Unavailable(format!(
                "domain registry unavailable ({})",
                answer.status()
            )));
        }
        let text = super::read_capped(answer, self.max_answer_bytes)
            .await
            .map_err(|e| BusError::Unavailable(format!("domain registry: {e}")))?;
        Ok((code, serde_json::from_str(&text).ok()))
    }
}

impl Connector for HttpRegistry {
    fn handle<'a>(&'a self, message: &'a Message, sender: Sender<'a>) -> BoxFuture<'a, Reply> {
        answer(message, self.on_message(message, sender))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_entries_come_in_pages_of_bounded_size() {
        let user = "user://localhost/eve";
        let entries: BTreeMap<String, Value> = (0..5)
            .map(|i| {
                let url = format!("hyperty://localhost/h{i}");
                let entry = json!({"url": url, "user": user, "pad": "x".repeat(400)});
                (url, entry)
            })
            .chain([(
                "hyperty://localhost/other".to_string(),
                json!({"user": "user://localhost/bob"}),
            )])
            .collect();
        let registry = BuiltinRegistry::new(entries, Store::memory(), 1000);
        let mut after: Option<String> = None;
        let mut seen = Vec::new();
        loop {
            let page = registry
                .user_page(user, None, after.as_deref())
                .expect("a page");
            assert!(
                page.to_string().len() < 1200,
                "{} bytes",
                page.to_string().len()
            );
            let value = page["value"].as_object().expect("a map");
            seen.extend(value.keys().cloned());
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_string()),
                None => break,
            }
        }
        let all: Vec<String> = (0..5)
            .map(|i| format!("hyperty://localhost/h{i}"))
            .collect();
        assert_eq!(seen, all, "each of the user's entries once, in URL order");
        assert!(registry
            .user_page("user://localhost/nobody", None, None)
            .is_none());
    }

    #[test]
    fn the_indexes_follow_entries_that_move_or_go() {
        let registry = BuiltinRegistry::new(BTreeMap::new(), Store::memory(), 10_000);
        let (eve, bob) = ("user://localhost/eve", "user://localhost/bob");
        let url = "hyperty://localhost/h";
        let entry =
            |user: &str, runtime: &str| json!({"url": url, "user": user, "runtime": runtime});
        registry.apply(url, Some(entry(eve, "runtime://localhost/a")));
        registry.apply(url, Some(entry(eve, "runtime://localhost/a")));
        assert_eq!(registry.registered_by(&["runtime://localhost/a".into()]), 1);
        assert!(registry.user_page(eve, None, None).is_some());
        // Filed again under another user and runtime: found only there.
        registry.apply(url, Some(entry(bob, "runtime://localhost/b")));
        assert!(registry.user_page(eve, None, None).is_none());
        assert!(registry.user_page(bob, None, None).is_some());
        assert_eq!(registry.registered_by(&["runtime://localhost/a".into()]), 0);
        assert_eq!(registry.registered_by(&["runtime://localhost/b".into()]), 1);
        registry.apply(url, None);
        assert!(registry.user_page(bob, None, None).is_none());
        assert_eq!(registry.registered_by(&["runtime://localhost/b".into()]), 0);
        let entries = registry.read();
        assert!(entries.by_user.is_empty() && entries.by_runtime.is_empty());
    }
}
