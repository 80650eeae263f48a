//! reTHINK messages as clients really send them: parsing with clear errors, the fields the
//! node routes on, and response messages.
//!
//! A message is a JSON object with `id` (number or string, echoed back as sent), `type` (any
//! string, compared case-insensitively), `from` (one URL), `to` (one URL or an array of URLs)
//! and an optional `body` object. Everything else is carried through untouched: the node
//! forwards the text it received, never a re-serialisation.

use axum::extract::ws::Utf8Bytes;
use serde_json::{json, Map, Value};

use super::address::is_clean;

/// Why a frame is not a message the node can act on. Each maps to one reTHINK response code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// Malformed input: not JSON, a missing or mistyped field (400).
    #[error("{0}")]
    BadRequest(String),
    /// The connection has not authenticated (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Refused: by policy, or not the sender's to use (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such address or component (404).
    #[error("{0}")]
    NotFound(String),
    /// A dependency (homeserver, peer, policy) cannot answer now (408, as reTHINK uses it).
    #[error("{0}")]
    Unavailable(String),
    /// What the request would add cannot be stored: too large (413), refused before
    /// anything changed.
    #[error("{0}")]
    TooLarge(String),
    /// The sender is over its rate limit (429); the text says when to retry.
    #[error("{0}")]
    RateLimited(String),
}

impl BusError {
    /// The reTHINK response code (an HTTP status code).
    pub fn code(&self) -> u16 {
        match self {
            BusError::BadRequest(_) => 400,
            BusError::Unauthorized(_) => 401,
            BusError::Forbidden(_) => 403,
            BusError::NotFound(_) => 404,
            BusError::Unavailable(_) => 408,
            BusError::TooLarge(_) => 413,
            BusError::RateLimited(_) => 429,
        }
    }
}

/// A parsed reTHINK message: the routing fields, the JSON value, and the text it came as.
#[derive(Debug, Clone)]
pub struct Message {
    /// The frame as received: what is forwarded (cheap to clone, shared by every delivery).
    pub text: Utf8Bytes,
    /// The whole message.
    pub value: Value,
    /// `id`, as sent (number or string).
    pub id: Value,
    /// `type`, as sent.
    pub kind: String,
    /// `from`.
    pub from: String,
    /// `to`, always as a list.
    pub to: Vec<String>,
}

impl Message {
    /// Parses one frame. The error is a 400 whose text says what is wrong; `id` is returned
    /// with it when the frame had one, so the response can carry it.
    pub fn parse(text: impl Into<Utf8Bytes>) -> Result<Message, (BusError, Value)> {
        let text = text.into();
        let value: Value = serde_json::from_str(text.as_str())
            .map_err(|e| (BusError::BadRequest(format!("not JSON: {e}")), Value::Null))?;
        Self::from_value(value, Some(text))
    }

    /// Builds a message from a JSON value (its text is rendered when not given).
    pub fn from_value(value: Value, text: Option<Utf8Bytes>) -> Result<Message, (BusError, Value)> {
        let Value::Object(object) = &value else {
            return Err((
                BusError::BadRequest("a message must be a JSON object".into()),
                Value::Null,
            ));
        };
        let id = object.get("id").cloned().unwrap_or(Value::Null);
        // Only a valid id is echoed in the error: an answer is never bigger than its cause
        // by more than a few hundred bytes.
        let refused = |what: String| Err((BusError::BadRequest(what), Value::Null));
        match &id {
            Value::Number(_) => {}
            Value::String(s) if !s.is_empty() && s.len() <= MAX_ID_BYTES => {}
            Value::String(s) if !s.is_empty() => {
                return refused(format!("'id' is longer than {MAX_ID_BYTES} bytes"))
            }
            Value::Null => return refused("message has no 'id'".into()),
            _ => return refused("'id' must be a number or a non-empty string".into()),
        }
        let bad = |what: String| Err((BusError::BadRequest(what), id.clone()));
        let kind = match object.get("type") {
            Some(Value::String(t)) if !t.is_empty() => t.clone(),
            Some(_) => return bad("'type' must be a non-empty string".into()),
            None => return bad("message has no 'type'".into()),
        };
        let from = match object.get("from") {
            Some(Value::String(f)) => match url_problem("'from'", f) {
                None => f.clone(),
                Some(problem) => return bad(problem),
            },
            Some(_) => return bad("'from' must be a URL string".into()),
            None => return bad("message has no 'from'".into()),
        };
        let to = match object.get("to") {
            Some(Value::String(t)) => match url_problem("'to'", t) {
                None => vec![t.clone()],
                Some(problem) => return bad(problem),
            },
            Some(Value::Array(items)) if !items.is_empty() => {
                let mut to = Vec::with_capacity(items.len());
                for item in items {
                    match item.as_str().map(|t| (t, url_problem("a 'to' entry", t))) {
                        Some((t, None)) => to.push(t.to_string()),
                        Some((_, Some(problem))) => return bad(problem),
                        None => {
                            let item = item.to_string();
                            return bad(format!(
                                "every 'to' entry must be a URL, not {}",
                                shown(&item)
                            ));
                        }
                    }
                }
                to
            }
            Some(Value::Array(_)) => return bad("'to' is an empty array".into()),
            Some(_) => return bad("'to' must be a URL or an array of URLs".into()),
            None => return bad("message has no 'to'".into()),
        };
        if let Some(body) = object.get("body") {
            if !body.is_object() {
                return bad("'body' must be an object".into());
            }
        }
        let text = text.unwrap_or_else(|| Utf8Bytes::from(value.to_string()));
        Ok(Message {
            text,
            value,
            id,
            kind,
            from,
            to,
        })
    }

