//! Bundle signatures as OPA makes and checks them: `.signatures.json` is
//! `{"signatures": ["<JWT>"]}`, and the JWT's claims list every other file of the bundle with
//! its SHA-256 (`{"files": [{"name", "hash", "algorithm": "SHA-256"}], "keyid", "scope"}`).
//! JSON files are hashed in canonical form (keys sorted, no whitespace), everything else as
//! bytes. Keys are PEM files: `EdDSA` (ed25519), `RS256`…`PS512`, `ES256`/`ES384`, or a shared
//! secret for `HS256`…`HS512`. A bundle verifies when the JWT does with the configured key,
//! its key id and scope match, and the listed files are exactly the bundle's, hash for hash.

use std::collections::BTreeMap;
use std::str::FromStr;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::BundleFile;

/// Why a key cannot be used or a signature does not verify.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The algorithm name is not one of the JWT algorithms.
    #[error("unknown signing algorithm {0:?} (EdDSA, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, HS256, HS384, HS512)")]
    Algorithm(String),
    /// The key file is not a key of that algorithm.
    #[error("{file}: not a {alg:?} key: {message}")]
    Key {
        /// The key file.
        file: String,
        /// The algorithm.
        alg: Algorithm,
        /// What is wrong.
        message: String,
    },
    /// The bundle has no `.signatures.json` although verification is required.
    #[error("the bundle is not signed")]
    Unsigned,
    /// The signature (or its claims) does not verify.
    #[error("{0}")]
    Invalid(String),
}

/// A key that signs bundles (`policy build --signing-key`).
pub struct SigningKey {
    alg: Algorithm,
    key: EncodingKey,
    key_id: Option<String>,
}

/// A key that verifies bundles (`[pdp.bundle.verification]`).
pub struct VerificationKey {
    alg: Algorithm,
    key: DecodingKey,
    key_id: Option<String>,
    scope: Option<String>,
}

/// Parses an algorithm name (`EdDSA`, `RS256`, …).
///
/// # Errors
/// Not a JWT algorithm name.
pub fn algorithm(name: &str) -> Result<Algorithm, SignatureError> {
    Algorithm::from_str(name).map_err(|_| SignatureError::Algorithm(name.to_string()))
}

fn key_error(
    file: &str,
    alg: Algorithm,
) -> impl Fn(jsonwebtoken::errors::Error) -> SignatureError + '_ {
    move |e| SignatureError::Key {
        file: file.to_string(),
        alg,
        message: e.to_string(),
    }
}

/// The kinds of key the algorithms take.
enum Family {
    Ed,
    Rsa,
    Ec,
    Secret,
}

fn family(alg: Algorithm) -> Family {
    use Algorithm::*;
    match alg {
        EdDSA => Family::Ed,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Family::Rsa,
        ES256 | ES384 => Family::Ec,
        HS256 | HS384 | HS512 => Family::Secret,
    }
}

impl SigningKey {
    /// A signing key from a PEM private key (or the secret, for `HS*`); `file` names it in errors.
    ///
    /// # Errors
    /// The bytes are not a private key of `alg`.
    pub fn new(
        alg: Algorithm,
        pem: &[u8],
        file: &str,
        key_id: Option<String>,
    ) -> Result<Self, SignatureError> {
        let key = match family(alg) {
            Family::Ed => EncodingKey::from_ed_pem(pem),
            Family::Rsa => EncodingKey::from_rsa_pem(pem),
            Family::Ec => EncodingKey::from_ec_pem(pem),
            Family::Secret => Ok(EncodingKey::from_secret(pem)),
        }
        .map_err(key_error(file, alg))?;
        Ok(Self { alg, key, key_id })
    }

    /// The `.signatures.json` text for `files` (every file but the signature file itself).
    ///
    /// # Errors
    /// A JSON file that does not parse, or a signing failure.
    pub fn sign<'a>(
        &self,
        files: impl IntoIterator<Item = &'a BundleFile>,
        scope: Option<&str>,
    ) -> Result<Vec<u8>, SignatureError> {
        let claims = Claims {
            files: files.into_iter().map(file_hash).collect::<Result<_, _>>()?,
            keyid: self.key_id.clone(),
            scope: scope.map(str::to_string),
        };
        let mut header = Header::new(self.alg);
        header.kid = self.key_id.clone();
        let token = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| SignatureError::Invalid(format!("cannot sign: {e}")))?;
        serde_json::to_vec_pretty(&Signatures {
            signatures: vec![token],
        })
        .map_err(|e| SignatureError::Invalid(e.to_string()))
    }
}

