//! A policy bundle: Rego modules, the data document, its tests and fixtures, and its revision.
//!
//! Layout follows OPA bundles: every `*.rego` file below the root is a module, and every
//! `data.json` / `data.yaml` / `data.yml` is merged into `data` under the path of its directory
//! (`policies/config/data.json` → `data.config`). `*_test.rego` modules and the JSON files of
//! `fixtures/` are the bundle's own tests: kept beside it, never served. Hidden files and
//! directories are skipped, except an OPA `.manifest` (its `revision` wins). Without one, the
//! revision is a hash over every file's path and bytes, so equal trees have equal revisions.
//! A bundle comes from a directory ([`Bundle::read`]) or an OPA tarball ([`tarball`]);
//! reading does not compile (see `engine::CompiledBundle`). [`signing`] signs and verifies
//! tarballs as OPA does.

pub mod signing;
pub mod tarball;

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
    /// The bundle root does not exist or is not a directory; the second path is where it was
    /// looked for (a relative root is taken from the working directory).
    #[error("policy directory {} does not exist or is not a directory (looked for {}; create it, or set [pdp] policies / --policies)", .0.display(), .1.display())]
    MissingDir(PathBuf, PathBuf),
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
    /// A bundle tarball is malformed or too big.
    #[error("{file}: {message}")]
    Tarball {
        /// The tarball.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A signed bundle's signature does not verify, or a signature is required and missing.
    #[error("{file}: bundle signature refused: {message}")]
    Signature {
        /// The tarball.
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

/// A fixture file of the bundle (`fixtures/*.json`): an input and the decision expected.
#[derive(Debug, Clone)]
pub struct FixtureFile {
    /// Path as shown in test reports.
    pub path: String,
    /// The JSON text.
    pub text: Arc<str>,
}

/// OPA's `.manifest`: the revision and the data roots the bundle owns.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The bundle's revision (any string; the content hash when built by msgnode).
    #[serde(default)]
    pub revision: String,
    /// Path prefixes of `data` the bundle owns (`msgnode`, `config`); empty: everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<String>,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// A bundle read from disk or a tarball, not yet compiled.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Where it was read from (a directory or a tarball), as shown to people.
    pub source: String,
    /// Modules that serve, sorted by id (no `*_test.rego`).
    pub modules: Vec<PolicyModule>,
    /// The bundle's `*_test.rego` modules, sorted by id.
    pub tests: Vec<PolicyModule>,
    /// The bundle's fixtures, sorted by path.
    pub fixtures: Vec<FixtureFile>,
    /// The merged data document.
    pub data: Value,
    /// The manifest's revision, else a hex digest over all files' paths and contents (first
    /// 16 hex digits of SHA-256).
    pub revision: String,
    /// The `.manifest`, when the bundle has one.
    pub manifest: Option<Manifest>,
}

/// Name of OPA's manifest file.
pub const MANIFEST: &str = ".manifest";

impl Bundle {
    /// Reads every module, data file, test and fixture below `root`.
    ///
    /// # Errors
    /// A missing directory, an unreadable or non-UTF-8 file, a data file that is not a JSON or
    /// YAML object, two data files setting one key, or no module at all.
    pub fn read(root: &Path) -> Result<Bundle, BundleError> {
        if !root.is_dir() {
            let looked_for = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
            return Err(BundleError::MissingDir(root.to_path_buf(), looked_for));
        }
        let mut files = Vec::new();
        let walker = walkdir::WalkDir::new(root)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| {
                e.depth() == 0
                    || !e.file_name().to_string_lossy().starts_with('.')
                    || (e.depth() == 1 && e.file_name() == MANIFEST)
            });
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
            let rel = path.strip_prefix(root).unwrap_or(path);
            let id = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            if FileKind::of(&id).is_none() {
                continue;
            }
            let bytes = std::fs::read(path).map_err(|source| BundleError::Io {
                file: path.display().to_string(),
                source,
            })?;
            files.push(BundleFile {
                id,
                shown: path.display().to_string(),
                bytes,
            });
        }
        Self::from_files(&root.display().to_string(), files)
    }

    /// Builds a bundle from its files (`id` relative to the root, `/`-separated), as read from
    /// a directory or a tarball. Files of no bundle kind are ignored.
    ///
    /// # Errors
    /// As [`Bundle::read`], and a `.manifest` that is not OPA's JSON manifest.
    pub fn from_files(source: &str, mut files: Vec<BundleFile>) -> Result<Bundle, BundleError> {
        files.sort_by(|a, b| a.id.cmp(&b.id));
        let mut hasher = Sha256::new();
        let mut modules = Vec::new();
        let mut tests = Vec::new();
        let mut fixtures = Vec::new();
        let mut manifest = None;
        let mut data = Value::Object(Map::new());
        for file in files {
            let Some(kind) = FileKind::of(&file.id) else {
                continue;
            };
            hasher.update((file.id.len() as u64).to_le_bytes());
            hasher.update(file.id.as_bytes());
            hasher.update((file.bytes.len() as u64).to_le_bytes());
            hasher.update(&file.bytes);
            let shown = file.shown;
            let text =
                String::from_utf8(file.bytes).map_err(|_| BundleError::NotUtf8(shown.clone()))?;
            match kind {
                FileKind::Rego | FileKind::Test => {
                    let module = PolicyModule {
                        id: file.id,
                        path: shown,
                        raw: text.into(),
                    };
                    match kind {
                        FileKind::Test => tests.push(module),
                        _ => modules.push(module),
                    }
                }
                FileKind::Fixture => fixtures.push(FixtureFile {
                    path: shown,
                    text: text.into(),
                }),
                FileKind::Manifest => {
                    manifest = Some(serde_json::from_str::<Manifest>(&text).map_err(|e| {
                        BundleError::Data {
                            file: shown.clone(),
                            message: format!("not an OPA manifest: {e}"),
                        }
                    })?);
                }
                FileKind::Json | FileKind::Yaml => {
                    let doc = parse_data(&text, kind).map_err(|message| BundleError::Data {
                        file: shown.clone(),
                        message,
                    })?;
                    let mut prefix: Vec<String> = file.id.split('/').map(str::to_string).collect();
                    prefix.pop();
                    merge_at(&mut data, &prefix, doc, &shown)?;
                }
            }
        }
        if modules.is_empty() {
            return Err(BundleError::Empty(PathBuf::from(source)));
        }
        let digest = hasher.finalize();
        let revision = match manifest.as_ref().filter(|m| !m.revision.is_empty()) {
            Some(manifest) => manifest.revision.clone(),
            None => digest[..8].iter().map(|b| format!("{b:02x}")).collect(),
        };
        Ok(Bundle {
            source: source.to_string(),
            modules,
            tests,
            fixtures,
            data,
            revision,
            manifest,
        })
    }

    /// Whether the bundle carries tests of its own (`*_test.rego` rules or fixtures).
    pub fn has_tests(&self) -> bool {
        !self.tests.is_empty() || !self.fixtures.is_empty()
    }

    /// The same bundle with its test modules compiled in, for the test runner and `check`.
    pub fn with_tests(&self) -> Bundle {
        let mut bundle = self.clone();
        bundle.modules.extend(bundle.tests.iter().cloned());
        bundle.modules.sort_by(|a, b| a.id.cmp(&b.id));
        bundle
    }
}

