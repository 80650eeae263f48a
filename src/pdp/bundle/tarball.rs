//! OPA bundle tarballs (`bundle.tar.gz`): gzip-compressed tar, one entry per file, paths
//! relative to the bundle root (OPA writes them with a leading `/`), a `.manifest` and, when
//! signed, a `.signatures.json`.
//!
//! Reading is bounded: at most `max_bytes` of uncompressed content, at most [`MAX_ENTRIES`]
//! entries (so headers of empty files cannot be millions), regular files only, and no path
//! that climbs out of the root; a duplicate is found in O(1) per entry. What `policy build` writes, this reads back.

use std::collections::HashSet;
use std::io::Read;

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use super::{Bundle, BundleError, BundleFile, Manifest, MANIFEST};

/// Most entries (of any type) a tarball may have.
pub const MAX_ENTRIES: usize = 10_000;

/// Name of OPA's signature file inside a bundle.
pub const SIGNATURES: &str = ".signatures.json";

/// The files of a tarball, before they are interpreted.
#[derive(Debug, Clone)]
pub struct TarballFiles {
    /// Every regular file, in archive order (`.signatures.json` included).
    pub files: Vec<BundleFile>,
}

impl TarballFiles {
    /// The `.signatures.json` file, when the bundle is signed.
    pub fn signatures(&self) -> Option<&[u8]> {
        self.files
            .iter()
            .find(|f| f.id == SIGNATURES)
            .map(|f| f.bytes.as_slice())
    }

    /// Every file but `.signatures.json`: what a signature covers.
    pub fn signed_files(&self) -> impl Iterator<Item = &BundleFile> {
        self.files.iter().filter(|f| f.id != SIGNATURES)
    }

    /// The bundle these files make (shown as `source`).
    ///
    /// # Errors
    /// As [`Bundle::from_files`].
    pub fn into_bundle(self, source: &str) -> Result<Bundle, BundleError> {
        Bundle::from_files(source, self.files)
    }
}

