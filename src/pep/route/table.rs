//! The write routes of Synapse's client-server API (`PUT`/`POST`/`DELETE` under
//! `/_matrix/client/`), in Synapse's registration order, each with what the proxy does:
//! decide it, forward it because it creates no room event and changes no membership (with
//! the reason), or refuse it.
//!
//! The patterns are Synapse 1.163.2's own, exactly as its servlets register them on the main
//! process with the default configuration (`scripts/synapse routes` prints them from the
//! installed Synapse; `tests/pep_routes.rs` checks this table against that list and probes a
//! running Synapse). They are matched as Synapse's `re.match` does — anchored at the start —
//! and, because older releases left the trailing `$` off some patterns (so that
//! `POST /knock/{room}/anything` knocked), also as prefixes: a decided endpoint is decided
//! whatever follows it, and forwarded only with its canonical path.

use std::sync::LazyLock;

use axum::http::Method;
use regex::Regex;

/// What the proxy does with one route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Decided by the policy (the endpoint the request becomes), then forwarded with its
    /// canonical path.
    Decide(Kind),
    /// Forwarded unchanged: creates no room event and changes no membership (the reason).
    Allow(&'static str),
    /// Refused: it would create room events no policy decides (the reason).
    Refuse(&'static str),
}

/// The decided endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A state event.
    State,
    /// Joining by room id or alias.
    Join,
    /// `/rooms/{roomId}/{invite|join|leave|kick|ban|unban}`.
    Membership,
    /// A message event.
    Send,
    /// A redaction.
    Redact,
    /// A new room and all its initial events.
    CreateRoom,
    /// A profile field set: a member event in every joined room.
    ProfileSet,
    /// A profile field removed: a member event in every joined room.
    ProfileDelete,
    /// An alias removed: the room's canonical alias event, when it named it.
    DeleteAlias,
    /// Deactivation: the account leaves every room.
    Deactivate,
    /// A knock.
    Knock,
    /// To-device messages (not room events, but traffic between users).
    SendToDevice,
}

/// Why the event-free writes are forwarded.
const SESSION: &str = "sessions and credentials; no room event";
const ACCOUNT: &str = "the user's own account settings; no room event";
const READ: &str = "a read sent as POST; changes nothing";
const EDU: &str = "an ephemeral event (EDU), not a room event";
const KEYS: &str = "end-to-end keys and backups; no room event";
const REPORT: &str = "a report to the homeserver's admins; no room event";
const DIRECTORY: &str = "the room directory or alias map; no room event";
const DELAYED: &str = "acts on a delayed event, which was decided when it was scheduled (delayed events are scheduled through the decided /send and /state)";

/// A version alternation as Synapse writes it.
const ALL: &str = "(api/v1|r0|v3|unstable)";
const REL: &str = "(r0|v3|unstable)";

