//! Generated variants of a policy input: the fixture a security team wrote, with one field
//! changed the way a careless or hostile client would change it. Two engines that decide the
//! fixture alike must decide each variant alike too; where they do not, the policy leans on
//! one engine's reading of an undefined or ill-typed value (and fails open on the other).
//!
//! For every field (object members at any depth, and array elements): removed, emptied
//! (`""`, `0`, `false`, `[]`, `{}`), given another type, and — for strings that are URLs
//! (`scheme://authority/path`) — an authority-less URL (`scheme:path`); Matrix ids lose their
//! server name. Variants equal to the original or to an earlier variant are left out.

use std::collections::HashSet;

use serde_json::{Map, Value};

/// One variant of an input.
#[derive(Debug, Clone)]
pub struct Variant {
    /// What was changed, e.g. `message.to: removed`.
    pub change: String,
    /// The changed input.
    pub input: Value,
}

/// Every variant of `input`, in a stable order.
pub fn variants(input: &Value) -> Vec<Variant> {
    let mut seen: HashSet<String> = HashSet::from([input.to_string()]);
    let mut out = Vec::new();
    let mut path = Vec::new();
    walk(input, &mut path, &mut |path, value| {
        for (what, changed) in changes(value) {
            let changed_input = replace(input, path, changed);
            if seen.insert(changed_input.to_string()) {
                out.push(Variant {
                    change: format!("{}: {what}", dotted(path)),
                    input: changed_input,
                });
            }
        }
    });
    out
}

/// A step into a JSON document.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn dotted(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Calls `visit` for every member and element below the root, parents first.
fn walk(value: &Value, path: &mut Vec<Step>, visit: &mut dyn FnMut(&[Step], &Value)) {
    match value {
        Value::Object(map) => {
            for (key, member) in map {
                path.push(Step::Key(key.clone()));
                visit(path, member);
                walk(member, path, visit);
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Step::Index(i));
                visit(path, item);
                walk(item, path, visit);
                path.pop();
            }
        }
        _ => {}
    }
}

/// The changes of one field: `None` removes it.
fn changes(value: &Value) -> Vec<(&'static str, Option<Value>)> {
    let mut out = vec![("removed", None)];
    let (empty, other) = match value {
        Value::String(_) => (Value::from(""), Value::from(7)),
        Value::Number(_) => (Value::from(0), Value::from("7")),
        Value::Bool(_) => (Value::from(false), Value::from("true")),
        Value::Null => (Value::from(""), Value::from("null")),
        Value::Array(_) => (Value::Array(Vec::new()), Value::from("x")),
        Value::Object(_) => (Value::Object(Map::new()), Value::Array(Vec::new())),
    };
    out.push(("emptied", Some(empty)));
    out.push(("another type", Some(other)));
    if let Value::String(s) = value {
        if let Some(url) = without_authority(s) {
            out.push(("a URL without authority", Some(Value::from(url))));
        }
        if let Some(id) = without_server(s) {
            out.push(("a Matrix id without server", Some(Value::from(id))));
        }
    }
    out
}

/// `hyperty://localhost/abc` → `hyperty:abc`; `user://idp.example/alice` → `user:alice`.
fn without_authority(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return None;
    }
    let path = rest.split_once('/').map_or(rest, |(_, path)| path);
    Some(format!("{scheme}:{path}"))
}

/// `@alice:localhost` → `@alice` (user, room and alias ids).
fn without_server(s: &str) -> Option<String> {
    let sigil = s.chars().next()?;
    if !"@!#".contains(sigil) {
        return None;
    }
    s.split_once(':').map(|(local, _)| local.to_string())
}

/// `input` with the field at `path` replaced (`None`: removed).
fn replace(input: &Value, path: &[Step], with: Option<Value>) -> Value {
    let mut out = input.clone();
    let Some((last, parents)) = path.split_last() else {
        return out;
    };
    let mut at = &mut out;
    for step in parents {
        let next = match (step, at) {
            (Step::Key(k), Value::Object(map)) => map.get_mut(k),
            (Step::Index(i), Value::Array(items)) => items.get_mut(*i),
            _ => None,
        };
        match next {
            Some(next) => at = next,
            None => return out,
        }
    }
    match (last, at, with) {
        (Step::Key(k), Value::Object(map), Some(v)) => {
            map.insert(k.clone(), v);
        }
        (Step::Key(k), Value::Object(map), None) => {
            map.remove(k);
        }
        (Step::Index(i), Value::Array(items), Some(v)) if *i < items.len() => items[*i] = v,
        (Step::Index(i), Value::Array(items), None) if *i < items.len() => {
            items.remove(*i);
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn changes_of(input: Value) -> Vec<(String, String)> {
        variants(&input)
            .into_iter()
            .map(|v| (v.change, v.input.to_string()))
            .collect()
    }

    #[test]
    fn every_field_is_removed_emptied_and_retyped() {
        let got = changes_of(json!({"a": {"b": "x"}, "n": [1]}));
        let want = [
            ("a: removed", r#"{"n":[1]}"#),
            ("a: emptied", r#"{"a":{},"n":[1]}"#),
            ("a: another type", r#"{"a":[],"n":[1]}"#),
            ("a.b: emptied", r#"{"a":{"b":""},"n":[1]}"#),
            ("a.b: another type", r#"{"a":{"b":7},"n":[1]}"#),
            ("n: removed", r#"{"a":{"b":"x"}}"#),
            ("n: emptied", r#"{"a":{"b":"x"},"n":[]}"#),
            ("n: another type", r#"{"a":{"b":"x"},"n":"x"}"#),
            ("n[0]: emptied", r#"{"a":{"b":"x"},"n":[0]}"#),
            ("n[0]: another type", r#"{"a":{"b":"x"},"n":["7"]}"#),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(c, i)| (c.to_string(), i.to_string()))
            .collect();
        // `a.b: removed` is `a: emptied`, and `n[0]: removed` is `n: emptied`: left out.
        assert_eq!(got, want);
    }

    #[test]
    fn urls_lose_their_authority_and_matrix_ids_their_server() {
        let got = changes_of(
            json!({"to": "hyperty://localhost/bob", "id": "user://idp.example/alice", "u": "@alice:localhost", "s": "mn:/session"}),
        );
        let has =
            |change: &str, input: &str| got.iter().any(|(c, i)| c == change && i.contains(input));
        assert!(
            has("to: a URL without authority", r#""to":"hyperty:bob""#),
            "{got:?}"
        );
        assert!(
            has("id: a URL without authority", r#""id":"user:alice""#),
            "{got:?}"
        );
        assert!(
            has("u: a Matrix id without server", r#""u":"@alice""#),
            "{got:?}"
        );
        assert!(
            !got.iter().any(|(c, _)| c.starts_with("s: a URL")),
            "{got:?}"
        );
    }
}