/// Reads the files of a gzip-compressed tarball (`source` names it in errors).
///
/// # Errors
/// Not gzip or not tar, more than `max_bytes` of content or [`MAX_ENTRIES`] entries, a path
/// with `..`, or a file twice.
pub fn read(bytes: &[u8], source: &str, max_bytes: u64) -> Result<TarballFiles, BundleError> {
    let bad = |message: String| BundleError::Tarball {
        file: source.to_string(),
        message,
    };
    let mut archive = tar::Archive::new(GzDecoder::new(bytes));
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a gzip-compressed tar archive: {e}")))?;
    let mut files: Vec<BundleFile> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut total: u64 = 0;
    for (count, entry) in entries.enumerate() {
        if count >= MAX_ENTRIES {
            return Err(bad(format!("more than {MAX_ENTRIES} entries")));
        }
        let mut entry = entry.map_err(|e| bad(format!("unreadable archive entry: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| bad(format!("entry with an unusable path: {e}")))?
            .to_string_lossy()
            .into_owned();
        let id = normalise(&path)
            .ok_or_else(|| bad(format!("entry {path:?} leaves the bundle root")))?;
        let size = entry.header().size().unwrap_or(0);
        total = total.saturating_add(size);
        if total > max_bytes {
            return Err(bad(format!("more than {max_bytes} bytes of content")));
        }
        let mut content = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 20));
        (&mut entry)
            .take(max_bytes)
            .read_to_end(&mut content)
            .map_err(|e| bad(format!("{id}: cannot read: {e}")))?;
        if !seen.insert(id.clone()) {
            return Err(bad(format!("{id} appears twice")));
        }
        files.push(BundleFile {
            shown: format!("{source}:/{id}"),
            id,
            bytes: content,
        });
    }
    Ok(TarballFiles { files })
}

/// `/a/./b.rego` → `a/b.rego`; `None` for paths with `..` or nothing left.
fn normalise(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            other => parts.push(other),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// The files `policy build` puts in a tarball for `bundle`: each module, test and fixture at
/// its path, the merged data as one `/data.json`, and `manifest` as `/.manifest`.
///
/// # Errors
/// The data or the manifest cannot be serialised.
pub fn files_of(bundle: &Bundle, manifest: &Manifest) -> Result<Vec<BundleFile>, BundleError> {
    let mut files = Vec::new();
    let ids = |m: &super::PolicyModule| (m.id.clone(), m.raw.as_bytes().to_vec());
    for (id, bytes) in bundle.modules.iter().chain(&bundle.tests).map(ids) {
        files.push(BundleFile {
            shown: id.clone(),
            id,
            bytes,
        });
    }
    for fixture in &bundle.fixtures {
        let name = fixture.path.rsplit('/').next().unwrap_or(&fixture.path);
        let id = format!("fixtures/{name}");
        files.push(BundleFile {
            shown: id.clone(),
            id,
            bytes: fixture.text.as_bytes().to_vec(),
        });
    }
    files.push(BundleFile {
        id: "data.json".to_string(),
        shown: "data.json".to_string(),
        bytes: json("data.json", &bundle.data)?,
    });
    files.push(BundleFile {
        id: MANIFEST.to_string(),
        shown: MANIFEST.to_string(),
        bytes: json(MANIFEST, manifest)?,
    });
    Ok(files)
}

fn json(file: &str, value: &impl serde::Serialize) -> Result<Vec<u8>, BundleError> {
    serde_json::to_vec_pretty(value).map_err(|e| BundleError::Data {
        file: file.to_string(),
        message: e.to_string(),
    })
}

/// Writes `files` as a gzip-compressed tarball (relative paths, which OPA reads as it reads
/// its own leading-`/` ones; mode 0644 and a fixed modification time, so that equal
/// contents give equal archives).
///
/// # Errors
/// Only an I/O error of the in-memory writer.
pub fn write(files: &[BundleFile]) -> std::io::Result<Vec<u8>> {
    let encoder = GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut builder = tar::Builder::new(encoder);
    for file in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(file.bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, &file.id, file.bytes.as_slice())?;
    }
    builder.into_inner()?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(id: &str, text: &str) -> BundleFile {
        BundleFile {
            id: id.to_string(),
            shown: id.to_string(),
            bytes: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_built_tarball_reads_back_as_the_same_bundle() {
        let dir = crate::pdp::test_tree(&[
            ("p/a.rego", "package a\nx := 1\n"),
            ("p/a_test.rego", "package a_test\ntest_x if data.a.x == 1\n"),
            ("p/cfg/data.json", r#"{"limit": 3}"#),
            (
                "p/fixtures/one.json",
                r#"{"input": {}, "expect": {"allow": false}}"#,
            ),
        ]);
        let bundle = Bundle::read(&dir.path().join("p")).expect("read");
        let manifest = Manifest {
            revision: "r7".into(),
            roots: vec!["a".into(), "cfg".into()],
            metadata: None,
        };
        let bytes = write(&files_of(&bundle, &manifest).expect("files")).expect("tar");
        let back = read(&bytes, "b.tar.gz", 1 << 20)
            .expect("read")
            .into_bundle("b.tar.gz")
            .expect("bundle");
        assert_eq!(back.revision, "r7");
        assert_eq!(back.data, serde_json::json!({"cfg": {"limit": 3}}));
        assert_eq!(back.modules.len(), 1);
        assert_eq!(back.tests.len(), 1);
        assert_eq!(back.fixtures.len(), 1);
        assert_eq!(back.modules[0].path, "b.tar.gz:/a.rego");
        assert_eq!(
            write(&files_of(&bundle, &manifest).expect("files")).expect("tar"),
            bytes
        );
    }

    #[test]
    fn bad_archives_are_refused_with_a_reason() {
        let check = |bytes: &[u8], max: u64, expected: &str| {
            let err = read(bytes, "b.tar.gz", max)
                .expect_err(expected)
                .to_string();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        };
        check(b"not gzip at all", 1 << 20, "b.tar.gz: ");
        let big = write(&[file("a.rego", &"x".repeat(100))]).expect("tar");
        check(&big, 10, "more than 10 bytes");
        let twice =
            write(&[file("a.rego", "package a"), file("a.rego", "package a")]).expect("tar");
        check(&twice, 1 << 20, "appears twice");
        // Finding 10 of the console review: many empty, distinctly named entries.
        let many: Vec<BundleFile> = (0..=MAX_ENTRIES)
            .map(|i| file(&format!("e{i}.json"), ""))
            .collect();
        check(
            &write(&many).expect("tar"),
            1 << 20,
            "more than 10000 entries",
        );
        let under: Vec<BundleFile> = (0..MAX_ENTRIES)
            .map(|i| file(&format!("e{i}.txt"), ""))
            .collect();
        let read_back = read(&write(&under).expect("tar"), "b.tar.gz", 1 << 20).expect("read");
        assert_eq!(read_back.files.len(), MAX_ENTRIES);
        assert_eq!(normalise("/../etc/passwd"), None);
        assert_eq!(normalise("/a/./b.rego").as_deref(), Some("a/b.rego"));
    }
}