    /// `type`, lowercased, for comparisons.
    pub fn kind_is(&self, kind: &str) -> bool {
        self.kind.eq_ignore_ascii_case(kind)
    }

    /// `body`, or an empty object.
    pub fn body(&self) -> &Map<String, Value> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        self.value
            .get("body")
            .and_then(Value::as_object)
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
    }

    /// A string array in `body` (e.g. `resources`), `None` when absent.
    ///
    /// # Errors
    /// The field is present but is not an array of strings.
    pub fn body_strings(&self, field: &str) -> Result<Option<Vec<String>>, BusError> {
        match self.body().get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        BusError::BadRequest(format!("body.{field} must be an array of strings"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
            Some(_) => Err(BusError::BadRequest(format!(
                "body.{field} must be an array of strings"
            ))),
        }
    }

    /// The response to this message: `from`/`to` swapped (the first `to` answers),
    /// `body.code` and `body.description`, and `body.value` when given.
    pub fn response(&self, code: u16, description: &str, value: Option<Value>) -> String {
        response(
            &self.id,
            self.to.first().map(String::as_str).unwrap_or(""),
            &self.from,
            code,
            description,
            value,
        )
    }

    /// The response to this message with `body` as it is (`from`/`to` swapped).
    pub fn answer(&self, body: Value) -> String {
        let from = self.to.first().map(String::as_str).unwrap_or("");
        json!({"id": self.id, "type": "response", "from": from, "to": self.from, "body": body})
            .to_string()
    }

    /// The error response for `error`.
    pub fn error_response(&self, error: &BusError) -> String {
        self.response(error.code(), &error.to_string(), None)
    }
}

/// Longest string `id` a message may have (longer: 400, not echoed).
pub const MAX_ID_BYTES: usize = 256;

/// At most the first 64 characters of `s`, as error texts quote what was sent.
pub fn shown(s: &str) -> &str {
    s.char_indices().nth(64).map_or(s, |(end, _)| &s[..end])
}

/// A response message. `description` is also sent as `desc` (older stubs read that).
pub fn response(
    id: &Value,
    from: &str,
    to: &str,
    code: u16,
    description: &str,
    value: Option<Value>,
) -> String {
    let mut body = json!({"code": code});
    if !description.is_empty() {
        body["description"] = json!(description);
        body["desc"] = json!(description);
    }
    if let Some(value) = value {
        body["value"] = value;
    }
    json!({"id": id, "type": "response", "from": from, "to": to, "body": body}).to_string()
}

/// Longest URL the bus takes (bytes): Synapse's limit for a state key, which addresses and
/// runtime URLs become; also what keeps one address from filling a stored record.
pub const MAX_URL_BYTES: usize = 255;

/// Why `s` (named `what` in the answer) is not an address the bus takes: too long, not a
/// URL, or not in its clean spelling.
pub fn url_problem(what: &str, s: &str) -> Option<String> {
    if s.len() > MAX_URL_BYTES {
        return Some(format!(
            "{what} is {} bytes long; an address may have at most {MAX_URL_BYTES}",
            s.len()
        ));
    }
    (!is_url(s) || !is_clean(s)).then(|| format!("{what} is not a URL: {:?}", shown(s)))
}

