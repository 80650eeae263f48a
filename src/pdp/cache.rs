//! Decision cache: results keyed by the bundle generation and a digest of the query and the
//! canonical input.
//!
//! The input — JSON as an HTTP client sent it, regorus's value, or the node's typed input
//! ([`super::TypedInput`], keyed straight from its fields: on a hit regorus's value is never
//! built) — is written out canonically (object keys sorted, strings
//! length-prefixed rather than escaped) with the configured volatile fields left out, into a
//! per-thread buffer hashed into a 128-bit digest — two AHash hashers with independent keys
//! drawn at random when the process starts — so a key is 16 bytes whatever the input's size
//! (a 1 MiB input does not cost 1 MiB of cache), and no input is kept to be compared. One
//! document has one key in every form. Two different inputs share an entry only if they
//! collide in both keyed hashes, whose keys an attacker never sees. Every bundle swap bumps
//! the generation and empties the cache, so a decision is never served for a revision other
//! than its own.

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
    ignore: Ignore,
    /// The two keyed hashes of the digest.
    digests: (ahash::RandomState, ahash::RandomState),
}

/// The ignored fields as a tree of member names: a member whose node is `whole` is left
/// out; below the others, only their children's names are compared. Writing a key walks it
/// alongside the input, so a member costs one look-up among its siblings' ignored names (none,
/// mostly) and no path is built.
#[derive(Debug, Default)]
struct Ignore {
    whole: bool,
    children: Vec<(String, Ignore)>,
}

impl Ignore {
    fn of(fields: &[String]) -> Self {
        let mut root = Ignore::default();
        for field in fields {
            let mut node = &mut root;
            for name in field.trim_start_matches("input.").split('.') {
                let at = match node.children.iter().position(|(n, _)| n == name) {
                    Some(at) => at,
                    None => {
                        node.children.push((name.to_string(), Ignore::default()));
                        node.children.len() - 1
                    }
                };
                node = &mut node.children[at].1;
            }
            node.whole = true;
        }
        root
    }

