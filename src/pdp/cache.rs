//! Decision cache: results keyed by the bundle generation and a digest of the query and the
//! canonical input.
//!
//! The input — JSON as an HTTP client sent it, or the regorus value the node built from its
//! typed inputs (both are a [`Document`]; one document has one key in either form) — is
//! written out canonically (object keys sorted, strings length-prefixed rather than escaped)
//! with the configured volatile fields left out, into a per-thread buffer hashed into a
//! 128-bit digest — two AHash hashers with independent keys drawn at random when the process
//! starts — so a key is 16 bytes whatever the input's size (a 1 MiB input does not cost 1 MiB
//! of cache), and no input is kept to be compared. Two different inputs share an entry only
//! if they collide in both keyed hashes, whose keys an attacker never sees. Every bundle swap
//! bumps the generation and empties the cache, so a decision is never served for a revision
//! other than its own.

use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// Identifies one cached decision: the generation, and the digest of the query and the
/// canonical input (the query is hashed in, not held: a look-up clones no shared `Arc`, and
/// the map hashes 24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    generation: u64,
    digest: (u64, u64),
}

/// A bounded, TTL-limited map from [`CacheKey`] to an evaluation result (`None`: undefined).
pub struct DecisionCache {
    entries: Option<moka::sync::Cache<CacheKey, Arc<Option<Value>>, ahash::RandomState>>,
    ignore: Vec<Vec<String>>,
    /// The two keyed hashes of the digest.
    digests: (ahash::RandomState, ahash::RandomState),
}

thread_local! {
    /// The canonical text of the input being keyed on this thread.
    static CANONICAL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A thread keeps its key buffer up to this size (a huge input's is dropped after use).
const MAX_KEPT_BUFFER: usize = 64 * 1024;

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
    pub fn key<D: Document>(&self, generation: u64, query: &str, input: Option<&D>) -> CacheKey {
        // The canonical text goes into this thread's buffer, then into both hashes at once:
        // hashing it in one piece is several times faster than hashing each small write.
        let digest = CANONICAL.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            buffer.clear();
            // The query first, length-prefixed: no query and input can read as another's.
            write_str(&mut *buffer, query);
            match input {
                None => buffer.push(b'-'),
                Some(value) => {
                    let mut path = Vec::new();
                    write_canonical(&mut *buffer, value, &self.ignore, &mut path);
                }
            }
            let (mut a, mut b) = (self.digests.0.build_hasher(), self.digests.1.build_hasher());
            a.write(&buffer);
            b.write(&buffer);
            if buffer.capacity() > MAX_KEPT_BUFFER {
                *buffer = Vec::new();
            }
            (a.finish(), b.finish())
        });
        CacheKey { generation, digest }
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

/// A document a key can be written from: objects (keys in order), arrays and scalars.
pub trait Document: Sized {
    /// An object's members, in key order.
    type Members<'a>: Iterator<Item = (&'a str, &'a Self)>
    where
        Self: 'a;
    /// An array's elements.
    type Items<'a>: Iterator<Item = &'a Self>
    where
        Self: 'a;
    /// What this is.
    fn view(&self) -> View<'_, Self>;
    /// Writes a scalar as JSON.
    fn write_scalar<W: Write>(&self, out: &mut W);
}

/// The shape of a [`Document`] node.
pub enum View<'a, D: Document + 'a> {
    /// An object.
    Object(D::Members<'a>),
    /// An array.
    Array(D::Items<'a>),
    /// A string.
    String(&'a str),
    /// Anything else (a number, a boolean, null; a set, written whole).
    Scalar,
}

impl Document for Value {
    type Members<'a> = std::iter::Map<
        serde_json::map::Iter<'a>,
        fn((&'a String, &'a Value)) -> (&'a str, &'a Value),
    >;
    type Items<'a> = std::slice::Iter<'a, Value>;

    fn view(&self) -> View<'_, Self> {
        match self {
            Value::Object(map) => View::Object(map.iter().map(json_member as fn(_) -> _)),
            Value::Array(items) => View::Array(items.iter()),
            Value::String(text) => View::String(text),
            _ => View::Scalar,
        }
    }

    fn write_scalar<W: Write>(&self, out: &mut W) {
        // Writing into a Vec or a digest cannot fail.
        let _ = serde_json::to_writer(out, self);
    }
}

impl Document for regorus::Value {
    type Members<'a> = std::iter::Map<
        regorus::value::Iter<'a>,
        fn((&'a regorus::Value, &'a regorus::Value)) -> (&'a str, &'a regorus::Value),
    >;
    type Items<'a> = regorus::value::ArrayIter<'a>;

    fn view(&self) -> View<'_, Self> {
        match self {
            regorus::Value::Object(map) => {
                View::Object(map.iter_sorted().map(rego_member as fn(_) -> _))
            }
            regorus::Value::Array(items) => View::Array(items.iter()),
            regorus::Value::String(text) => View::String(text),
            // Sets (never in an input built from JSON) are written whole, as arrays.
            _ => View::Scalar,
        }
    }

    fn write_scalar<W: Write>(&self, out: &mut W) {
        // Writing into a Vec or a digest cannot fail.
        let _ = serde_json::to_writer(out, self);
    }
}

fn json_member<'a>((key, value): (&'a String, &'a Value)) -> (&'a str, &'a Value) {
    (key, value)
}

fn rego_member<'a>(
    (key, value): (&'a regorus::Value, &'a regorus::Value),
) -> (&'a str, &'a regorus::Value) {
    // The node's inputs have string keys only.
    (key.as_string().map(|s| &**s).unwrap_or(""), value)
}

