//! What each principal holds across all its runtimes: runtime URLs (released ones too: a
//! runtime URL belongs to its first principal for good; counted apart, live and
//! released), claimed and allocated addresses, foreign return routes and
//! subscriptions — counted as records change, so that a decision reads them in
//! O(1) and per-principal limits hold however many runtimes a principal opens. [`Claims`]
//! is the ordered index of what is held for good (runtime URLs and claimed addresses), which
//! answers "does another principal hold this URL, a prefix of it, or something under it" in
//! O(log n).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;
use std::sync::{Arc, Mutex};

use crate::persist::store::RuntimeRecord;

/// One principal's holdings.
#[derive(Debug, Default)]
pub struct Owner {
    /// Its runtime URLs.
    urls: Mutex<BTreeSet<String>>,
    addresses: AtomicUsize,
    foreign: AtomicUsize,
    /// How many of its runtimes are released (tombstones: their URLs stay its own).
    released: AtomicUsize,
    /// Subscriptions of its runtimes.
    subscriptions: AtomicUsize,
}

impl Owner {
    /// How many live (not released) runtimes it owns.
    pub fn runtimes(&self) -> usize {
        self.lock_urls().len().saturating_sub(self.released())
    }

    /// How many released runtimes (tombstones) it owns.
    pub fn released(&self) -> usize {
        self.released.load(Ordering::Relaxed)
    }

    /// Reads its runtime URLs without copying them.
    pub fn with_urls<R>(&self, read: impl FnOnce(&BTreeSet<String>) -> R) -> R {
        read(&self.lock_urls())
    }

    /// Addresses allocated to its runtimes.
    pub fn addresses(&self) -> usize {
        self.addresses.load(Ordering::Relaxed)
    }

    /// Foreign return routes of its runtimes.
    pub fn foreign(&self) -> usize {
        self.foreign.load(Ordering::Relaxed)
    }

    /// Subscriptions of its runtimes.
    pub fn subscriptions(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// A record's counts moved from `before` to `after`.
    pub fn changed(&self, before: Counts, after: Counts) {
        apply(&self.addresses, before.addresses, after.addresses);
        apply(&self.foreign, before.foreign, after.foreign);
        apply(
            &self.subscriptions,
            before.subscriptions,
            after.subscriptions,
        );
        apply(&self.released, before.released, after.released);
    }

    fn lock_urls(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.urls.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn apply(counter: &AtomicUsize, before: usize, after: usize) {
    if after >= before {
        counter.fetch_add(after - before, Ordering::Relaxed);
    } else {
        // Never below zero, whatever the order of concurrent changes.
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
            Some(now.saturating_sub(before - after))
        });
    }
}

/// What a record counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Allocated and claimed addresses.
    pub addresses: usize,
    /// Foreign return routes.
    pub foreign: usize,
    /// Subscriptions.
    pub subscriptions: usize,
    /// 1 when the runtime is released (a tombstone: its URL stays its owner's).
    pub released: usize,
}

/// What `record` counts.
pub fn counts(record: &RuntimeRecord) -> Counts {
    Counts {
        addresses: record.allocations.values().map(Vec::len).sum::<usize>() + record.claimed.len(),
        foreign: record.foreign.len(),
        subscriptions: record.subscriptions.len(),
        released: usize::from(record.released),
    }
}

/// Runtime URLs and claimed addresses → the principal holding them, for good.
#[derive(Default)]
pub struct Claims {
    by_url: RwLock<Index>,
}

/// The claims, and per address with claims under it how many each principal has there: what
/// lies under an address is then one look-up, however many of them are the asker's own.
#[derive(Default)]
struct Index {
    owners: BTreeMap<String, String>,
    under: HashMap<String, HashMap<String, usize>>,
}

/// How many keys of another principal's [`conflict_in`] reads past to name one (past them it
/// names the address's subtree).
const CONFLICT_SCAN: usize = 64;

impl Claims {
    /// Takes `url` for `owner` unless [`Claims::conflict`] names another principal's; `Err`
    /// with that address. Taking what `owner` holds already is a no-op.
    pub fn take(&self, url: &str, owner: &str) -> Result<(), String> {
        let mut index = self.write();
        if let Some(other) = conflict_in(&index, url, owner) {
            return Err(other);
        }
        if index.owners.contains_key(url) {
            return Ok(());
        }
        index.owners.insert(url.to_string(), owner.to_string());
        for p in above(url) {
            let here = index.under.entry(p.to_string()).or_default();
            *here.entry(owner.to_string()).or_default() += 1;
        }
        Ok(())
    }