/// One file of a bundle, before it is interpreted.
#[derive(Debug, Clone)]
pub struct BundleFile {
    /// Path relative to the bundle root, `/`-separated.
    pub id: String,
    /// How it is shown in errors.
    pub shown: String,
    /// Its contents.
    pub bytes: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Rego,
    Test,
    Fixture,
    Manifest,
    Json,
    Yaml,
}

impl FileKind {
    /// What a file of the bundle is, by its id; `None` for files a bundle does not use.
    fn of(id: &str) -> Option<FileKind> {
        let name = id.rsplit('/').next().unwrap_or(id);
        if id.split('/').any(|s| s.starts_with('.')) && id != MANIFEST {
            return None;
        }
        Some(if id == MANIFEST {
            FileKind::Manifest
        } else if name.ends_with("_test.rego") {
            FileKind::Test
        } else if name.ends_with(".rego") {
            FileKind::Rego
        } else if id.starts_with("fixtures/") && name.ends_with(".json") {
            FileKind::Fixture
        } else if name == "data.json" {
            FileKind::Json
        } else if matches!(name, "data.yaml" | "data.yml") {
            FileKind::Yaml
        } else {
            return None;
        })
    }
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
        assert!(bundle.manifest.is_none());
        std::fs::write(
            dir.path().join("a_test.rego"),
            "package a_test\ntest_x if true\n",
        )
        .expect("write");
        let bundle = Bundle::read(dir.path()).expect("read");
        assert_eq!(bundle.modules.len(), 1, "tests are not served");
        assert_eq!(bundle.tests.len(), 1);
        assert_eq!(bundle.fixtures.len(), 1, "fixtures/case.json");
        assert!(bundle.has_tests());
        assert_eq!(bundle.with_tests().modules.len(), 2);
    }

    #[test]
    fn a_manifest_names_the_revision() {
        let dir = tree(&[
            ("a.rego", "package a\nx := 1\n"),
            (".manifest", r#"{"revision": "v42", "roots": ["a"]}"#),
        ]);
        let bundle = Bundle::read(dir.path()).expect("read");
        assert_eq!(bundle.revision, "v42");
        assert_eq!(bundle.manifest.expect("manifest").roots, vec!["a"]);
        fs::write(dir.path().join(".manifest"), "[1]").expect("write");
        let err = Bundle::read(dir.path())
            .expect_err("bad manifest")
            .to_string();
        assert!(
            err.contains(".manifest: invalid data file: not an OPA manifest"),
            "{err}"
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
        // A relative one says where it was looked for.
        let err = Bundle::read(Path::new("no-such-bundle"))
            .expect_err("must fail")
            .to_string();
        let looked_for = std::env::current_dir().expect("cwd").join("no-such-bundle");
        assert!(
            err.contains(&format!("looked for {}", looked_for.display())),
            "{err}"
        );
    }
}
