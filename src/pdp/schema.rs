//! JSON Schema validation of PDP inputs (and of policy fixtures).
//!
//! Every `*.json` file of the schema directory is loaded once. `$ref`s between them resolve
//! by `$id` or, failing that, by file name, never over the network. A binding maps a data path
//! prefix (`msgnode`) to a schema; an input posted below that prefix must match it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

/// Why a schema directory or binding is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A schema file could not be read or is not JSON.
    #[error("{file}: {message}")]
    File {
        /// The schema file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A binding names a schema that is not in the directory.
    #[error("schema {name} is bound to data path {path} but is not in {dir}")]
    Unknown {
        /// The file name.
        name: String,
        /// The data path it is bound to.
        path: String,
        /// The schema directory.
        dir: String,
    },
    /// The schema itself is invalid, or a `$ref` does not resolve.
    #[error("schema {name}: {message}")]
    Invalid {
        /// The file name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// An input that does not match its schema.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("input does not match schema {schema} at {}: {message}", if pointer.is_empty() { "the top level" } else { pointer.as_str() })]
pub struct SchemaViolation {
    /// The schema file name.
    pub schema: String,
    /// JSON pointer to the failing value below the input (`""` for the input itself).
    pub pointer: String,
    /// What is wrong.
    pub message: String,
}

/// Loaded schemas and which data paths they guard.
#[derive(Default)]
pub struct Schemas {
    /// By file name.
    validators: HashMap<String, Arc<jsonschema::Validator>>,
    /// (path segments, schema name), longest prefix first.
    bindings: Vec<(Vec<String>, String)>,
}

#[derive(Clone)]
struct LocalRetriever {
    by_id: Arc<HashMap<String, Value>>,
    by_file: Arc<HashMap<String, Value>>,
}

impl jsonschema::Retrieve for LocalRetriever {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let text = uri.as_str();
        let file = text.rsplit('/').next().unwrap_or(text);
        self.by_id
            .get(text.trim_end_matches('#'))
            .or_else(|| self.by_file.get(file))
            .cloned()
            .ok_or_else(|| format!("{text} is not a schema in the schema directory").into())
    }
}

impl Schemas {
    /// Loads every `*.json` in `dir` and binds data paths (`msgnode/authz` or `msgnode.authz`)
    /// to schema file names. Schemas that are bound or named later are compiled now, so a
    /// broken schema fails at start-up.
    ///
    /// # Errors
    /// An unreadable or invalid schema, or a binding to a file that is not there.
    pub fn load<'a>(
        dir: &Path,
        bindings: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, SchemaError> {
        let mut docs: HashMap<String, Value> = HashMap::new();
        if dir.is_dir() {
            let entries = std::fs::read_dir(dir).map_err(|e| SchemaError::File {
                file: dir.display().to_string(),
                message: e.to_string(),
            })?;
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(&path).map_err(|e| SchemaError::File {
                    file: shown.clone(),
                    message: e.to_string(),
                })?;
                let doc: Value = serde_json::from_str(&text).map_err(|e| SchemaError::File {
                    file: shown.clone(),
                    message: format!("not JSON: {e}"),
                })?;
                let name = entry.file_name().to_string_lossy().into_owned();
                docs.insert(name, doc);
            }
        }
        let by_id = docs
            .values()
            .filter_map(|d| {
                Some((
                    d.get("$id")?.as_str()?.trim_end_matches('#').to_string(),
                    d.clone(),
                ))
            })
            .collect();
        let retriever = LocalRetriever {
            by_id: Arc::new(by_id),
            by_file: Arc::new(docs.clone()),
        };
        let mut schemas = Schemas::default();
        for (name, doc) in &docs {
            let validator = jsonschema::options()
                .with_retriever(retriever.clone())
                .build(doc)
                .map_err(|e| SchemaError::Invalid {
                    name: name.clone(),
                    message: e.to_string(),
                })?;
            schemas.validators.insert(name.clone(), Arc::new(validator));
        }
        for (path, name) in bindings {
            if !schemas.validators.contains_key(name) {
                return Err(SchemaError::Unknown {
                    name: name.clone(),
                    path: path.clone(),
                    dir: dir.display().to_string(),
                });
            }
            let segments = path
                .trim_start_matches("data")
                .split(['/', '.'])
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            schemas.bindings.push((segments, name.clone()));
        }
        schemas
            .bindings
            .sort_by_key(|(segments, _)| std::cmp::Reverse(segments.len()));
        Ok(schemas)
    }

    /// The schema bound to the longest prefix of `path`, if any.
    pub fn bound_to(&self, path: &[String]) -> Option<&str> {
        self.bindings
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix))
            .map(|(_, name)| name.as_str())
    }

    /// Validates `input` against the named schema.
    ///
    /// # Errors
    /// The first violation, with its JSON pointer; an unknown schema name is a violation too.
    pub fn validate(&self, name: &str, input: &Value) -> Result<(), SchemaViolation> {
        let Some(validator) = self.validators.get(name) else {
            return Err(SchemaViolation {
                schema: name.to_string(),
                pointer: String::new(),
                message: "no such schema".to_string(),
            });
        };
        validator.validate(input).map_err(|e| SchemaViolation {
            schema: name.to_string(),
            pointer: e.instance_path().as_str().to_string(),
            // Without the offending value: the message reaches answers, decision logs and
            // the console, and the value may be a token or an assertion.
            message: e.masked().to_string(),
        })
    }

    /// Validates `input` against the schema bound to `path`, if one is.
    ///
    /// # Errors
    /// As [`Schemas::validate`].
    pub fn validate_for_path(&self, path: &[String], input: &Value) -> Result<(), SchemaViolation> {
        match self.bound_to(path) {
            Some(name) => self.validate(name, input),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn schemas() -> (tempfile::TempDir, Schemas) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("thing.schema.json"),
            json!({"$id": "https://example.test/thing/v1", "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}).to_string(),
        )
        .expect("write");
        std::fs::write(
            dir.path().join("input.schema.json"),
            json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"thing": {"$ref": "thing.schema.json"}, "other": {"$ref": "https://example.test/thing/v1"}}}).to_string(),
        )
        .expect("write");
        let bindings = BTreeMap::from([("a/b".to_string(), "input.schema.json".to_string())]);
        let schemas = Schemas::load(dir.path(), &bindings).expect("load");
        (dir, schemas)
    }

    #[test]
    fn violations_carry_a_json_pointer() {
        let (_dir, schemas) = schemas();
        let path = |p: &str| p.split('/').map(str::to_string).collect::<Vec<_>>();
        assert!(schemas
            .validate_for_path(&path("a/b/c"), &json!({"thing": {"name": "x"}}))
            .is_ok());
        assert!(schemas.validate_for_path(&path("x"), &json!(1)).is_ok());
        let err = schemas
            .validate_for_path(&path("a/b"), &json!({"thing": {"name": 3}}))
            .expect_err("violation");
        assert_eq!(err.pointer, "/thing/name");
        let err = schemas
            .validate_for_path(&path("a/b"), &json!({"other": {}}))
            .expect_err("violation");
        assert_eq!(err.pointer, "/other");
        assert!(err.message.contains("name"), "{err}");
    }

    #[test]
    fn violations_never_carry_the_offending_value() {
        let (_dir, schemas) = schemas();
        let secret = "eyJhbGciOi-secret-assertion";
        let err = schemas
            .validate("input.schema.json", &json!({"thing": {"name": [secret]}}))
            .expect_err("violation");
        assert_eq!(err.pointer, "/thing/name");
        assert!(!err.to_string().contains(secret), "{err}");
    }

    #[test]
    fn shipped_input_schema_takes_every_room_id_the_pep_sends() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let bindings = BTreeMap::from([("msgnode".to_string(), "input.schema.json".to_string())]);
        let schemas = Schemas::load(&dir, &bindings).expect("load");
        let path = vec!["msgnode".to_string()];
        let input = |room: &str| {
            json!({"kind": "matrix_event", "context": {"node": "localhost", "time": "2026-01-01T00:00:00Z"},
                   "matrix": {"room_id": room, "event_type": "m.room.message", "sender": "@a:localhost"}})
        };
        // Room version 12 ids have no server part; "" is createRoom, profile and to-device.
        for room in ["!r:localhost", "!4UsW2lhkAbCdEf", ""] {
            assert!(
                schemas.validate_for_path(&path, &input(room)).is_ok(),
                "{room:?}"
            );
        }
        for room in ["#alias:localhost", "r:localhost", "!"] {
            assert!(
                schemas.validate_for_path(&path, &input(room)).is_err(),
                "{room:?}"
            );
        }
    }

    #[test]
    fn binding_to_a_missing_schema_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bindings = BTreeMap::from([("a".to_string(), "nope.json".to_string())]);
        let err = Schemas::load(dir.path(), &bindings)
            .err()
            .expect("error")
            .to_string();
        assert!(err.contains("nope.json"), "{err}");
    }
}
