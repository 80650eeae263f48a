use super::*;

fn send() -> Intercepted {
    Intercepted::Send {
        room_id: "!r:localhost".into(),
        event_type: "m.room.message".into(),
        txn_id: Some("t1".into()),
    }
}

fn decided(method: Method, path: &str) -> Intercepted {
    match classify(&method, path) {
        Route::Decide(endpoint) => endpoint,
        other => panic!("{method} {path} is not decided: {other:?}"),
    }
}

fn refused(method: Method, path: &str) -> StatusCode {
    match classify(&method, path) {
        Route::Refused(refusal) => refusal.status,
        other => panic!("{method} {path} is not refused: {other:?}"),
    }
}

#[test]
fn every_spelling_of_an_endpoint_classifies_the_same() {
    for path in [
        "/_matrix/client/v3/rooms/!r:localhost/send/m.room.message/t1",
        "/_matrix/client/r0/rooms/!r:localhost/send/m.room.message/t1",
        "/_matrix/client/unstable/rooms/!r:localhost/send/m.room.message/t1",
        "/_matrix/client/api/v1/rooms/!r:localhost/send/m.room.message/t1",
        "/_matrix/client/v3/rooms/%21r%3Alocalhost/send/m.room.message/t1",
        "/_matrix/client/v3/rooms/!r:localhost/send/m%2Eroom%2Emessage/t1",
        "/_matrix/client/v3/rooms/!r:localhost/s%65nd/m.room.message/t1",
        "//_matrix//client/v3/rooms/!r:localhost/send/m.room.message/t1/",
        "/_matrix/client/v3/rooms/!r:localhost//send/m.room.message/t1",
    ] {
        assert_eq!(decided(Method::PUT, path), send(), "{path}");
    }
}

#[test]
fn empty_segments_are_empty_parameters_as_the_homeserver_reads_them() {
    let empty_txn = Intercepted::Send {
        room_id: "!r:l".into(),
        event_type: "m.room.message".into(),
        txn_id: Some(String::new()),
    };
    assert_eq!(
        decided(
            Method::PUT,
            "/_matrix/client/v3/rooms/!r:l/send/m.room.message/"
        ),
        empty_txn
    );
    let empty_type = Intercepted::Send {
        room_id: "!r:l".into(),
        event_type: String::new(),
        txn_id: Some("t".into()),
    };
    assert_eq!(
        decided(Method::PUT, "/_matrix/client/v3/rooms/!r:l/send//t"),
        empty_type
    );
    let to_device = Intercepted::SendToDevice {
        event_type: "m.room.encrypted".into(),
        txn_id: String::new(),
    };
    assert_eq!(
        decided(
            Method::PUT,
            "/_matrix/client/v3/sendToDevice/m.room.encrypted/"
        ),
        to_device
    );
}

#[test]
fn reads_and_paths_outside_the_client_api_pass_through() {
    for (method, path) in [
        (
            Method::GET,
            "/_matrix/client/v3/rooms/!r:localhost/send/m.room.message/t1",
        ),
        (Method::GET, "/_matrix/client/v3/sync"),
        (Method::HEAD, "/_matrix/client/versions"),
        (Method::OPTIONS, "/_matrix/client/v3/createRoom"),
        (
            Method::GET,
            "/_matrix/client/v3/rooms/!r:localhost/messages",
        ),
        (Method::POST, "/_matrix/media/v3/upload"),
        (Method::GET, "/.well-known/matrix/client"),
        (Method::GET, "/_synapse/client/pick_username/account"),
    ] {
        assert_eq!(
            classify(&method, path),
            Route::PassThrough,
            "{method} {path}"
        );
    }
}

#[test]
fn event_free_writes_are_allow_listed_with_a_reason() {
    for (method, path) in [
        (Method::POST, "/_matrix/client/v3/login"),
        (Method::PUT, "/_matrix/client/v3/rooms/!r:l/typing/@a:l"),
        (
            Method::POST,
            "/_matrix/client/v3/rooms/!r:l/receipt/m.read/$e",
        ),
        (Method::POST, "/_matrix/client/v3/rooms/!r:l/read_markers"),
        (Method::POST, "/_matrix/client/v3/rooms/!r:l/forget"),
        (Method::POST, "/_matrix/client/v3/keys/upload"),
        (Method::PUT, "/_matrix/client/v3/directory/room/%23a:l"),
        (
            Method::PUT,
            "/_matrix/client/v3/user/@a:l/account_data/m.direct",
        ),
        (
            Method::PUT,
            "/_matrix/client/v3/pushrules/global/override/x",
        ),
    ] {
        match classify(&method, path) {
            Route::Allowed(reason) => assert!(!reason.is_empty()),
            other => panic!("{method} {path}: {other:?}"),
        }
    }
}

