//! Shares of a budget: what each charge (a name the caller gives, such as the principal
//! that sent a message) holds in bytes and entries, against a limit per charge, so that one
//! charge filling its share leaves the rest of the budget to the others. A charge that holds
//! nothing is forgotten; the empty charge ([`NODE`]) is counted but never limited.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Who an entry is charged to: shared by every entry of one charge, cheap to clone.
pub type Charge = Arc<str>;

/// The charge of what the node itself queues (notifications, relayed messages): never
/// refused by a share.
pub const NODE: &str = "";

/// What one charge holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Bytes.
    pub bytes: usize,
    /// Entries.
    pub count: u64,
}

/// Per-charge holdings against a per-charge limit (in bytes and in entries).
#[derive(Debug)]
pub struct Shares {
    held: Mutex<HashMap<Charge, Held>>,
    max_bytes: AtomicUsize,
    max_count: AtomicU64,
}

impl Default for Shares {
    fn default() -> Self {
        Self::new(usize::MAX, u64::MAX)
    }
}

impl Shares {
    /// Shares of at most `max_bytes` and `max_count` entries each.
    pub fn new(max_bytes: usize, max_count: u64) -> Self {
        Self {
            held: Mutex::new(HashMap::new()),
            max_bytes: AtomicUsize::new(max_bytes),
            max_count: AtomicU64::new(max_count),
        }
    }

    /// Changes the per-charge limits.
    pub fn limit(&self, max_bytes: usize, max_count: u64) {
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
        self.max_count.store(max_count, Ordering::Relaxed);
    }

    /// Whether `charge` may hold `bytes` more in one more entry.
    pub fn has_room(&self, charge: &str, bytes: usize) -> bool {
        if charge == NODE {
            return true;
        }
        let held = self.held(charge);
        held.bytes.saturating_add(bytes) <= self.max_bytes.load(Ordering::Relaxed)
            && held.count < self.max_count.load(Ordering::Relaxed)
    }

    /// `charge` holds one more entry of `bytes` if it has room for it ([`Shares::has_room`]),
    /// checked and counted at once: concurrent callers never take a share past its limit.
    pub fn try_add(&self, charge: &Charge, bytes: usize) -> bool {
        if &**charge == NODE {
            self.add(charge, bytes);
            return true;
        }
        let mut held = self.lock();
        let entry = held.entry(Arc::clone(charge)).or_default();
        let fits = entry.bytes.saturating_add(bytes) <= self.max_bytes.load(Ordering::Relaxed)
            && entry.count < self.max_count.load(Ordering::Relaxed);
        if fits {
            entry.bytes = entry.bytes.saturating_add(bytes);
            entry.count = entry.count.saturating_add(1);
        } else if entry.count == 0 {
            held.remove(charge);
        }
        fits
    }

    /// `charge` holds one more entry of `bytes`.
    pub fn add(&self, charge: &Charge, bytes: usize) {
        let mut held = self.lock();
        let entry = held.entry(Arc::clone(charge)).or_default();
        entry.bytes = entry.bytes.saturating_add(bytes);
        entry.count = entry.count.saturating_add(1);
    }

    /// `charge` holds `count` entries of `bytes` (in all) less.
    pub fn free(&self, charge: &str, bytes: usize, count: u64) {
        let mut held = self.lock();
        let Some(entry) = held.get_mut(charge) else {
            return;
        };
        entry.bytes = entry.bytes.saturating_sub(bytes);
        entry.count = entry.count.saturating_sub(count);
        if entry.count == 0 {
            held.remove(charge);
        }
    }

    /// What `charge` holds now.
    pub fn held(&self, charge: &str) -> Held {
        self.lock().get(charge).copied().unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Charge, Held>> {
        crate::sync::lock(&self.held)
    }
}

/// Frees what each entry of `entries` (its charge, its bytes) held in `shares`, one lock per
/// charge run.
pub fn free_all<'a>(shares: &Shares, entries: impl IntoIterator<Item = (&'a str, usize)>) {
    let mut sums: HashMap<&str, Held> = HashMap::new();
    for (charge, bytes) in entries {
        let sum = sums.entry(charge).or_default();
        sum.bytes += bytes;
        sum.count += 1;
    }
    for (charge, sum) in sums {
        shares.free(charge, sum.bytes, sum.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_charge_filling_its_share_leaves_the_others_theirs() {
        let shares = Shares::new(10, 3);
        let eve: Charge = Arc::from("@eve:l");
        let bob: Charge = Arc::from("@bob:l");
        shares.add(&eve, 6);
        assert!(shares.has_room("@eve:l", 4));
        assert!(!shares.has_room("@eve:l", 5), "bytes");
        assert!(shares.has_room("@bob:l", 10), "another charge");
        shares.add(&eve, 1);
        shares.add(&eve, 1);
        assert!(!shares.has_room("@eve:l", 0), "entries");
        assert!(
            shares.has_room(NODE, usize::MAX),
            "the node is never refused"
        );
        shares.add(&bob, 2);
        free_all(&shares, [("@eve:l", 6), ("@eve:l", 1), ("@bob:l", 2)]);
        assert_eq!(shares.held("@eve:l"), Held { bytes: 1, count: 1 });
        assert_eq!(shares.held("@bob:l"), Held::default(), "forgotten");
        assert!(shares.lock().get("@bob:l").is_none());
        shares.free("@eve:l", 100, 100);
        assert!(shares.lock().is_empty(), "never below zero, then forgotten");
    }
}