/// One write route: method, Synapse's pattern with `{all}`/`{rel}` for the version
/// alternations, and the action.
type Entry = (Method, &'static str, Action);

fn entries() -> Vec<Entry> {
    use Action::{Allow, Decide, Refuse};
    use Kind::*;
    let (put, post, delete) = (Method::PUT, Method::POST, Method::DELETE);
    vec![
        (put.clone(), "{all}/rooms/(?P<room_id>[^/]*)/state/(?P<event_type>[^/]*)/(?P<state_key>[^/]*)$", Decide(State)),
        (put.clone(), "{all}/rooms/(?P<room_id>[^/]*)/state/(?P<event_type>[^/]*)$", Decide(State)),
        (post.clone(), "{all}/join/(?P<room_identifier>[^/]*)$", Decide(Join)),
        (put.clone(), "{all}/join/(?P<room_identifier>[^/]*)/(?P<txn_id>[^/]*)$", Decide(Join)),
        (post.clone(), "{all}/rooms/(?P<room_id>[^/]*)/(?P<membership_action>join|invite|leave|ban|unban|kick)$", Decide(Membership)),
        (put.clone(), "{all}/rooms/(?P<room_id>[^/]*)/(?P<membership_action>join|invite|leave|ban|unban|kick)/(?P<txn_id>[^/]*)$", Decide(Membership)),
        (post.clone(), "{all}/rooms/(?P<room_id>[^/]*)/send/(?P<event_type>[^/]*)$", Decide(Send)),
        (put.clone(), "{all}/rooms/(?P<room_id>[^/]*)/send/(?P<event_type>[^/]*)/(?P<txn_id>[^/]*)$", Decide(Send)),
        (post.clone(), "{all}/publicRooms$", Allow(READ)),
        (post.clone(), "{all}/rooms/(?P<room_id>[^/]*)/redact/(?P<event_id>[^/]*)$", Decide(Redact)),
        (put.clone(), "{all}/rooms/(?P<room_id>[^/]*)/redact/(?P<event_id>[^/]*)/(?P<txn_id>[^/]*)$", Decide(Redact)),
        (put.clone(), "{all}/rooms/(?P<room_id>[^/]*)/typing/(?P<user_id>[^/]*)$", Allow(EDU)),
        (post.clone(), "{all}/search$", Allow(READ)),
        (post.clone(), "{all}/createRoom$", Decide(CreateRoom)),
        (put.clone(), "{all}/createRoom/(?P<txn_id>[^/]*)$", Decide(CreateRoom)),
        (post.clone(), "{all}/rooms/(?P<room_id>[^/]*)/forget$", Allow("forgets a room the user has left; no room event")),
        (put.clone(), "{all}/rooms/(?P<room_id>[^/]*)/forget/(?P<txn_id>[^/]*)$", Allow("forgets a room the user has left; no room event")),
        (post.clone(), "unstable/org\\.matrix\\.msc4140/delayed_events/(?P<delay_id>[^/]+)$", Allow(DELAYED)),
        (post.clone(), "unstable/org\\.matrix\\.msc4140/delayed_events/(?P<delay_id>[^/]+)/cancel$", Allow(DELAYED)),
        (post.clone(), "unstable/org\\.matrix\\.msc4140/delayed_events/(?P<delay_id>[^/]+)/send$", Allow(DELAYED)),
        (post.clone(), "unstable/org\\.matrix\\.msc4140/delayed_events/(?P<delay_id>[^/]+)/restart$", Allow(DELAYED)),
        (post.clone(), "{all}/login$", Allow(SESSION)),
        (post.clone(), "{rel}/refresh$", Allow(SESSION)),
        (put.clone(), "{all}/profile/(?P<user_id>[^/]*)/(?P<field_name>displayname)$", Decide(ProfileSet)),
        (delete.clone(), "{all}/profile/(?P<user_id>[^/]*)/(?P<field_name>displayname)$", Decide(ProfileDelete)),
        (put.clone(), "{all}/profile/(?P<user_id>[^/]*)/(?P<field_name>avatar_url)$", Decide(ProfileSet)),
        (delete.clone(), "{all}/profile/(?P<user_id>[^/]*)/(?P<field_name>avatar_url)$", Decide(ProfileDelete)),
        (put.clone(), "v3/profile/(?P<user_id>[^/]*)/(?P<field_name>[^/]*)$", Decide(ProfileSet)),
        (delete.clone(), "v3/profile/(?P<user_id>[^/]*)/(?P<field_name>[^/]*)$", Decide(ProfileDelete)),
        (put.clone(), "{all}/presence/(?P<user_id>[^/]*)/status$", Allow(EDU)),
        (put.clone(), "{all}/directory/room/(?P<room_alias>[^/]*)$", Allow(DIRECTORY)),
        (delete.clone(), "{all}/directory/room/(?P<room_alias>[^/]*)$", Decide(DeleteAlias)),
        (put.clone(), "{all}/directory/list/room/(?P<room_id>[^/]*)$", Allow(DIRECTORY)),
        (put.clone(), "{all}/directory/list/appservice/(?P<network_id>[^/]*)/(?P<room_id>[^/]*)$", Allow(DIRECTORY)),
        (delete.clone(), "{all}/directory/list/appservice/(?P<network_id>[^/]*)/(?P<room_id>[^/]*)$", Allow(DIRECTORY)),
        (post.clone(), "{all}/pushers/set$", Allow(ACCOUNT)),
        (put.clone(), "{all}/(?P<path>pushrules/.*)$", Allow(ACCOUNT)),
        (delete.clone(), "{all}/(?P<path>pushrules/.*)$", Allow(ACCOUNT)),
        (post.clone(), "{all}/logout$", Allow(SESSION)),
        (post.clone(), "{all}/logout/all$", Allow(SESSION)),
        (post.clone(), "unstable/org.matrix.simplified_msc3575/sync$", Allow(READ)),
        (post.clone(), "{rel}/user/(?P<user_id>[^/]*)/filter$", Allow(ACCOUNT)),
        (post.clone(), "{rel}/account/3pid$", Allow(ACCOUNT)),
        (post.clone(), "{rel}/account/deactivate$", Decide(Deactivate)),
        (post.clone(), "{rel}/account/3pid/bind$", Allow(ACCOUNT)),
        (post.clone(), "{rel}/account/3pid/unbind$", Allow(ACCOUNT)),
        (post.clone(), "{rel}/account/password/email/requestToken$", Allow(SESSION)),
        (post.clone(), "{rel}/account/password$", Allow(SESSION)),
        (post.clone(), "{rel}/account/3pid/email/requestToken$", Allow(ACCOUNT)),
        (post.clone(), "{rel}/account/3pid/msisdn/requestToken$", Allow(ACCOUNT)),
        (post.clone(), "unstable/add_threepid/msisdn/submit_token$", Allow(ACCOUNT)),
        (post.clone(), "{rel}/account/3pid/add$", Allow(ACCOUNT)),
        (post.clone(), "{rel}/account/3pid/delete$", Allow(ACCOUNT)),
        (post.clone(), "{rel}/register/email/requestToken$", Allow(SESSION)),
        (post.clone(), "{rel}/register/msisdn/requestToken$", Allow(SESSION)),
        (post.clone(), "{rel}/register$", Allow("registers an account; no room event unless the operator configured auto_join_rooms")),
        (post.clone(), "{rel}/auth/(?P<stagetype>[\\w\\.]*)/fallback/web$", Allow(SESSION)),
        (post.clone(), "{rel}/rooms/(?P<room_id>[^/]*)/receipt/(?P<receipt_type>[^/]*)/(?P<event_id>[^/]*)$", Allow(EDU)),
        (post.clone(), "{rel}/rooms/(?P<room_id>[^/]*)/read_markers$", Allow("read markers: account data and a receipt (EDU); no room event")),
        (put.clone(), "{rel}/room_keys/keys(/(?P<room_id>[^/]+))?(/(?P<session_id>[^/]+))?$", Allow(KEYS)),
        (delete.clone(), "{rel}/room_keys/keys(/(?P<room_id>[^/]+))?(/(?P<session_id>[^/]+))?$", Allow(KEYS)),
        (put.clone(), "{rel}/room_keys/version/(?P<version>[^/]+)$", Allow(KEYS)),
        (delete.clone(), "{rel}/room_keys/version/(?P<version>[^/]+)$", Allow(KEYS)),
        (post.clone(), "{rel}/room_keys/version$", Allow(KEYS)),
        (post.clone(), "{rel}/keys/upload$", Allow(KEYS)),
        (post.clone(), "{rel}/keys/query$", Allow(KEYS)),
        (post.clone(), "{rel}/keys/claim$", Allow(KEYS)),
        (post.clone(), "(v3|unstable)/keys/device_signing/upload$", Allow(KEYS)),
        (post.clone(), "{rel}/keys/signatures/upload$", Allow(KEYS)),
        (post.clone(), "{rel}/tokenrefresh$", Allow(SESSION)),
        (put.clone(), "{rel}/user/(?P<user_id>[^/]*)/rooms/(?P<room_id>[^/]*)/tags/(?P<tag>[^/]*)$", Allow(ACCOUNT)),
        (delete.clone(), "{rel}/user/(?P<user_id>[^/]*)/rooms/(?P<room_id>[^/]*)/tags/(?P<tag>[^/]*)$", Allow(ACCOUNT)),
        (put.clone(), "{rel}/user/(?P<user_id>[^/]*)/account_data/(?P<account_data_type>[^/]*)$", Allow(ACCOUNT)),
        (put.clone(), "{rel}/user/(?P<user_id>[^/]*)/rooms/(?P<room_id>[^/]*)/account_data/(?P<account_data_type>[^/]*)$", Allow(ACCOUNT)),
        (post.clone(), "{rel}/rooms/(?P<room_id>[^/]*)/report/(?P<event_id>[^/]*)$", Allow(REPORT)),
        (post.clone(), "v3/rooms/(?P<room_id>[^/]*)/report$", Allow(REPORT)),
        (post.clone(), "v3/users/(?P<target_user_id>[^/]*)/report$", Allow(REPORT)),
        (post.clone(), "{rel}/user/(?P<user_id>[^/]*)/openid/request_token$", Allow(SESSION)),
        (post.clone(), "{rel}/delete_devices$", Allow(SESSION)),
        (put.clone(), "{rel}/devices/(?P<device_id>[^/]*)$", Allow(SESSION)),
        (delete.clone(), "{rel}/devices/(?P<device_id>[^/]*)$", Allow(SESSION)),
        (put.clone(), "{rel}/sendToDevice/(?P<message_type>[^/]*)/(?P<txn_id>[^/]*)$", Decide(SendToDevice)),
        (post.clone(), "{rel}/user_directory/search$", Allow(READ)),
        (post.clone(), "{rel}/rooms/(?P<room_id>[^/]*)/upgrade$", Refuse("a room upgrade creates a new room with copied state and a tombstone, which msgnode does not decide")),
        (post.clone(), "{rel}/account_validity/send_mail$", Allow(ACCOUNT)),
        (post.clone(), "{rel}/knock/(?P<room_identifier>[^/]*)$", Decide(Knock)),
        (post, "(v1|unstable)/appservice/(?P<appservice_id>[^/]*)/ping$", Allow("an application service pinging itself; no room event")),
    ]
}

/// One compiled route.
pub struct Route {
    /// The method it answers.
    pub method: Method,
    /// Synapse's pattern, as it registers it (`^/_matrix/client/…$`).
    pub pattern: String,
    /// Anchored at the start only (a prefix match).
    prefix: Regex,
    /// Anchored at both ends.
    exact: Regex,
    /// What the proxy does.
    pub action: Action,
}

/// The table, compiled once.
pub static ROUTES: LazyLock<Vec<Route>> = LazyLock::new(|| {
    entries()
        .into_iter()
        .filter_map(|(method, tail, action)| {
            let pattern = format!(
                "^/_matrix/client/{}",
                tail.replace("{all}", ALL).replace("{rel}", REL)
            );
            let open = pattern.strip_suffix('$').unwrap_or(&pattern);
            // The patterns are constants; one that does not compile fails the table's test.
            let prefix = Regex::new(open).ok()?;
            let exact = Regex::new(&format!("{open}$")).ok()?;
            Some(Route {
                method,
                pattern,
                prefix,
                exact,
                action,
            })
        })
        .collect()
});

/// How a path matched a route.
pub struct Matched<'a> {
    /// The route.
    pub route: &'a Route,
    /// The named parameters, percent-decoded as Synapse decodes them.
    pub params: Vec<(&'static str, String)>,
}

/// What the table says of `path` for `method`, as Synapse's first-match routing reads it
/// (one pattern may serve several methods, as one Synapse servlet does).
pub enum Lookup<'a> {
    /// The first route whose pattern matches, for this method.
    Found(Matched<'a>),
    /// The first pattern that matches serves other methods only (Synapse: 405).
    OtherMethod,
    /// No pattern matches (Synapse: 404).
    NoRoute,
}

/// Looks `path` up: `anchored`, as Synapse 1.163.2 matches (whole path); else as older
/// releases did for some patterns (a prefix of the path).
pub fn lookup<'a>(method: &Method, path: &str, anchored: bool) -> Lookup<'a> {
    let routes: &'a [Route] = &ROUTES;
    let regex = |r: &'a Route| if anchored { &r.exact } else { &r.prefix };
    let Some(first) = routes.iter().find(|r| regex(r).is_match(path)) else {
        return Lookup::NoRoute;
    };
    let Some(route) = routes
        .iter()
        .find(|r| r.pattern == first.pattern && r.method == *method)
    else {
        return Lookup::OtherMethod;
    };
    let Some(captures) = regex(route).captures(path) else {
        return Lookup::NoRoute;
    };
    let params = regex(route)
        .capture_names()
        .flatten()
        .filter_map(|name| {
            let value = captures.name(name)?.as_str();
            let decoded = percent_encoding::percent_decode_str(value)
                .decode_utf8_lossy()
                .into_owned();
            Some((static_name(name), decoded))
        })
        .collect();
    Lookup::Found(Matched { route, params })
}

/// The parameter names the table uses, as `'static` strings.
fn static_name(name: &str) -> &'static str {
    const NAMES: [&str; 12] = [
        "room_id",
        "event_type",
        "state_key",
        "room_identifier",
        "txn_id",
        "membership_action",
        "event_id",
        "user_id",
        "field_name",
        "room_alias",
        "message_type",
        "delay_id",
    ];
    NAMES
        .iter()
        .find(|n| **n == name)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_compiles() {
        assert_eq!(ROUTES.len(), entries().len());
    }
}
