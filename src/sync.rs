//! Locking that survives a panic elsewhere: the node's shared tables stay usable when one
//! task panicked while holding their lock, since every change to them is complete before it
//! is written (no half-updated state is left behind a poisoned lock).

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, taking the value even if another thread panicked while holding it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
