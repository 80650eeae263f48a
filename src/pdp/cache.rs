//! Decision cache: results keyed by (bundle generation, query, digest of the canonical input).
//!
//! The input is written out canonically (object keys sorted, as `serde_json` keeps them) with
//! the configured volatile fields left out, straight into a 128-bit digest — two AHash
//! hashers with independent keys drawn at random when the process starts — so a key is 16
//! bytes whatever the input's size (a 1 MiB input does not cost 1 MiB of cache), and no
//! input is copied to be compared. Two different inputs share an entry only if they collide
//! in both keyed hashes, whose keys an attacker never sees. Every bundle swap bumps the
//! generation and empties the cache, so a decision is never served for a revision other than
//! its own.

use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// Identifies one cached decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    generation: u64,
    query: Arc<str>,
    digest: (u64, u64),
}

/// A bounded, TTL-limited map from [`CacheKey`] to an evaluation result (`None`: undefined).
pub struct DecisionCache {
    entries: Option<moka::sync::Cache<CacheKey, Arc<Option<Value>>, ahash::RandomState>>,
    ignore: Vec<Vec<String>>,
    /// The two keyed hashes of the digest.
    digests: (ahash::RandomState, ahash::RandomState),
}

/// Bytes written into both hashes of a digest.
struct Digest(ahash::AHasher, ahash::AHasher);

impl Write for Digest {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.write(bytes);
        self.1.write(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl DecisionCache {
    /// A cache of at most `max_entries` results, each served for at most `ttl`, ignoring the
    /// dotted `ignore_fields` of the input. `enabled = false` makes every lookup a miss.
    pub fn new(enabled: bool, max_entries: u64, ttl: Duration, ignore_fields: &[String]) -> Self {
        let entries = enabled.then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                // Keys are whole inputs: a fast keyed hash instead of SipHash halves lookups.
                .build_with_hasher(ahash::RandomState::new())
        });
        let ignore = ignore_fields
            .iter()
            .map(|f| {
                f.trim_start_matches("input.")
                    .split('.')
                    .map(str::to_string)
                    .collect()
            })
            .collect();
        Self {
            entries,
            ignore,
            digests: (ahash::RandomState::new(), ahash::RandomState::new()),
        }
    }

    /// Whether lookups can hit at all.
    pub fn is_enabled(&self) -> bool {
        self.entries.is_some()
    }

    /// The key for `query` and `input` under `generation`.
    pub fn key(&self, generation: u64, query: &Arc<str>, input: Option<&Value>) -> CacheKey {
        let mut digest = Digest(self.digests.0.build_hasher(), self.digests.1.build_hasher());
        match input {
            None => digest.0.write_u8(b'-'),
            Some(value) => {
                let mut path = Vec::new();
                write_canonical(&mut digest, value, &self.ignore, &mut path);
            }
        }
        CacheKey {
            generation,
            query: Arc::clone(query),
            digest: (digest.0.finish(), digest.1.finish()),
        }
    }

    /// Whether the cache holds a result for `key`.
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.entries.as_ref().is_some_and(|e| e.contains_key(key))
    }

    /// The cached result, if any.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<Option<Value>>> {
        self.entries.as_ref()?.get(key)
    }

    /// Remembers a result.
    pub fn insert(&self, key: CacheKey, result: Arc<Option<Value>>) {
        if let Some(entries) = &self.entries {
            entries.insert(key, result);
        }
    }

    /// Drops every entry (on bundle swap).
    pub fn clear(&self) {
        if let Some(entries) = &self.entries {
            entries.invalidate_all();
        }
    }
}