/// Whether `s` looks like an absolute URL: a scheme, `:`, and something after it
/// (`hyperty://d/x`, `mn:/session`, `domain://msg-node.d/sm`).
pub fn is_url(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.')
        && scheme.as_bytes()[0].is_ascii_alphabetic()
        && !rest.is_empty()
        && !s.chars().any(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_clients_send() {
        let m = Message::parse(r#"{"id":7,"type":"CREATE","from":"hyperty://d/a","to":["hyperty://d/b","hyperty://d/c"],"body":{"x":1},"extra":true}"#).unwrap();
        assert_eq!(m.id, json!(7));
        assert!(m.kind_is("create"));
        assert_eq!(m.to, vec!["hyperty://d/b", "hyperty://d/c"]);
        assert_eq!(m.body()["x"], 1);
        let m = Message::parse(
            r#"{"id":"a1","type":"ping","from":"runtime://d/r","to":"mn:/session"}"#,
        )
        .unwrap();
        assert_eq!(m.id, json!("a1"));
        assert!(m.body().is_empty());
    }

    #[test]
    fn says_what_is_wrong() {
        let cases = [
            ("{", "not JSON"),
            ("[]", "JSON object"),
            (r#"{"type":"x","from":"a:b","to":"a:c"}"#, "no 'id'"),
            (
                r#"{"id":true,"type":"x","from":"a:b","to":"a:c"}"#,
                "'id' must be",
            ),
            (r#"{"id":1,"from":"a:b","to":"a:c"}"#, "no 'type'"),
            (r#"{"id":1,"type":"x","to":"a:c"}"#, "no 'from'"),
            (
                r#"{"id":1,"type":"x","from":"nourl","to":"a:c"}"#,
                "'from' is not a URL",
            ),
            (r#"{"id":1,"type":"x","from":"a:b"}"#, "no 'to'"),
            (
                r#"{"id":1,"type":"x","from":"h://d/a/../b","to":"a:c"}"#,
                "'from' is not a URL",
            ),
            (
                r#"{"id":1,"type":"x","from":"a:b","to":"h://d@e/x"}"#,
                "'to' is not a URL",
            ),
            (r#"{"id":1,"type":"x","from":"a:b","to":[]}"#, "empty array"),
            (r#"{"id":1,"type":"x","from":"a:b","to":[1]}"#, "every 'to'"),
            (
                r#"{"id":1,"type":"x","from":"a:b","to":"a:c","body":[]}"#,
                "'body' must be",
            ),
        ];
        for (frame, expected) in cases {
            let (error, _) = Message::parse(frame).unwrap_err();
            assert_eq!(error.code(), 400);
            assert!(error.to_string().contains(expected), "{frame}: {error}");
        }
        let (_, id) = Message::parse(r#"{"id":9,"type":"x","from":"a:b"}"#).unwrap_err();
        assert_eq!(id, json!(9), "the id comes back with the error");
        for invalid in [
            json!({"a": "x".repeat(1000)}),
            json!(["x"]),
            json!("x".repeat(257)),
        ] {
            let frame = json!({"id": invalid, "type": "x", "from": "a:b", "to": "a:c"});
            let (_, id) = Message::parse(frame.to_string()).unwrap_err();
            assert_eq!(id, Value::Null, "an invalid or oversized id is not echoed");
        }
        let long = format!("not a url {}", "y".repeat(10_000));
        let (error, _) =
            Message::parse(json!({"id": 1, "type": "x", "from": long, "to": "a:c"}).to_string())
                .unwrap_err();
        assert!(
            error.to_string().len() < 200,
            "what was sent is quoted cut: {error}"
        );
    }

    #[test]
    fn response_swaps_and_echoes() {
        let m = Message::parse(
            r#"{"id":"7","type":"create","from":"hyperty://d/a","to":"hyperty://d/b"}"#,
        )
        .unwrap();
        let r: Value = serde_json::from_str(&m.response(403, "Blocked by policy", None)).unwrap();
        assert_eq!(r["id"], "7");
        assert_eq!(r["type"], "response");
        assert_eq!(r["from"], "hyperty://d/b");
        assert_eq!(r["to"], "hyperty://d/a");
        assert_eq!(r["body"]["code"], 403);
        assert_eq!(r["body"]["description"], "Blocked by policy");
    }
}