    fn child(&self, name: &str) -> Option<&Ignore> {
        self.children
            .iter()
            .find_map(|(n, child)| (n == name).then_some(child))
    }
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
        Self {
            entries,
            ignore: Ignore::of(ignore_fields),
            digests: (ahash::RandomState::new(), ahash::RandomState::new()),
        }
    }

    /// Whether lookups can hit at all.
    pub fn is_enabled(&self) -> bool {
        self.entries.is_some()
    }

    /// The key for `query` and `input` under `generation`.
    pub fn key<D: Keyed + ?Sized>(
        &self,
        generation: u64,
        query: &str,
        input: Option<&D>,
    ) -> CacheKey {
        // The canonical text goes into this thread's buffer, then into both hashes at once:
        // hashing it in one piece is several times faster than hashing each small write.
        let digest = CANONICAL.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            buffer.clear();
            // The query first, length-prefixed: no query and input can read as another's.
            write_str(&mut buffer, query);
            match input {
                None => buffer.push(b'-'),
                Some(value) => self.write_canonical(&mut buffer, value),
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

    /// Appends the canonical form of `input` (without the ignored fields) to `out`.
    fn write_canonical<D: Keyed + ?Sized>(&self, out: &mut Vec<u8>, input: &D) {
        input.write_key(&mut KeyWriter {
            out,
            ignore: Some(&self.ignore),
        });
    }

    /// The canonical form of `input` that keys are the digest of (for tests comparing forms).
    #[cfg(test)]
    pub(crate) fn canonical<D: Keyed + ?Sized>(&self, input: &D) -> String {
        let mut out = Vec::new();
        self.write_canonical(&mut out, input);
        String::from_utf8_lossy(&out).into_owned()
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

/// What a cache key can be made of: anything that writes itself as the JSON document it
/// stands for, through a [`KeyWriter`]. A document has one canonical form whichever type
/// writes it (JSON, regorus's value, a typed input): that is what the tests of each type
/// check.
pub trait Keyed {
    /// Writes the canonical form of `self`.
    fn write_key(&self, out: &mut KeyWriter<'_>);
}

/// Writes a canonical form. The form is JSON's structure without its escaping (the slow
/// part of writing JSON): a string is `"<length>:<bytes>`, a number, boolean or null its
/// JSON text and `;`, an object `{`, each member's key and value in key order, `}`, an
/// array `[`, its elements, `]`. Lengths and terminators make it unambiguous: two documents
/// have the same form only if they are equal. Members whose path is ignored are left out.
pub struct KeyWriter<'w> {
    out: &'w mut Vec<u8>,
    /// The ignored paths below the value being written (`None`: nothing below it is).
    ignore: Option<&'w Ignore>,
}

impl<'w> KeyWriter<'w> {
    /// Writes an object whose members `members` writes, in key order.
    pub fn object(&mut self, members: impl FnOnce(&mut Members<'_, 'w>)) {
        self.out.push(b'{');
        members(&mut Members {
            writer: self,
            #[cfg(debug_assertions)]
            last: None,
        });
        self.out.push(b'}');
    }

    /// Writes an array of `items`. Array elements are not addressed by ignore paths.
    pub fn array<'i, T: Keyed + 'i>(&mut self, items: impl IntoIterator<Item = &'i T>) {
        self.out.push(b'[');
        let ignore = self.ignore.take();
        for item in items {
            item.write_key(self);
        }
        self.ignore = ignore;
        self.out.push(b']');
    }

    /// Writes a string.
    pub fn string(&mut self, text: &str) {
        write_str(self.out, text);
    }

    /// Writes a number, boolean or null given as its JSON text.
    pub fn scalar(&mut self, json: &[u8]) {
        self.out.extend_from_slice(json);
        self.out.push(b';');
    }

    /// Writes `value` under `key` unless that path is ignored.
    fn member<V: Keyed + ?Sized>(&mut self, key: &str, value: &V) {
        let below = self.ignore.and_then(|ignore| ignore.child(key));
        if below.is_some_and(|b| b.whole) {
            return;
        }
        write_str(self.out, key);
        let ignore = std::mem::replace(&mut self.ignore, below);
        value.write_key(self);
        self.ignore = ignore;
    }
}

/// The members of an object being written by [`KeyWriter::object`].
pub struct Members<'a, 'w> {
    writer: &'a mut KeyWriter<'w>,
    /// The previous key: keys must come in order (checked in debug builds).
    #[cfg(debug_assertions)]
    last: Option<&'static str>,
}

impl Members<'_, '_> {
    /// Writes the member `key` (keys in byte order, each once).
    pub fn field<V: Keyed + ?Sized>(&mut self, key: &'static str, value: &V) -> &mut Self {
        #[cfg(debug_assertions)]
        {
            debug_assert!(
                self.last.is_none_or(|last| last < key),
                "key {key:?} after {:?}",
                self.last
            );
            self.last = Some(key);
        }
        self.writer.member(key, value);
        self
    }

    /// Writes the member `key` when `value` is present (absent fields are left out, as in
    /// the JSON form).
    pub fn opt<V: Keyed + ?Sized>(&mut self, key: &'static str, value: Option<&V>) -> &mut Self {
        match value {
            Some(value) => self.field(key, value),
            None => self,
        }
    }
}

impl Keyed for str {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.string(self);
    }
}

impl Keyed for String {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.string(self);
    }
}

impl Keyed for bool {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.scalar(if *self { b"true" } else { b"false" });
    }
}

impl Keyed for u64 {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        // Integers as JSON writes them, without the formatting machinery.
        let mut digits = [0u8; 20];
        let at = decimal(*self, &mut digits);
        out.scalar(&digits[at..]);
    }
}

impl Keyed for usize {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        (*self as u64).write_key(out);
    }
}

impl<T: Keyed> Keyed for [T] {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.array(self);
    }
}

impl<T: Keyed> Keyed for Vec<T> {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.array(self);
    }
}

impl<T: Keyed + ?Sized> Keyed for &T {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        (**self).write_key(out);
    }
}

impl Keyed for Value {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        write_document(out, self);
    }
}

impl Keyed for regorus::Value {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        write_document(out, self);
    }
}

/// A document a key can be written from by walking it: objects (keys in order), arrays and
/// scalars.
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

/// Writes a document by walking it.
fn write_document<D: Document + Keyed>(out: &mut KeyWriter<'_>, value: &D) {
    match value.view() {
        View::Object(members) => {
            out.out.push(b'{');
            for (key, member) in members {
                out.member(key, member);
            }
            out.out.push(b'}');
        }
        View::Array(items) => out.array(items),
        View::String(text) => out.string(text),
        View::Scalar => {
            value.write_scalar(&mut *out.out);
            out.out.push(b';');
        }
    }
}

fn write_str(out: &mut Vec<u8>, text: &str) {
    // The length in decimal, without the formatting machinery (this runs for every string).
    let mut digits = [0u8; 20];
    let at = decimal(text.len() as u64, &mut digits);
    out.push(b'"');
    out.extend_from_slice(&digits[at..]);
    out.push(b':');
    out.extend_from_slice(text.as_bytes());
}