/// Writes `value` as compact JSON, skipping object members whose path is in `ignore`.
fn write_canonical<'a, W: Write>(
    out: &mut W,
    value: &'a Value,
    ignore: &[Vec<String>],
    path: &mut Vec<&'a str>,
) {
    match value {
        Value::Object(map) => {
            put(out, b"{");
            let mut first = true;
            for (key, member) in map {
                path.push(key);
                let skipped = ignore.iter().any(|p| {
                    p.len() == path.len() && p.iter().zip(path.iter()).all(|(a, b)| a == b)
                });
                if !skipped {
                    if !first {
                        put(out, b",");
                    }
                    first = false;
                    // Writing into a Vec or a digest cannot fail.
                    let _ = serde_json::to_writer(&mut *out, key);
                    put(out, b":");
                    write_canonical(out, member, ignore, path);
                }
                path.pop();
            }
            put(out, b"}");
        }
        Value::Array(items) => {
            put(out, b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    put(out, b",");
                }
                // Array elements are not addressed by ignore paths.
                let mut nested = Vec::new();
                write_canonical(out, item, &[], &mut nested);
            }
            put(out, b"]");
        }
        scalar => {
            // Writing into a Vec or a digest cannot fail.
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

fn put<W: Write>(out: &mut W, bytes: &[u8]) {
    // Writing into a Vec or a digest cannot fail.
    let _ = out.write_all(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The canonical text the digest of the key is made of.
    fn key_bytes(ignore: &[&str], input: Value) -> String {
        let ignore: Vec<String> = ignore.iter().map(|s| s.to_string()).collect();
        let cache = DecisionCache::new(true, 10, Duration::from_secs(1), &ignore);
        let mut bytes = Vec::new();
        write_canonical(&mut bytes, &input, &cache.ignore, &mut Vec::new());
        String::from_utf8(bytes).expect("utf8")
    }

    #[test]
    fn keys_are_small_and_tell_inputs_apart() {
        let cache = DecisionCache::new(true, 10, Duration::from_secs(1), &["message.id".into()]);
        let query: Arc<str> = Arc::from("q");
        let big = json!({"message": {"body": "x".repeat(1 << 20)}});
        assert_eq!(
            std::mem::size_of_val(&cache.key(1, &query, Some(&big)).digest),
            16
        );
        let key = |v: Value| cache.key(1, &query, Some(&v));
        assert_eq!(
            key(json!({"message": {"id": 1, "t": 1}})),
            key(json!({"message": {"id": 2, "t": 1}}))
        );
        assert_ne!(
            key(json!({"message": {"t": 1}})),
            key(json!({"message": {"t": 2}}))
        );
        assert_ne!(key(json!({"a": "b"})), key(json!({"a": ["b"]})));
    }

    #[test]
    fn key_is_canonical_and_skips_ignored_fields() {
        let cases = [
            (
                vec![],
                json!({"b": 1, "a": [1, {"y": 2, "x": 1}]}),
                r#"{"a":[1,{"x":1,"y":2}],"b":1}"#,
            ),
            (
                vec!["message.id"],
                json!({"message": {"id": 7, "type": "create"}}),
                r#"{"message":{"type":"create"}}"#,
            ),
            (
                vec!["input.context.time"],
                json!({"context": {"time": "t", "node": "n"}}),
                r#"{"context":{"node":"n"}}"#,
            ),
            (
                vec!["id"],
                json!({"message": {"id": 7}}),
                r#"{"message":{"id":7}}"#,
            ),
            (vec![], json!("s\"q"), r#""s\"q""#),
        ];
        for (ignore, input, expected) in cases {
            assert_eq!(key_bytes(&ignore, input), expected);
        }
    }

    #[test]
    fn entries_are_per_generation_and_cleared() {
        let cache = DecisionCache::new(true, 10, Duration::from_secs(60), &[]);
        let query: Arc<str> = Arc::from("data.p.allow");
        let input = json!({"a": 1});
        cache.insert(
            cache.key(1, &query, Some(&input)),
            Arc::new(Some(json!(true))),
        );
        assert!(cache.get(&cache.key(1, &query, Some(&input))).is_some());
        assert!(cache.get(&cache.key(2, &query, Some(&input))).is_none());
        assert!(cache.get(&cache.key(1, &query, None)).is_none());
        cache.clear();
        assert!(cache.get(&cache.key(1, &query, Some(&input))).is_none());
    }

    #[test]
    fn disabled_cache_never_hits() {
        let cache = DecisionCache::new(false, 10, Duration::from_secs(60), &[]);
        let query: Arc<str> = Arc::from("q");
        cache.insert(cache.key(1, &query, None), Arc::new(None));
        assert!(cache.get(&cache.key(1, &query, None)).is_none());
    }
}