impl VerificationKey {
    /// A verification key from a PEM public key (or the secret, for `HS*`).
    ///
    /// # Errors
    /// The bytes are not a public key of `alg`.
    pub fn new(
        alg: Algorithm,
        pem: &[u8],
        file: &str,
        key_id: Option<String>,
        scope: Option<String>,
    ) -> Result<Self, SignatureError> {
        let key = match family(alg) {
            Family::Ed => DecodingKey::from_ed_pem(pem),
            Family::Rsa => DecodingKey::from_rsa_pem(pem),
            Family::Ec => DecodingKey::from_ec_pem(pem),
            Family::Secret => Ok(DecodingKey::from_secret(pem)),
        }
        .map_err(key_error(file, alg))?;
        Ok(Self {
            alg,
            key,
            key_id,
            scope,
        })
    }

    /// Checks `signatures` (the `.signatures.json` bytes, `None` when absent) against `files`.
    ///
    /// # Errors
    /// Unsigned, a JWT that does not verify, another key id or scope, or files that differ
    /// from the signed list (missing, extra, or another hash).
    pub fn verify<'a>(
        &self,
        signatures: Option<&[u8]>,
        files: impl IntoIterator<Item = &'a BundleFile>,
    ) -> Result<(), SignatureError> {
        let invalid = |m: String| SignatureError::Invalid(m);
        let signatures: Signatures =
            serde_json::from_slice(signatures.ok_or(SignatureError::Unsigned)?)
                .map_err(|e| invalid(format!(".signatures.json: {e}")))?;
        let [token] = signatures.signatures.as_slice() else {
            return Err(invalid(format!(
                "expected exactly one signature, found {}",
                signatures.signatures.len()
            )));
        };
        let mut validation = Validation::new(self.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &validation).map_err(|e| {
            invalid(format!(
                "the signature does not verify with the configured key: {e}"
            ))
        })?;
        let claims = data.claims;
        if let Some(want) = &self.key_id {
            let got = data.header.kid.as_ref().or(claims.keyid.as_ref());
            if got.is_some_and(|got| got != want) {
                return Err(invalid(format!(
                    "signed with key id {got:?}, expected {want:?}"
                )));
            }
        }
        if self.scope.is_some() && claims.scope != self.scope {
            return Err(invalid(format!(
                "signed for scope {:?}, expected {:?}",
                claims.scope, self.scope
            )));
        }
        let mut signed: BTreeMap<String, FileHash> = claims
            .files
            .into_iter()
            .map(|f| (f.name.trim_start_matches('/').to_string(), f))
            .collect();
        for file in files {
            let Some(listed) = signed.remove(&file.id) else {
                return Err(invalid(format!(
                    "{} is not covered by the signature",
                    file.id
                )));
            };
            if !listed.algorithm.eq_ignore_ascii_case("SHA-256") {
                return Err(invalid(format!(
                    "{}: unsupported hash algorithm {}",
                    file.id, listed.algorithm
                )));
            }
            if listed.hash != file_hash(file)?.hash {
                return Err(invalid(format!(
                    "{} does not match its signed hash",
                    file.id
                )));
            }
        }
        if let Some(missing) = signed.keys().next() {
            return Err(invalid(format!(
                "{missing} is signed but missing from the bundle"
            )));
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct Signatures {
    signatures: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    files: Vec<FileHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keyid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct FileHash {
    name: String,
    hash: String,
    algorithm: String,
}

fn file_hash(file: &BundleFile) -> Result<FileHash, SignatureError> {
    let digest = if file.id.ends_with(".json") || file.id.ends_with(".manifest") {
        let value: Value = serde_json::from_slice(&file.bytes)
            .map_err(|e| SignatureError::Invalid(format!("{}: not JSON: {e}", file.id)))?;
        Sha256::digest(canonical(&value).as_bytes())
    } else {
        Sha256::digest(&file.bytes)
    };
    Ok(FileHash {
        name: file.id.clone(),
        hash: digest.iter().map(|b| format!("{b:02x}")).collect(),
        algorithm: "SHA-256".to_string(),
    })
}

/// Canonical JSON: object keys sorted, no whitespace (whatever order serde_json keeps).
fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            let members: Vec<String> = sorted
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical(v)))
                .collect();
            format!("{{{}}}", members.join(","))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    /// A fresh ed25519 key pair as PEM (private PKCS#8, public SPKI).
    pub(crate) fn ed25519_pems() -> (Vec<u8>, Vec<u8>) {
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("keygen");
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
        let mut spki = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        spki.extend_from_slice(pair.public_key().as_ref());
        let pem = |label: &str, der: &[u8]| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n").into_bytes()
        };
        (pem("PRIVATE KEY", pkcs8.as_ref()), pem("PUBLIC KEY", &spki))
    }

    fn file(id: &str, text: &str) -> BundleFile {
        BundleFile {
            id: id.into(),
            shown: id.into(),
            bytes: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn signed_bundles_verify_and_tampered_ones_do_not() {
        let (private, public) = ed25519_pems();
        let signer =
            SigningKey::new(Algorithm::EdDSA, &private, "k.pem", Some("k1".into())).expect("key");
        let files = vec![
            file("a.rego", "package a\n"),
            file("data.json", "{\"b\": 1, \"a\": [1, 2]}"),
        ];
        let signatures = signer.sign(&files, Some("write")).expect("sign");
        let verifier = |kid: Option<&str>, scope: Option<&str>| {
            VerificationKey::new(
                Algorithm::EdDSA,
                &public,
                "p.pem",
                kid.map(Into::into),
                scope.map(Into::into),
            )
            .expect("key")
        };
        let check = |key: &VerificationKey, files: &[BundleFile], signatures: Option<&[u8]>| {
            key.verify(signatures, files).map_err(|e| e.to_string())
        };
        let good = verifier(Some("k1"), Some("write"));
        assert_eq!(check(&good, &files, Some(&signatures)), Ok(()));
        // JSON is compared in canonical form: reformatting is not tampering.
        let reformatted = vec![
            files[0].clone(),
            file("data.json", "{\"a\":[1,2],\n \"b\":1}"),
        ];
        assert_eq!(check(&good, &reformatted, Some(&signatures)), Ok(()));
        type Case<'a> = (Vec<BundleFile>, Option<&'a [u8]>, VerificationKey, &'a str);
        let cases: Vec<Case> = vec![
            (
                vec![files[0].clone(), file("data.json", "{\"b\": 2}")],
                Some(&signatures),
                verifier(None, None),
                "does not match its signed hash",
            ),
            (
                vec![files[0].clone()],
                Some(&signatures),
                verifier(None, None),
                "signed but missing",
            ),
            (
                [files.clone(), vec![file("x.rego", "package x")]].concat(),
                Some(&signatures),
                verifier(None, None),
                "not covered",
            ),
            (files.clone(), None, verifier(None, None), "not signed"),
            (
                files.clone(),
                Some(&signatures),
                verifier(Some("k2"), None),
                "expected \"k2\"",
            ),
            (
                files.clone(),
                Some(&signatures),
                verifier(None, Some("read")),
                "scope",
            ),
            (
                files.clone(),
                Some(b"{\"signatures\": []}"),
                verifier(None, None),
                "exactly one",
            ),
            (
                files.clone(),
                Some(&signatures),
                VerificationKey::new(Algorithm::EdDSA, &ed25519_pems().1, "other.pem", None, None)
                    .expect("key"),
                "does not verify",
            ),
        ];
        for (files, signatures, key, expected) in cases {
            let err = check(&key, &files, signatures).expect_err(expected);
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn keys_and_algorithms_are_checked() {
        assert!(algorithm("EdDSA").is_ok() && algorithm("RS256").is_ok());
        assert!(algorithm("none")
            .unwrap_err()
            .to_string()
            .contains("unknown signing algorithm"));
        let err = SigningKey::new(Algorithm::RS256, b"not a key", "k.pem", None)
            .err()
            .expect("bad key");
        assert!(
            err.to_string().starts_with("k.pem: not a RS256 key"),
            "{err}"
        );
        assert_eq!(
            canonical(&serde_json::json!({"b": 1, "a": {"d": [1, "x"], "c": null}})),
            r#"{"a":{"c":null,"d":[1,"x"]},"b":1}"#
        );
    }
}
