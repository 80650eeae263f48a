//! A count per key in a shared map, each unit held by a guard that gives it back when
//! dropped (a key whose count is back at 0 is forgotten, so the map holds only keys with
//! something held): what the listeners' per-address shares, the handshakes per address
//! block and the sockets per principal count in.

use crate::sync::lock;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// How many units each key holds.
pub struct Counts<K: Eq + Hash> {
    by_key: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash> Default for Counts<K> {
    fn default() -> Self {
        Self {
            by_key: Arc::default(),
        }
    }
}

impl<K: Eq + Hash + Clone> Counts<K> {
    /// One more unit for `key`, unless it holds `limit` already (`Err` with how many it
    /// holds); checked and counted at once. Given back when the [`Counted`] drops.
    pub fn take(&self, key: K, limit: usize) -> Result<Counted<K>, usize> {
        let mut by_key = lock(&self.by_key);
        let held = by_key.get(&key).copied().unwrap_or(0);
        if held >= limit {
            return Err(held);
        }
        by_key.insert(key.clone(), held + 1);
        Ok(Counted {
            key,
            by_key: Arc::clone(&self.by_key),
        })
    }

    /// How many units `key` holds.
    pub fn held(&self, key: &K) -> usize {
        lock(&self.by_key).get(key).copied().unwrap_or(0)
    }

    /// How many keys hold something.
    pub fn keys(&self) -> usize {
        lock(&self.by_key).len()
    }
}

/// One unit of a key's count (see [`Counts`]); given back on drop.
pub struct Counted<K: Eq + Hash> {
    key: K,
    by_key: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash> Drop for Counted<K> {
    fn drop(&mut self) {
        let mut by_key = lock(&self.by_key);
        if let Some(held) = by_key.get_mut(&self.key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                by_key.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_holds_at_most_its_limit_and_gets_units_back() {
        let counts = Counts::default();
        let first = counts.take("a", 2).expect("first");
        let second = counts.take("a", 2).expect("second");
        assert_eq!(counts.take("a", 2).err(), Some(2));
        let _other = counts.take("b", 2).expect("another key's own");
        drop(first);
        assert_eq!(counts.held(&"a"), 1);
        drop(second);
        assert_eq!(counts.held(&"a"), 0);
        assert_eq!(counts.keys(), 1, "a key back at 0 is forgotten");
    }
}