    /// Another principal's address that is `url`, a prefix of it (`url` lies under it) or
    /// lies under `url` — any of which makes `url` not `owner`'s to take.
    pub fn conflict(&self, url: &str, owner: &str) -> Option<String> {
        conflict_in(&self.read(), url, owner)
    }

    /// Forgets `url` (a runtime that never had an owner, or a claim not stored).
    pub fn forget(&self, url: &str) {
        let mut index = self.write();
        let Some(owner) = index.owners.remove(url) else {
            return;
        };
        for p in above(url) {
            if let Some(here) = index.under.get_mut(p) {
                if let Some(n) = here.get_mut(&owner) {
                    *n -= 1;
                    if *n == 0 {
                        here.remove(&owner);
                    }
                }
                if here.is_empty() {
                    index.under.remove(p);
                }
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.by_url.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.by_url.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// The addresses `url` lies under, in the sense of [`conflict_in`]'s `url/` prefix: each of
/// its prefixes that ends before a `/` of its path (`a://h/x/y`: `a://h`, `a://h/x`).
fn above(url: &str) -> impl Iterator<Item = &str> {
    let start = url.find("://").map_or(url.len(), |i| i + 3);
    url[start..]
        .match_indices('/')
        .map(move |(i, _)| &url[..start + i])
}

/// See [`Claims::conflict`]: `url` and its parents looked up one by one; what lies under it
/// from the per-address counts, so the asker's own claims there are never walked.
fn conflict_in(index: &Index, url: &str, owner: &str) -> Option<String> {
    let mut at = Some(url);
    while let Some(u) = at {
        if index.owners.get(u).is_some_and(|o| o != owner) {
            return Some(u.to_string());
        }
        at = crate::rethink::address::parent(u);
    }
    let others = index.under.get(url)?.keys().any(|o| o != owner);
    if !others {
        return None;
    }
    // Named for the refusal: the first of another's keys among the first few under `url`
    // (between `url/` and `url0`: `0` follows `/`), else the subtree.
    let below = format!("{url}/");
    let end = format!("{url}0");
    let named = index
        .owners
        .range(below..end)
        .take(CONFLICT_SCAN)
        .find(|(_, o)| o.as_str() != owner)
        .map(|(u, _)| u.clone());
    Some(named.unwrap_or_else(|| format!("{url}/…")))
}

/// One principal's changes to what it holds, one at a time: a request that may add to its
/// holdings (a runtime, an allocation, a claim, a registration, a return route) takes its
/// principal's turn before reading the counts and keeps it until the change is counted —
/// and no longer: deliveries, notifications and waits on other principals' sockets come
/// after the turn is given back, so nobody's slow receiver holds another's turn.
///
/// One lock per principal (never shared with another: no stripes whose collisions would make
/// one principal wait for another), created on first use and forgotten once nobody holds or
/// waits for it, so the map holds only principals with a request in flight.
#[derive(Default)]
pub struct Turns {
    by_owner: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A principal's turn, given back when dropped.
pub struct Turn<'a> {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    owner: String,
    turns: &'a Turns,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.turns.forget_if_unused(&self.owner);
    }
}

impl Turns {
    /// Waits for `owner`'s turn, at most `within`; `None` when it did not come in time (the
    /// caller tells its client to retry).
    pub async fn take(&self, owner: &str, within: std::time::Duration) -> Option<Turn<'_>> {
        // Made before the wait, so that however the wait ends — in time, timed out, or its
        // future dropped (a request given up) — dropping it forgets the lock if nobody else
        // uses it. (The lock's clone, moved into the wait, is dropped before it.)
        let mut turn = Turn {
            guard: None,
            owner: owner.to_string(),
            turns: self,
        };
        let lock = Arc::clone(self.lock().entry(owner.to_string()).or_default());
        turn.guard = tokio::time::timeout(within, lock.lock_owned()).await.ok();
        turn.guard.is_some().then_some(turn)
    }

    /// How many principals have a request holding or waiting for their turn.
    pub fn in_use(&self) -> usize {
        self.lock().len()
    }

    /// Forgets `owner`'s lock when only the map refers to it (nobody holds or waits for it;
    /// a new taker clones it under the same map lock, so none is forgotten under a waiter).
    fn forget_if_unused(&self, owner: &str) {
        let mut by_owner = self.lock();
        if by_owner
            .get(owner)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            by_owner.remove(owner);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        crate::sync::lock(&self.by_owner)
    }
}

/// Principal (a record's `user`) → its holdings.
#[derive(Default)]
pub struct Owners {
    by_owner: Mutex<HashMap<String, Arc<Owner>>>,
}

impl Owners {
    /// The holdings of `owner`, created empty on first use.
    pub fn get(&self, owner: &str) -> Arc<Owner> {
        self.lock().entry(owner.to_string()).or_default().clone()
    }

    /// The holdings of `owner`, if it owns anything.
    pub fn find(&self, owner: &str) -> Option<Arc<Owner>> {
        self.lock().get(owner).cloned()
    }

    /// `url`, with `record`'s counts, now belongs to `owner`.
    pub fn add(&self, owner: &str, url: &str, record: &RuntimeRecord) -> Arc<Owner> {
        let holdings = self.get(owner);
        if holdings.lock_urls().insert(url.to_string()) {
            holdings.changed(Counts::default(), counts(record));
        }
        holdings
    }

    /// `url`, with `record`'s counts, no longer belongs to `owner`.
    pub fn remove(&self, owner: &str, url: &str, record: &RuntimeRecord) {
        let mut by_owner = self.lock();
        let Some(holdings) = by_owner.get(owner).cloned() else {
            return;
        };
        let mut urls = holdings.lock_urls();
        if urls.remove(url) {
            holdings.changed(counts(record), Counts::default());
        }
        if urls.is_empty() {
            by_owner.remove(owner);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Owner>>> {
        crate::sync::lock(&self.by_owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(addresses: usize, foreign: usize) -> RuntimeRecord {
        RuntimeRecord {
            user: Some("@a:l".into()),
            allocations: [(
                "k".to_string(),
                (0..addresses).map(|i| format!("hyperty://l/{i}")).collect(),
            )]
            .into(),
            foreign: (0..foreign).map(|i| format!("hyperty://x/{i}")).collect(),
            ..RuntimeRecord::default()
        }
    }

    #[test]
    fn claims_hold_urls_their_prefixes_and_what_lies_under_them() {
        let claims = Claims::default();
        assert_eq!(claims.take("runtime://l/sub", "@a:l"), Ok(()));
        assert_eq!(
            claims.take("runtime://l/sub/7", "@a:l"),
            Ok(()),
            "nested, same owner"
        );
        for (url, conflict) in [
            ("runtime://l/sub", "runtime://l/sub"),
            ("runtime://l/sub/8", "runtime://l/sub"),
            ("runtime://l/sub/7/sm", "runtime://l/sub/7"),
            ("runtime://l", "runtime://l/sub"),
        ] {
            assert_eq!(claims.take(url, "@b:l"), Err(conflict.to_string()), "{url}");
        }
        assert_eq!(
            claims.take("runtime://l/subway", "@b:l"),
            Ok(()),
            "not a prefix"
        );
        assert_eq!(claims.conflict("runtime://l/sub/9", "@a:l"), None);
        claims.forget("runtime://l/subway");
        assert_eq!(claims.conflict("runtime://l/subway", "@a:l"), None);
    }

    /// Review N15: what lies under an address was found by walking every key under it, the
    /// asker's own included, under the index's lock. It is counted per address now: another
    /// principal's key among thousands of the asker's is found without walking them, and
    /// forgetting keys leaves nothing counted.
    #[test]
    fn what_lies_under_an_address_is_found_without_walking_the_askers_own() {
        let claims = Claims::default();
        for n in 0..5000 {
            assert_eq!(
                claims.take(&format!("hyperty://l/p/a{n:05}"), "@a:l"),
                Ok(())
            );
        }
        assert_eq!(
            claims.conflict("hyperty://l/p", "@a:l"),
            None,
            "all its own"
        );
        assert_eq!(claims.take("hyperty://l/p/b", "@b:l"), Ok(()), "a sibling");
        let named = claims.conflict("hyperty://l/p", "@a:l");
        assert_eq!(
            named.as_deref(),
            Some("hyperty://l/p/…"),
            "past the scan: the subtree"
        );
        assert_eq!(
            claims.conflict("hyperty://l/p", "@b:l").as_deref(),
            Some("hyperty://l/p/a00000")
        );
        claims.forget("hyperty://l/p/b");
        assert_eq!(claims.conflict("hyperty://l/p", "@a:l"), None);
        for n in 0..5000 {
            claims.forget(&format!("hyperty://l/p/a{n:05}"));
        }
        let index = claims.read();
        assert!(
            index.owners.is_empty() && index.under.is_empty(),
            "nothing left"
        );
    }

    #[tokio::test]
    async fn each_principal_has_a_turn_of_its_own() {
        use futures_util::FutureExt;
        let turns = Turns::default();
        let wait = std::time::Duration::from_secs(60);
        // Held at once by a thousand principals: none waits for another's (with shared
        // stripes, some would).
        let mut held = Vec::new();
        for i in 0..1000 {
            // (Unconstrained: tokio's cooperative budget would make the 129th wait a tick.)
            let owner = format!("@p{i}:l");
            let turn = tokio::task::unconstrained(turns.take(&owner, wait))
                .now_or_never()
                .flatten();
            held.push(turn.unwrap_or_else(|| panic!("principal {i} waited for another's turn")));
        }
        // The same principal's next request waits for the turn.
        let zero = std::time::Duration::ZERO;
        assert!(turns.take("@p7:l", zero).await.is_none());
        drop(held);
        assert_eq!(
            turns.in_use(),
            0,
            "nothing kept for principals with nothing in flight"
        );
        assert!(turns.take("@p7:l", zero).await.is_some());
        assert_eq!(turns.in_use(), 0);
    }

    /// Review N16: a wait given up (its future dropped, e.g. a peer post cancelled) left
    /// its principal's lock in the map when the holder had let go meanwhile.
    #[tokio::test]
    async fn a_wait_given_up_forgets_the_turn() {
        use futures_util::FutureExt;
        let turns = Turns::default();
        let held = turns.take("@a:l", std::time::Duration::ZERO).await;
        assert!(held.is_some());
        let mut waiting = Box::pin(turns.take("@a:l", std::time::Duration::from_secs(60)));
        assert!((&mut waiting).now_or_never().is_none(), "waits");
        drop(held);
        assert_eq!(turns.in_use(), 1, "the waiter's");
        drop(waiting);
        assert_eq!(turns.in_use(), 0, "forgotten with the wait");
    }

    #[test]
    fn holdings_follow_runtimes_and_their_records() {
        let owners = Owners::default();
        let owner = owners.add("@a:l", "runtime://l/1", &record(3, 1));
        owners.add("@a:l", "runtime://l/2", &record(2, 0));
        owners.add("@a:l", "runtime://l/2", &record(2, 0)); // once per URL
        assert_eq!(
            (owner.runtimes(), owner.addresses(), owner.foreign()),
            (2, 5, 1)
        );
        owner.changed(
            Counts {
                addresses: 2,
                ..Counts::default()
            },
            Counts::default(),
        );
        assert_eq!(owner.addresses(), 3);
        owners.remove("@a:l", "runtime://l/1", &record(3, 1));
        assert_eq!(
            (owner.runtimes(), owner.addresses(), owner.foreign()),
            (1, 0, 0)
        );
        owners.remove("@a:l", "runtime://l/2", &record(0, 0));
        assert!(owners.find("@a:l").is_none());
    }

    #[test]
    fn released_runtimes_are_counted_apart_from_live_ones() {
        let owners = Owners::default();
        let tombstone = RuntimeRecord {
            released: true,
            ..record(0, 0)
        };
        let owner = owners.add("@a:l", "runtime://l/1", &record(1, 0));
        owners.add("@a:l", "runtime://l/2", &tombstone);
        assert_eq!((owner.runtimes(), owner.released()), (1, 1));
        // Runtime 1 is released, runtime 2 taken up again.
        owner.changed(counts(&record(1, 0)), counts(&tombstone));
        owner.changed(counts(&tombstone), counts(&record(0, 0)));
        assert_eq!(
            (owner.runtimes(), owner.released(), owner.addresses()),
            (1, 1, 0)
        );
        owners.remove("@a:l", "runtime://l/1", &tombstone);
        assert_eq!((owner.runtimes(), owner.released()), (1, 0));
    }
}
