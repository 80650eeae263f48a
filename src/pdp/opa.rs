//! The real OPA engine (Go, OPA v1.20.2) as a second opinion on a bundle: loaded from the C
//! library of the `opa-golib-python-bindings` wheel (`scripts/opa path` installs it and
//! prints where), so that `msgnode policy test --opa LIB` can check OPA decides every fixture,
//! test and variant as msgnode does, and `msgnode bench --against opa` can time both.
//!
//! The library exports a handful of C functions; each fallible one returns a `malloc`ed JSON
//! envelope, `{"result": …}` or `{"error": {"code", "message"}}`, freed with
//! `OpaFreeString`. A handle is an id in the library's own registry, usable from any thread at
//! once (evaluations run in parallel). The library starts a Go runtime when it is loaded, and a
//! Go runtime cannot be unloaded: a loaded library is kept for the life of the process.
//!
//! OPA quirks handled here: `OpaEvalDocument` takes the path without `data.`; `OpaAddPolicy`
//! only parses, so compile errors surface at the first evaluation (done at load, so that a
//! bundle OPA cannot compile is an error here, not a wrong answer later); the first
//! evaluation of a path prepares it (OPA's server does the same once per path).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde_json::Value;

use super::bundle::Bundle;
use super::engine::DataPath;

/// Why OPA could not be loaded or could not answer.
#[derive(Debug, thiserror::Error)]
pub enum OpaError {
    /// The library could not be loaded or lacks a function.
    #[error("cannot load the OPA library {path}: {message} (scripts/opa path installs it)")]
    Load {
        /// The library file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A text handed to OPA contains a NUL byte.
    #[error("{0} contains a NUL byte, which the OPA library cannot take")]
    Nul(&'static str),
    /// OPA answered with an error envelope (`parse_error`, `prepare_error`, `eval_error`, …).
    #[error("OPA {code}: {message}")]
    Opa {
        /// OPA's error code.
        code: String,
        /// OPA's message.
        message: String,
    },
    /// OPA's answer is not the JSON envelope the library documents.
    #[error("unexpected answer from the OPA library: {0}")]
    Envelope(String),
    /// The path cannot be named to `OpaEvalDocument`.
    #[error("{0}: only paths of Rego identifiers can be evaluated on OPA")]
    Path(String),
}

type NewFn = unsafe extern "C" fn() -> u64;
type DestroyFn = unsafe extern "C" fn(u64);
type FreeFn = unsafe extern "C" fn(*mut c_char);
type AddFn = unsafe extern "C" fn(u64, *const c_char, *const c_char) -> *mut c_char;
type EvalFn = unsafe extern "C" fn(u64, *const c_char, *const c_char, c_int, c_int) -> *mut c_char;

/// The loaded library: its functions, for the life of the process.
pub struct Opa {
    new: NewFn,
    destroy: DestroyFn,
    free: FreeFn,
    add_policy: AddFn,
    add_data: AddFn,
    eval_document: EvalFn,
}

/// Libraries loaded so far, by path (each is loaded once and never unloaded).
static LOADED: OnceLock<Mutex<HashMap<PathBuf, &'static Opa>>> = OnceLock::new();

impl Opa {
    /// Loads the library at `path` (once per process; later calls return the same).
    ///
    /// # Errors
    /// The file is not a loadable library or lacks one of the functions.
    pub fn load(path: &Path) -> Result<&'static Opa, OpaError> {
        let loaded = LOADED.get_or_init(Default::default);
        let mut loaded = loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(opa) = loaded.get(path) {
            return Ok(opa);
        }
        let error = |e: libloading::Error| OpaError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        // SAFETY: loading runs the library's initialisers (the Go runtime starts); the file
        // is the one scripts/opa installs, whose exports have the C signatures above.
        let library = unsafe { libloading::Library::new(path) }.map_err(error)?;
        // A Go runtime cannot be unloaded: the library stays for the life of the process.
        let library: &'static libloading::Library = Box::leak(Box::new(library));
        // SAFETY: each symbol is one of the library's exports with the type it is read as.
        let opa = unsafe {
            Opa {
                new: *library.get::<NewFn>(b"OpaNew\0").map_err(error)?,
                destroy: *library.get::<DestroyFn>(b"OpaDestroy\0").map_err(error)?,
                free: *library.get::<FreeFn>(b"OpaFreeString\0").map_err(error)?,
                add_policy: *library.get::<AddFn>(b"OpaAddPolicy\0").map_err(error)?,
                add_data: *library.get::<AddFn>(b"OpaAddData\0").map_err(error)?,
                eval_document: *library.get::<EvalFn>(b"OpaEvalDocument\0").map_err(error)?,
            }
        };
        let opa: &'static Opa = Box::leak(Box::new(opa));
        loaded.insert(path.to_path_buf(), opa);
        Ok(opa)
    }

    /// Reads and frees an envelope the library returned; its `result`, or its error.
    fn envelope(&self, answer: *mut c_char) -> Result<Value, OpaError> {
        if answer.is_null() {
            return Err(OpaError::Envelope("no answer (NULL)".into()));
        }
        // SAFETY: a non-NULL answer is a NUL-terminated string the library allocated; it is
        // copied before it is handed back to the library's free.
        let text = unsafe { CStr::from_ptr(answer) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: freed exactly once, with the library's own free.
        unsafe { (self.free)(answer) };
        let mut envelope: Value =
            serde_json::from_str(&text).map_err(|e| OpaError::Envelope(format!("{e}: {text}")))?;
        match envelope.get_mut("error").map(Value::take) {
            Some(Value::Null) | None => Ok(envelope
                .get_mut("result")
                .map(Value::take)
                .unwrap_or(Value::Null)),
            Some(error) => Err(OpaError::Opa {
                code: error["code"].as_str().unwrap_or("error").to_string(),
                message: error["message"]
                    .as_str()
                    .map_or_else(|| error.to_string(), str::to_string),
            }),
        }
    }
}

/// One bundle loaded into its own OPA engine. Any thread may evaluate on it, several at once.
pub struct OpaBundle {
    opa: &'static Opa,
    handle: u64,
}

impl OpaBundle {
    /// Loads every module and the data of `bundle` into a new OPA engine, then evaluates
    /// `warm_up` once: OPA compiles there, and prepares that path for later evaluations.
    ///
    /// # Errors
    /// OPA rejects a module or the data, or cannot compile the bundle.
    pub fn load(opa: &'static Opa, bundle: &Bundle, warm_up: &DataPath) -> Result<Self, OpaError> {
        // SAFETY: OpaNew takes nothing and returns a handle.
        let handle = unsafe { (opa.new)() };
        let loaded = OpaBundle { opa, handle };
        for module in &bundle.modules {
            let name = cstring(&module.id, "a module path")?;
            let source = cstring(&module.raw, "a module")?;
            // SAFETY: both pointers are NUL-terminated strings alive for the call.
            let answer = unsafe { (opa.add_policy)(handle, name.as_ptr(), source.as_ptr()) };
            opa.envelope(answer)?;
        }
        let data = cstring(&bundle.data.to_string(), "the data")?;
        // SAFETY: as above; "" is the root of the data document.
        let answer = unsafe { (opa.add_data)(handle, c"".as_ptr(), data.as_ptr()) };
        opa.envelope(answer)?;
        loaded.evaluate(warm_up, None)?;
        Ok(loaded)
    }

    /// Evaluates `path` with `input` (JSON text; `None`: no input). `Ok(None)` is an
    /// undefined document.
    ///
    /// # Errors
    /// OPA's evaluation error (a conflict, a strict builtin error, …), or a path with a
    /// segment that is not a Rego identifier.
    pub fn evaluate(
        &self,
        path: &DataPath,
        input: Option<&str>,
    ) -> Result<Option<Value>, OpaError> {
        let dotted = path
            .as_query()
            .strip_prefix("data.")
            .filter(|p| !p.contains('['))
            .ok_or_else(|| OpaError::Path(path.to_string()))?;
        let dotted = cstring(dotted, "the path")?;
        let input = cstring(input.unwrap_or(""), "the input")?;
        // SAFETY: both pointers are NUL-terminated strings alive for the call; no coverage,
        // no trace.
        let answer =
            unsafe { (self.opa.eval_document)(self.handle, dotted.as_ptr(), input.as_ptr(), 0, 0) };
        let result = self.opa.envelope(answer)?;
        // `[{"expressions": [{"value": V, …}], …}]`, or null when undefined.
        Ok(match result {
            Value::Array(mut results) if !results.is_empty() => {
                let mut first = results.swap_remove(0);
                match first.pointer_mut("/expressions/0/value").map(Value::take) {
                    Some(value) => Some(value),
                    None => return Err(OpaError::Envelope(first.to_string())),
                }
            }
            _ => None,
        })
    }
}

impl Drop for OpaBundle {
    fn drop(&mut self) {
        // SAFETY: the handle came from OpaNew and is destroyed once.
        unsafe { (self.opa.destroy)(self.handle) };
    }
}

fn cstring(text: &str, what: &'static str) -> Result<CString, OpaError> {
    CString::new(text).map_err(|_| OpaError::Nul(what))
}
