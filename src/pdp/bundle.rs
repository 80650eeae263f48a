//! A policy bundle as read from disk: Rego modules, the data document, and its revision.
//!
//! Layout follows OPA bundles: every `*.rego` file below the root is a module, and every
//! `data.json` / `data.yaml` / `data.yml` is merged into `data` under the path of its directory
//! (`policies/config/data.json` → `data.config`). Hidden files and directories are skipped.
//! The revision is a hash over every file's path and bytes, so equal trees have equal revisions.
//! Reading does not compile; see `engine::CompiledBundle`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Where in a file a problem is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Location {
    /// File path as shown to the user (relative to the working directory when possible).
    pub file: String,
    /// 1-based line.
    pub row: u32,
    /// 1-based column.
    pub col: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.row, self.col)
    }
}

/// Why a bundle could not be read or compiled. Every variant names the file to fix.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle root does not exist or is not a directory.
    #[error("policy directory {0} does not exist or is not a directory (create it, or set [pdp] policies / --policies)")]
    MissingDir(PathBuf),
    /// The root has no `*.rego` module at all.
    #[error("policy directory {0} contains no .rego modules")]
    Empty(PathBuf),
    /// A file could not be read.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The file.
        file: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A policy file is not UTF-8.
    #[error("{0}: policy file is not valid UTF-8")]
    NotUtf8(String),
    /// A module failed to parse or compile; `location` is set when the engine reported one.
    #[error("{}", match .location { Some(l) => format!("{l}: {}", .message), None => format!("{}: {}", .file, .message) })]
    Rego {
        /// The module (or the first module, for whole-bundle compile errors without location).
        file: String,
        /// Position of the problem, when known.
        location: Option<Location>,
        /// The engine's message, without the location prefix.
        message: String,
    },
    /// A data file is not valid JSON/YAML or not an object.
    #[error("{file}: invalid data file: {message}")]
    Data {
        /// The data file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// Two data files set the same key.
    #[error("{file}: data key {key} is also set by another data file")]
    DataConflict {
        /// The second file that set the key.
        file: String,
        /// The dotted key.
        key: String,
    },
}

impl BundleError {
    /// The location of the problem, if the error points into a file.
    pub fn location(&self) -> Option<&Location> {
        match self {
            BundleError::Rego { location, .. } => location.as_ref(),
            _ => None,
        }
    }
}

/// One Rego module of a bundle.
#[derive(Debug, Clone)]
pub struct PolicyModule {
    /// Stable id: the path relative to the bundle root, with `/` separators (as OPA shows it).
    pub id: String,
    /// Path as given to the engine and shown in errors.
    pub path: String,
    /// Source text.
    pub raw: Arc<str>,
}

/// A bundle read from disk, not yet compiled.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The directory it was read from.
    pub root: PathBuf,
    /// Modules, sorted by id.
    pub modules: Vec<PolicyModule>,
    /// The merged data document.
    pub data: Value,
    /// Hex digest over all files' paths and contents (first 16 hex digits of SHA-256).
    pub revision: String,
}

impl Bundle {
    /// Reads every module and data file below `root`, leaving out `*_test.rego` files: tests
    /// are not served (see [`Bundle::read_with_tests`]).
    ///
    /// # Errors
    /// A missing directory, an unreadable or non-UTF-8 file, a data file that is not a JSON or
    /// YAML object, two data files setting one key, or no module at all.
    pub fn read(root: &Path) -> Result<Bundle, BundleError> {
        Self::read_filtered(root, false)
    }

    /// Reads the bundle including its `*_test.rego` modules, for the policy test runner.
    ///
    /// # Errors
    /// As [`Bundle::read`].
    pub fn read_with_tests(root: &Path) -> Result<Bundle, BundleError> {
        Self::read_filtered(root, true)
    }

    fn read_filtered(root: &Path, with_tests: bool) -> Result<Bundle, BundleError> {
        if !root.is_dir() {
            return Err(BundleError::MissingDir(root.to_path_buf()));
        }
        let mut hasher = Sha256::new();
        let mut modules = Vec::new();
        let mut data = Value::Object(Map::new());
        let walker = walkdir::WalkDir::new(root)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
        for entry in walker {
            let entry = entry.map_err(|e| BundleError::Io {
                file: e
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| root.display().to_string()),
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("filesystem loop")),
            })?;
            if !entry.file_type().is_file() {
                continue;
            }
            let path = entry.path();
            let name = entry.file_name().to_string_lossy();
            let kind = if name.ends_with("_test.rego") && !with_tests {
                continue;
            } else if name.ends_with(".rego") {
                FileKind::Rego
            } else if matches!(name.as_ref(), "data.json") {
                FileKind::Json
            } else if matches!(name.as_ref(), "data.yaml" | "data.yml") {
                FileKind::Yaml
            } else {
                continue;
            };
            let shown = path.display().to_string();
            let bytes = std::fs::read(path).map_err(|source| BundleError::Io {
                file: shown.clone(),
                source,
            })?;
            let rel = path.strip_prefix(root).unwrap_or(path);
            let id = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            hasher.update((id.len() as u64).to_le_bytes());
            hasher.update(id.as_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
            let text = String::from_utf8(bytes).map_err(|_| BundleError::NotUtf8(shown.clone()))?;
            match kind {
                FileKind::Rego => modules.push(PolicyModule {
                    id,
                    path: shown,
                    raw: text.into(),
                }),
                FileKind::Json | FileKind::Yaml => {
                    let doc = parse_data(&text, kind).map_err(|message| BundleError::Data {
                        file: shown.clone(),
                        message,
                    })?;
                    let prefix: Vec<String> = rel
                        .parent()
                        .map(|p| {
                            p.components()
                                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                                .collect()
                        })
                        .unwrap_or_default();
                    merge_at(&mut data, &prefix, doc, &shown)?;
                }
            }
        }
        if modules.is_empty() {
            return Err(BundleError::Empty(root.to_path_buf()));
        }
        modules.sort_by(|a, b| a.id.cmp(&b.id));
        let digest = hasher.finalize();
        let revision = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Bundle {
            root: root.to_path_buf(),
            modules,
            data,
            revision,
        })
    }
}