/// Writes `n` in decimal at the end of `digits`; returns where it starts.
fn decimal(mut n: u64, digits: &mut [u8; 20]) -> usize {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return at;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The canonical form the digest of the key is made of.
    fn key_bytes(ignore: &[&str], input: Value) -> String {
        let ignore: Vec<String> = ignore.iter().map(|s| s.to_string()).collect();
        DecisionCache::new(true, 10, Duration::from_secs(1), &ignore).canonical(&input)
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
            (
                vec!["message.id", "message.body.id", "message.body"],
                json!({"message": {"id": 7, "body": {"id": 1}, "to": [{"id": 2}]}}),
                r#"{"7:message{"2:to[{"2:id2;}]}}"#,
            ),
            (vec![], json!("s\"q:"), r#""4:s"q:"#),
        ];
        for (ignore, input, expected) in cases {
            assert_eq!(key_bytes(&ignore, input), expected);
        }
    }

    /// Every way of changing one place of `value`, with that place's dotted path (`None`
    /// inside an array, which ignore paths do not address).
    fn changes(value: &Value, path: Option<String>, out: &mut Vec<(Option<String>, Value)>) {
        let at = |key: &str| {
            path.as_ref().map(|p| {
                if p.is_empty() {
                    key.to_string()
                } else {
                    format!("{p}.{key}")
                }
            })
        };
        let mut changed = |new: Value| out.push((path.clone(), new));
        match value {
            Value::Object(members) => {
                let mut added = members.clone();
                added.insert("new".into(), json!(0));
                changed(Value::Object(added));
                for (key, member) in members {
                    let mut removed = members.clone();
                    removed.remove(key);
                    out.push((at(key), Value::Object(removed)));
                    let mut inner = Vec::new();
                    changes(member, at(key), &mut inner);
                    for (p, new) in inner {
                        let mut whole = members.clone();
                        whole.insert(key.clone(), new);
                        out.push((p, Value::Object(whole)));
                    }
                }
            }
            Value::Array(items) => {
                let mut longer = items.clone();
                longer.push(json!(null));
                changed(Value::Array(longer));
                for (i, item) in items.iter().enumerate() {
                    let mut inner = Vec::new();
                    changes(item, None, &mut inner);
                    for (_, new) in inner {
                        let mut whole = items.clone();
                        whole[i] = new;
                        out.push((path.clone(), Value::Array(whole)));
                    }
                }
            }
            Value::String(text) => {
                changed(json!(format!("{text}x")));
                changed(json!([text]));
            }
            Value::Number(n) => {
                changed(match n.as_i64() {
                    Some(i) => json!(i + 1),
                    None => json!(n.as_f64().unwrap_or(0.0) + 1.0),
                });
                changed(json!(n.to_string()));
            }
            Value::Bool(b) => changed(json!(!b)),
            Value::Null => changed(json!(false)),
        }
    }

    #[test]
    fn inputs_that_differ_anywhere_not_ignored_have_different_keys() {
        let ignored = ["message.id", "context.time", "matrix.event_id"];
        let cache =
            DecisionCache::new(true, 10, Duration::from_secs(1), &ignored.map(String::from));
        let input = json!({
            "kind": "message",
            "message": {"id": 7, "type": "create", "from": "hyperty://localhost/a",
                        "to": ["hyperty://localhost/b", "comm://localhost/x"],
                        "body": {"value": {"n": 2.5, "ok": true, "none": null, "id": 1}}},
            "subject": {"runtime": "runtime://localhost/1", "authenticated": true,
                        "principal": {"runtimes": 1, "addresses": 0}},
            "context": {"node": "localhost", "time": "2026-12-01T00:00:00Z"},
            "targets": [{"address": "hyperty://localhost/b", "held_by_sender": false}],
        });
        let key = |v: &Value| cache.key(1, "data.msgnode.authz.decision", Some(v));
        let original = key(&input);
        let mut all = Vec::new();
        changes(&input, Some(String::new()), &mut all);
        assert!(all.len() > 50, "{}", all.len());
        for (path, changed) in all {
            let is_ignored = path.as_deref().is_some_and(|p| ignored.contains(&p));
            if is_ignored {
                assert_eq!(key(&changed), original, "{path:?} is ignored: {changed}");
            } else {
                assert_ne!(key(&changed), original, "{path:?} changed: {changed}");
            }
            // The same document as regorus's value has the same form.
            assert_eq!(
                cache.canonical(&changed),
                cache.canonical(&regorus::Value::from(changed.clone())),
                "{path:?}"
            );
        }
        assert_ne!(
            cache.key(1, "data.other", Some(&input)),
            original,
            "the query is part of the key"
        );
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