/// Writes `value` canonically, skipping object members whose path is in `ignore`. The form
/// is JSON's structure without its escaping (the slow part of writing JSON): a string is
/// `"<length>:<bytes>`, a number, boolean or null its JSON text and `;`, an object `{`, each
/// member's key and value, `}`, an array `[`, its elements, `]`. Lengths and terminators
/// make it unambiguous: two documents have the same form only if they are equal.
fn write_canonical<'a, W: Write, D: Document>(
    out: &mut W,
    value: &'a D,
    ignore: &[Vec<String>],
    path: &mut Vec<&'a str>,
) {
    match value.view() {
        View::Object(members) => {
            put(out, b"{");
            for (key, member) in members {
                path.push(key);
                // The member's own name first: most members share no name with an ignored
                // path, and that is one comparison.
                let skipped = ignore.iter().any(|p| {
                    p.len() == path.len()
                        && p.last().is_some_and(|last| last == key)
                        && p.iter().zip(path.iter()).all(|(a, b)| a == b)
                });
                if !skipped {
                    write_str(out, key);
                    write_canonical(out, member, ignore, path);
                }
                path.pop();
            }
            put(out, b"}");
        }
        View::Array(items) => {
            put(out, b"[");
            for item in items {
                // Array elements are not addressed by ignore paths.
                let mut nested = Vec::new();
                write_canonical(out, item, &[], &mut nested);
            }
            put(out, b"]");
        }
        View::String(text) => write_str(out, text),
        View::Scalar => {
            value.write_scalar(out);
            put(out, b";");
        }
    }
}

fn write_str<W: Write>(out: &mut W, text: &str) {
    // The length in decimal, without the formatting machinery (this runs for every string).
    let mut digits = [0u8; 20];
    let (mut n, mut at) = (text.len(), digits.len());
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(out, b"\"");
    put(out, &digits[at..]);
    put(out, b":");
    put(out, text.as_bytes());
}

fn put<W: Write>(out: &mut W, bytes: &[u8]) {
    // Writing into a Vec cannot fail.
    let _ = out.write_all(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The canonical form the digest of the key is made of.
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
                json!({"b": 1, "a": [1, {"y": 2, "x": null}]}),
                r#"{"1:a[1;{"1:xnull;"1:y2;}]"1:b1;}"#,
            ),
            (
                vec!["message.id"],
                json!({"message": {"id": 7, "type": "create"}}),
                r#"{"7:message{"4:type"6:create}}"#,
            ),
            (
                vec!["input.context.time"],
                json!({"context": {"time": "t", "node": "n"}}),
                r#"{"7:context{"4:node"1:n}}"#,
            ),
            (
                vec!["id"],
                json!({"message": {"id": 7}}),
                r#"{"7:message{"2:id7;}}"#,
            ),
            (vec![], json!("s\"q:"), r#""4:s"q:"#),
        ];
        for (ignore, input, expected) in cases {
            assert_eq!(key_bytes(&ignore, input), expected);
        }
    }

    #[test]
    fn json_and_regorus_values_of_one_document_have_one_key() {
        let cache = DecisionCache::new(true, 10, Duration::from_secs(1), &["message.id".into()]);
        let query: Arc<str> = Arc::from("q");
        let input =
            json!({"message": {"id": 3, "to": ["a", "b"], "n": 2.5, "ok": true}, "z": null});
        assert_eq!(
            cache.key(1, &query, Some(&input)),
            cache.key(1, &query, Some(&regorus::Value::from(input.clone())))
        );
        // Strings that would look alike without their lengths do not.
        assert_ne!(
            cache.key(1, &query, Some(&json!(["a", "b"]))),
            cache.key(1, &query, Some(&json!(["a\"1:b"])))
        );
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
        assert!(cache.get(&cache.key::<Value>(1, &query, None)).is_none());
        cache.clear();
        assert!(cache.get(&cache.key(1, &query, Some(&input))).is_none());
    }

    #[test]
    fn disabled_cache_never_hits() {
        let cache = DecisionCache::new(false, 10, Duration::from_secs(60), &[]);
        let query: Arc<str> = Arc::from("q");
        cache.insert(cache.key::<Value>(1, &query, None), Arc::new(None));
        assert!(cache.get(&cache.key::<Value>(1, &query, None)).is_none());
    }
}