#[test]
fn allow_listed_routes_are_forwarded_only_when_the_homeserver_reads_them_as_such() {
    // A trailing segment or an odd spelling is not the allow-listed route as Synapse
    // matches it: refused, never forwarded.
    assert_eq!(
        refused(Method::PUT, "/_matrix/client/v3/rooms/!r:l/typing/@a:l/x"),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        refused(Method::POST, "/_matrix/client/v3//login"),
        StatusCode::NOT_FOUND
    );
}

#[test]
fn writes_nobody_decides_are_refused() {
    for (method, path, status) in [
        (
            Method::POST,
            "/_matrix/client/v3/rooms/!r:l/upgrade",
            StatusCode::FORBIDDEN,
        ),
        (
            Method::PUT,
            "/_matrix/client/v3/rooms/!r:l/something_new/x",
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/_matrix/client/v3/org.example.new/endpoint",
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/_matrix/client/v3/rooms/!r:l/state/m.room.topic",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::PATCH,
            "/_matrix/client/v3/rooms/!r:l/send/m.room.message/t",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::POST,
            "/_synapse/admin/v1/join/!r:l",
            StatusCode::FORBIDDEN,
        ),
    ] {
        assert_eq!(refused(method.clone(), path), status, "{method} {path}");
    }
}

#[test]
fn admin_and_appservice_apis_are_refused_in_any_spelling() {
    for path in [
        "/_synapse/admin/v1/join/!r:l",
        "//_synapse/admin/v2/users",
        "/%5Fsynapse/admin/v1/x",
    ] {
        assert_eq!(refused(Method::GET, path), StatusCode::FORBIDDEN, "{path}");
    }
    for path in [
        "/_matrix/app/v1/transactions/1",
        "//_matrix/app/v1/ping",
        "/%5Fmatrix/app/v1/ping",
        "/transactions/1",
        "/users/@a:l",
        "/rooms/%23a:l",
    ] {
        assert_eq!(refused(Method::PUT, path), StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(
        classify(&Method::GET, "/_synapse/client/pick_username"),
        Route::PassThrough
    );
}

#[test]
fn writes_outside_the_client_api_are_refused_but_for_event_free_pages() {
    for (method, path) in [
        (Method::PUT, "/_matrix/federation/v1/send/1"),
        (Method::GET, "/_matrix/federation/v1/make_join/!r:l/@a:l"),
        (Method::POST, "/_matrix/%66ederation/v1/user/keys/claim"),
        (Method::POST, "/_matrix/key/v2/query"),
        (Method::POST, "/_synapse/replication/x"),
        (Method::POST, "/anything"),
    ] {
        assert_eq!(
            refused(method.clone(), path),
            StatusCode::NOT_FOUND,
            "{method} {path}"
        );
    }
    assert_eq!(
        refused(Method::POST, "/_synapse/mas/set_displayname"),
        StatusCode::FORBIDDEN
    );
    for (method, path) in [
        (Method::POST, "/_synapse/client/pick_username/submit"),
        (Method::POST, "/_matrix/consent"),
        (Method::PUT, "/_matrix/media/v3/upload/l/abc"),
        (Method::GET, "/_matrix/key/v2/server"),
    ] {
        assert_eq!(
            classify(&method, path),
            Route::PassThrough,
            "{method} {path}"
        );
    }
}

#[test]
fn both_forms_of_transactional_endpoints_are_decided() {
    let membership = |action, txn_id: Option<&str>| Intercepted::Membership {
        room_id: "!r:l".into(),
        action,
        txn_id: txn_id.map(str::to_string),
    };
    let cases = [
        (
            Method::POST,
            "/_matrix/client/v3/rooms/!r:l/send/m.room.message",
            Intercepted::Send {
                room_id: "!r:l".into(),
                event_type: "m.room.message".into(),
                txn_id: None,
            },
        ),
        (
            Method::PUT,
            "/_matrix/client/v3/rooms/!r:l/state/m.room.topic",
            Intercepted::State {
                room_id: "!r:l".into(),
                event_type: "m.room.topic".into(),
                state_key: String::new(),
            },
        ),
        (
            Method::PUT,
            "/_matrix/client/v3/rooms/!r:l/state/m.room.member/@a:l",
            Intercepted::State {
                room_id: "!r:l".into(),
                event_type: "m.room.member".into(),
                state_key: "@a:l".into(),
            },
        ),
        (
            Method::PUT,
            "/_matrix/client/v3/rooms/!r:l/state/m.room.%6Dember/@a:l",
            Intercepted::State {
                room_id: "!r:l".into(),
                event_type: "m.room.member".into(),
                state_key: "@a:l".into(),
            },
        ),
        (
            Method::PUT,
            "/_matrix/client/v3/rooms/!r:l/redact/$e/t",
            Intercepted::Redact {
                room_id: "!r:l".into(),
                event_id: "$e".into(),
                txn_id: Some("t".into()),
            },
        ),
        (
            Method::POST,
            "/_matrix/client/v3/rooms/!r:l/redact/$e",
            Intercepted::Redact {
                room_id: "!r:l".into(),
                event_id: "$e".into(),
                txn_id: None,
            },
        ),
        (
            Method::POST,
            "/_matrix/client/v3/rooms/!r:l/invite",
            membership(MembershipAction::Invite, None),
        ),
        (
            Method::PUT,
            "/_matrix/client/v3/rooms/!r:l/invite/t",
            membership(MembershipAction::Invite, Some("t")),
        ),
        (
            Method::POST,
            "/_matrix/client/v3/rooms/!r:l/join",
            membership(MembershipAction::Join, None),
        ),
        (
            Method::POST,
            "/_matrix/client/v3/rooms/!r:l/ban",
            membership(MembershipAction::Ban, None),
        ),
        (
            Method::PUT,
            "/_matrix/client/v3/rooms/!r:l/kick/t",
            membership(MembershipAction::Kick, Some("t")),
        ),
        (
            Method::POST,
            "/_matrix/client/v3/rooms/!r:l/unban",
            membership(MembershipAction::Unban, None),
        ),
        (
            Method::POST,
            "/_matrix/client/v3/rooms/!r:l/leave",
            membership(MembershipAction::Leave, None),
        ),
        (
            Method::POST,
            "/_matrix/client/v3/join/%23a:l",
            Intercepted::Join {
                room: "#a:l".into(),
                txn_id: None,
            },
        ),
        (
            Method::PUT,
            "/_matrix/client/v3/join/%23a:l/t",
            Intercepted::Join {
                room: "#a:l".into(),
                txn_id: Some("t".into()),
            },
        ),
        (
            Method::POST,
            "/_matrix/client/v3/knock/!r:l",
            Intercepted::Knock {
                room: "!r:l".into(),
            },
        ),
        (
            Method::POST,
            "/_matrix/client/r0/createRoom/",
            Intercepted::CreateRoom { txn_id: None },
        ),
        (
            Method::PUT,
            "/_matrix/client/v3/createRoom/t9",
            Intercepted::CreateRoom {
                txn_id: Some("t9".into()),
            },
        ),
        (
            Method::PUT,
            "/_matrix/client/v3/sendToDevice/m.room_key_request/t",
            Intercepted::SendToDevice {
                event_type: "m.room_key_request".into(),
                txn_id: "t".into(),
            },
        ),
        (
            Method::DELETE,
            "/_matrix/client/v3/directory/room/%23a:l",
            Intercepted::DeleteAlias {
                alias: "#a:l".into(),
            },
        ),
        (
            Method::POST,
            "/_matrix/client/v3/account/deactivate",
            Intercepted::Deactivate,
        ),
    ];
    for (method, path, expected) in cases {
        assert_eq!(decided(method.clone(), path), expected, "{method} {path}");
    }
}

#[test]
fn older_releases_prefix_matches_are_decided_and_forwarded_canonically() {
    // Older Synapse releases routed these by prefix: the decision is the endpoint's, and
    // what is forwarded is exactly that endpoint.
    let knock = decided(Method::POST, "/_matrix/client/v3/knock/!r:l/anything");
    assert_eq!(
        knock,
        Intercepted::Knock {
            room: "!r:l".into()
        }
    );
    assert_eq!(knock.canonical_path(), "/_matrix/client/v3/knock/!r:l");
    let dotted = decided(
        Method::POST,
        "/_matrix/client/v3/knock/!r:l/../../createRoom",
    );
    assert_eq!(dotted.canonical_path(), "/_matrix/client/v3/knock/!r:l");
    let profile = decided(
        Method::PUT,
        "/_matrix/client/v3/profile/@a:l/displayname/anything",
    );
    assert_eq!(
        profile.canonical_path(),
        "/_matrix/client/v3/profile/@a:l/displayname"
    );
    let prefixed = decided(
        Method::PUT,
        "/_matrix/client/r0/profile/@a:l/displaynameXYZ",
    );
    assert_eq!(
        prefixed.canonical_path(),
        "/_matrix/client/v3/profile/@a:l/displayname"
    );
}

#[test]
fn profile_changes_and_removals_are_decided() {
    let set = Intercepted::Profile {
        user_id: "@a:l".into(),
        field: "displayname".into(),
        remove: false,
    };
    assert_eq!(
        decided(Method::PUT, "/_matrix/client/v3/profile/@a:l/displayname"),
        set
    );
    assert_eq!(
        set.canonical_path(),
        "/_matrix/client/v3/profile/@a:l/displayname"
    );
    assert_eq!(
        decided(Method::DELETE, "/_matrix/client/v3/profile/@a:l/avatar_url"),
        Intercepted::Profile {
            user_id: "@a:l".into(),
            field: "avatar_url".into(),
            remove: true,
        }
    );
    assert_eq!(
        classify(&Method::GET, "/_matrix/client/v3/profile/@a:l/displayname"),
        Route::PassThrough
    );
}

#[test]
fn identifiers_are_validated_with_ruma() {
    let put = |path: &str| decided(Method::PUT, &format!("/_matrix/client/v3/{path}"));
    let post = |path: &str| decided(Method::POST, &format!("/_matrix/client/v3/{path}"));
    // Room version 12 room ids have no server part; ruma 0.17 takes them.
    for ok in [
        put("rooms/!4UsW2lhkAbCdEf/send/m.room.message/t"),
        put("rooms/!r:localhost/send/m.room.message/t"),
        put("rooms/!r:l/state/m.room.member/@a:l"),
        put("rooms/!r:l/state/m.room.topic"),
        put("rooms/!r:l/redact/$e/t"),
        put("rooms/!r:l/redact/$e:l/t"),
        post("rooms/!4UsW2lhkAbCdEf/invite"),
        post("join/%23a:l"),
        post("join/!4UsW2lhkAbCdEf"),
        post("knock/!r:l"),
        put("profile/@a:l/displayname"),
        put("sendToDevice/m.room.encrypted/t"),
        post("createRoom"),
        decided(Method::DELETE, "/_matrix/client/v3/directory/room/%23a:l"),
    ] {
        assert_eq!(ok.validate(), Ok(()), "{ok:?}");
    }
    for (bad, what) in [
        (put("rooms/r:l/send/m.room.message/t"), "room id"),
        (put("rooms/%23a:l/send/m.room.message/t"), "room id"),
        (put("rooms/!r:l/send//t"), "event type"),
        (
            put("rooms/!r:l/state/m.room.member/alice"),
            "state key of m.room.member (a user id)",
        ),
        (put("rooms/!r:l/redact/e1/t"), "event id"),
        (post("rooms/@a:l/invite"), "room id"),
        (post("join/a:l"), "room id or alias"),
        (post("join/%23a"), "room id or alias"),
        (post("knock/!r%00x"), "room id or alias"),
        (put("profile/alice/displayname"), "user id"),
        (put("profile/@a/displayname"), "user id"),
        (put("sendToDevice//t"), "event type"),
        (
            decided(Method::DELETE, "/_matrix/client/v3/directory/room/a:l"),
            "room alias",
        ),
    ] {
        let err = bad.validate().expect_err("invalid");
        assert_eq!(err.what, what, "{bad:?}");
    }
}

#[test]
fn canonical_paths_re_encode_what_was_decided() {
    assert_eq!(
        send().canonical_path(),
        "/_matrix/client/v3/rooms/!r:localhost/send/m.room.message/t1"
    );
    let odd = Intercepted::Send {
        room_id: "!r/x:l".into(),
        event_type: "a b".into(),
        txn_id: Some("t?1".into()),
    };
    assert_eq!(
        odd.canonical_path(),
        "/_matrix/client/v3/rooms/!r%2Fx:l/send/a%20b/t%3F1"
    );
    let post_send = Intercepted::Send {
        room_id: "!r:l".into(),
        event_type: "m.room.message".into(),
        txn_id: None,
    };
    assert_eq!(
        post_send.canonical_path(),
        "/_matrix/client/v3/rooms/!r:l/send/m.room.message"
    );
    let alias = Intercepted::Join {
        room: "#a:l".into(),
        txn_id: None,
    };
    assert_eq!(alias.canonical_path(), "/_matrix/client/v3/join/%23a:l");
    let kick = Intercepted::Membership {
        room_id: "!r:l".into(),
        action: MembershipAction::Kick,
        txn_id: Some("t".into()),
    };
    assert_eq!(
        kick.canonical_path(),
        "/_matrix/client/v3/rooms/!r:l/kick/t"
    );
    assert_eq!(
        Intercepted::CreateRoom {
            txn_id: Some("t9".into())
        }
        .canonical_path(),
        "/_matrix/client/v3/createRoom/t9"
    );
}
