//! What the proxy does with a client request, read from its method and path: an allow-list.
//!
//! Reads (`GET`, `HEAD`, `OPTIONS`) stream through, and so do writes to media, consent and
//! the homeserver's own pages (`/_synapse/client`: SSO, account pages), which create no room
//! event. Other writes outside the client-server API are refused (404), and the federation
//! and authentication-service APIs are refused whatever the method: the proxy fronts a client
//! listener only. Every other request under `/_matrix/client/` is
//! routed as Synapse routes it (`table`: its own patterns, first match wins) and is then
//! exactly one of:
//! - **decided** ([`Route::Decide`]): the endpoint it becomes, decided by the policy and
//!   forwarded with its canonical path only;
//! - **allow-listed** ([`Route::Allowed`]): a route known to create no room event and change
//!   no membership, forwarded unchanged — only when the path is exactly that route, so the
//!   homeserver cannot read it as another;
//! - **refused** ([`Route::Refused`]): a route msgnode does not decide (403 `M_FORBIDDEN`),
//!   one the homeserver would answer 405 for another method, or none at all (404
//!   `M_UNRECOGNIZED`: also every route a newer or differently configured Synapse adds, until
//!   the table knows it).
//!
//! Every spelling is read two ways: as received (how Synapse matches: the raw path, anchored)
//! and normalised (segments percent-decoded, empty ones dropped, re-encoded), each anchored
//! as Synapse 1.163.2 matches and then as a prefix, as older releases matched some patterns.
//! A request is decided if any reading names a decided endpoint. `/_synapse/admin` and the
//! application-service API are refused in every spelling.

mod endpoint;
pub mod table;

use axum::http::{Method, StatusCode};
use percent_encoding::{percent_decode_str, utf8_percent_encode};

use endpoint::SEGMENT;
pub use endpoint::{Intercepted, InvalidIdentifier, MembershipAction};
use table::{lookup, Action, Lookup};

/// What the proxy does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Not a write of the client-server API: streamed through untouched.
    PassThrough,
    /// Decided, then forwarded with its canonical path.
    Decide(Intercepted),
    /// A write that creates no room event and changes no membership: forwarded unchanged.
    Allowed(&'static str),
    /// Not forwarded.
    Refused(Refusal),
}

/// Why a request is refused without being forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 403 (not decided by msgnode), 404 (no such route) or 405 (not for this method).
    pub status: StatusCode,
    /// What the client is told.
    pub reason: String,
}

impl Refusal {
    fn forbidden(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            reason: reason.into(),
        }
    }
}

/// What the proxy does with `method` on `raw_path` (the path as received, without query).
pub fn classify(method: &Method, raw_path: &str) -> Route {
    let segments: Vec<String> = raw_path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    match segments.as_slice() {
        [first, second, ..] if first == "_synapse" && second == "admin" => {
            return Route::Refused(Refusal::forbidden(
                "the homeserver's admin API is not served through msgnode",
            ));
        }
        [first, second, ..] if first == "_matrix" && second == "app" => {
            return appservice_api();
        }
        [first, ..] if ["transactions", "users", "rooms"].contains(&first.as_str()) => {
            return appservice_api();
        }
        [first, second, ..] if first == "_matrix" && second == "federation" => {
            return Route::Refused(Refusal {
                status: StatusCode::NOT_FOUND,
                reason: "the federation API is not served through the client proxy (msgnode decides federated events as a policy server)".into(),
            });
        }
        [first, second, ..] if first == "_synapse" && second == "mas" => {
            return Route::Refused(Refusal::forbidden(
                "the homeserver's authentication-service API is not served through msgnode",
            ));
        }
        _ => {}
    }
    let read = [Method::GET, Method::HEAD, Method::OPTIONS].contains(method);
    match segments.as_slice() {
        [first, second, ..] if first == "_matrix" && second == "client" => {}
        _ if read => return Route::PassThrough,
        // Writes that create no room event: uploads, consent, the SSO and account pages.
        [first, second, ..]
            if (first == "_matrix" && (second == "media" || second == "consent"))
                || (first == "_synapse" && second == "client") =>
        {
            return Route::PassThrough;
        }
        _ => {
            return Route::Refused(Refusal {
                status: StatusCode::NOT_FOUND,
                reason: format!(
                    "{method} {raw_path}: msgnode forwards writes only to the client-server API, media, consent and the homeserver's own pages"
                ),
            });
        }
    }
    if read {
        return Route::PassThrough;
    }
    let normalised: String = segments
        .iter()
        .map(|s| format!("/{}", utf8_percent_encode(s, SEGMENT)))
        .collect();
    let readings = [raw_path, normalised.as_str()];
    // Decided in any reading (anchored first: what Synapse 1.163.2 does with the path).
    let mut refusal: Option<Refusal> = None;
    let mut other_method = false;
    for anchored in [true, false] {
        for (i, path) in readings.iter().enumerate() {
            match lookup(method, path, anchored) {
                Lookup::Found(matched) => match matched.route.action {
                    Action::Decide(kind) => {
                        if let Some(endpoint) = Intercepted::from_route(kind, &matched.params) {
                            return Route::Decide(endpoint);
                        }
                    }
                    // As received and whole: the homeserver reads it as this route too.
                    Action::Allow(reason) if anchored && i == 0 => {
                        return Route::Allowed(reason);
                    }
                    Action::Allow(_) => {}
                    Action::Refuse(reason) => {
                        refusal.get_or_insert_with(|| {
                            Refusal::forbidden(format!(
                                "{method} {}: not supported through msgnode: {reason}",
                                matched.route.pattern
                            ))
                        });
                    }
                },
                Lookup::OtherMethod => other_method = true,
                Lookup::NoRoute => {}
            }
        }
    }
    Route::Refused(refusal.unwrap_or_else(|| {
        if other_method {
            Refusal {
                status: StatusCode::METHOD_NOT_ALLOWED,
                reason: format!("{method} is not a method of this endpoint"),
            }
        } else {
            Refusal {
                status: StatusCode::NOT_FOUND,
                reason: format!(
                    "{method} {raw_path}: not an endpoint msgnode knows (it forwards only decided or known event-free writes)"
                ),
            }
        }
    }))
}

/// The homeserver pushes to msgnode at `/_matrix/app/…` (and the legacy unprefixed
/// `/transactions`, `/users`, `/rooms`); it must never be forwarded back to it.
fn appservice_api() -> Route {
    Route::Refused(Refusal {
        status: StatusCode::NOT_FOUND,
        reason: "the application service API is not served through the proxy".into(),
    })
}

#[cfg(test)]
mod tests;