#[derive(Clone, Copy)]
enum FileKind {
    Rego,
    Json,
    Yaml,
}

fn parse_data(text: &str, kind: FileKind) -> Result<Value, String> {
    let doc: Value = match kind {
        FileKind::Yaml => yaml_serde::from_str(text).map_err(|e| e.to_string())?,
        _ => serde_json::from_str(text).map_err(|e| e.to_string())?,
    };
    if !doc.is_object() {
        return Err("the top level must be an object".to_string());
    }
    Ok(doc)
}

/// Merges `doc` (an object) into `data` below `prefix`, refusing to overwrite any key.
fn merge_at(
    data: &mut Value,
    prefix: &[String],
    doc: Value,
    file: &str,
) -> Result<(), BundleError> {
    let mut node = data;
    let mut key_path = Vec::new();
    for segment in prefix {
        key_path.push(segment.as_str());
        let Value::Object(map) = node else {
            return Err(BundleError::DataConflict {
                file: file.to_string(),
                key: key_path.join("."),
            });
        };
        node = map
            .entry(segment.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    merge_objects(
        node,
        doc,
        &mut key_path.iter().map(|s| s.to_string()).collect(),
        file,
    )
}

fn merge_objects(
    into: &mut Value,
    from: Value,
    key_path: &mut Vec<String>,
    file: &str,
) -> Result<(), BundleError> {
    let conflict = |key_path: &Vec<String>| BundleError::DataConflict {
        file: file.to_string(),
        key: key_path.join("."),
    };
    let (Value::Object(into), Value::Object(from)) = (into, from) else {
        return Err(conflict(key_path));
    };
    for (key, value) in from {
        key_path.push(key.clone());
        match into.get_mut(&key) {
            None => {
                into.insert(key, value);
            }
            Some(existing) if existing.is_object() && value.is_object() => {
                merge_objects(existing, value, key_path, file)?;
            }
            Some(_) => return Err(conflict(key_path)),
        }
        key_path.pop();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    use crate::pdp::test_tree as tree;

    #[test]
    fn data_files_nest_by_directory() {
        let dir = tree(&[
            ("a.rego", "package a\nx := 1\n"),
            ("config/data.json", r#"{"trusted": ["a"]}"#),
            ("config/more/data.yaml", "limit: 3\n"),
            ("data.json", r#"{"top": true}"#),
            ("fixtures/case.json", "not data, ignored"),
            (".hidden/data.json", "ignored too"),
        ]);
        let bundle = Bundle::read(dir.path()).expect("read");
        assert_eq!(
            bundle.data,
            serde_json::json!({"top": true, "config": {"trusted": ["a"], "more": {"limit": 3}}})
        );
        assert_eq!(bundle.modules.len(), 1);
        assert_eq!(bundle.modules[0].id, "a.rego");
        std::fs::write(
            dir.path().join("a_test.rego"),
            "package a_test\ntest_x if true\n",
        )
        .expect("write");
        assert_eq!(Bundle::read(dir.path()).expect("read").modules.len(), 1);
        assert_eq!(
            Bundle::read_with_tests(dir.path())
                .expect("read")
                .modules
                .len(),
            2
        );
    }

    #[test]
    fn revision_follows_content() {
        let dir = tree(&[("a.rego", "package a\nx := 1\n")]);
        let first = Bundle::read(dir.path()).expect("read").revision;
        assert_eq!(first, Bundle::read(dir.path()).expect("read").revision);
        fs::write(dir.path().join("a.rego"), "package a\nx := 2\n").expect("write");
        assert_ne!(first, Bundle::read(dir.path()).expect("read").revision);
    }

    #[test]
    fn errors_name_the_file() {
        let check = |files: &[(&str, &str)], expected: &str| {
            let dir = tree(files);
            let err = Bundle::read(dir.path()).expect_err("must fail").to_string();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        };
        check(
            &[("a.rego", "package a"), ("data.json", "{nope")],
            "data.json: invalid data file",
        );
        check(
            &[("a.rego", "package a"), ("data.json", "[1]")],
            "top level must be an object",
        );
        check(&[("x/data.json", "{}")], "contains no .rego modules");
        check(
            &[
                ("a.rego", "package a"),
                ("data.json", r#"{"x": {"y": 1}}"#),
                ("x/data.json", r#"{"y": 2}"#),
            ],
            "data key x.y is also set",
        );
        let dir = tree(&[("a.rego", "")]);
        fs::write(dir.path().join("b.rego"), [0xff, 0xfe]).expect("write");
        let err = Bundle::read(dir.path()).expect_err("must fail").to_string();
        assert!(
            err.contains("b.rego: policy file is not valid UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn missing_dir_says_what_to_do() {
        let err = Bundle::read(Path::new("/no/such/dir"))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("/no/such/dir does not exist"), "{err}");
    }
}
