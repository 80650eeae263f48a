# Unit tests for kinds "matrix_event" and "membership" (msgnode.matrix).
package msgnode.matrix_test

import data.msgnode.authz

event := {
	"kind": "matrix_event",
	"matrix": {
		"room_id": "!chat:localhost",
		"event_type": "m.room.message",
		"sender": "@alice:localhost",
		"content": {"msgtype": "m.text", "body": "hello"},
	},
	"context": {"node": "localhost", "time": "2026-11-25T09:00:00Z"},
}

invite := {
	"kind": "membership",
	"matrix": {
		"room_id": "!chat:localhost",
		"event_type": "m.room.member",
		"sender": "@alice:localhost",
		"state_key": "@bob:partner.example",
		"membership": "invite",
		"target": "@bob:partner.example",
		"content": {"membership": "invite"},
		"room_members": ["@alice:localhost", "@carol:localhost"],
	},
	"context": {"node": "localhost", "time": "2026-11-25T09:00:00Z"},
}

join := {
	"kind": "membership",
	"matrix": {
		"room_id": "!chat:localhost",
		"event_type": "m.room.member",
		"sender": "@bob:partner.example",
		"state_key": "@bob:partner.example",
		"membership": "join",
		"content": {"membership": "join"},
	},
	"context": {"node": "localhost", "time": "2026-11-25T09:00:00Z"},
}

trusted := ["partner.example"]

has_reason(d, s) if {
	some r in d.reasons
	contains(r, s)
}

test_default_event_type_allowed if {
	authz.decision == {"allow": true, "reasons": []} with input as event
		with data.config.matrix.event_types as {"default": ["m.room.message"], "rooms": {}}
}

test_event_type_not_allowed if {
	d := authz.decision with input as event with input.matrix.event_type as "com.example.game"
		with data.config.matrix.event_types as {"default": ["m.room.message"], "rooms": {}}
	has_reason(d, "event type 'com.example.game' is not allowed in room '!chat:localhost'")
}

test_room_override_replaces_default if {
	types := {"default": ["m.room.message"], "rooms": {"!chat:localhost": ["org.rethink.message"]}}
	authz.allow with input as event with input.matrix.event_type as "org.rethink.message"
		with data.config.matrix.event_types as types
	not authz.allow with input as event with data.config.matrix.event_types as types
}

test_blocked_sender_event_denied if {
	d := authz.decision with input as event with data.config.blocked_users as {"@alice:localhost": "x"}
	has_reason(d, "user '@alice:localhost' is blocked")
}

test_invite_allowed if {
	authz.allow with input as invite with data.config.trusted_domains as trusted
}

test_invite_from_non_member_denied if {
	d := authz.decision with input as invite with input.matrix.room_members as ["@carol:localhost"]
		with data.config.trusted_domains as trusted
	has_reason(d, "inviter '@alice:localhost' is not a member of room '!chat:localhost'")
}

test_invite_without_members_denied if {
	d := authz.decision with input as invite with input.matrix as object.remove(invite.matrix, ["room_members"])
		with data.config.trusted_domains as trusted
	has_reason(d, "is not a member of room")
}

test_invite_untrusted_inviter_denied if {
	d := authz.decision with input as invite with input.matrix.sender as "@eve:rogue.example"
		with input.matrix.room_members as ["@eve:rogue.example"]
		with data.config.trusted_domains as trusted
	has_reason(d, "inviter domain of '@eve:rogue.example' is not trusted")
}

test_invite_untrusted_invitee_denied if {
	d := authz.decision with input as invite with data.config.trusted_domains as []
	has_reason(d, "invitee domain of '@bob:partner.example' is not trusted")
}

test_invite_without_target_denied if {
	d := authz.decision with input as invite with input.matrix as object.remove(invite.matrix, ["target"])
		with data.config.trusted_domains as trusted
	has_reason(d, "invite has no target")
}

test_invite_blocked_invitee_denied if {
	d := authz.decision with input as invite with data.config.trusted_domains as trusted
		with data.config.blocked_users as {"@bob:partner.example": "x"}
	has_reason(d, "user '@bob:partner.example' is blocked")
}

test_join_trusted_allowed if {
	authz.allow with input as join with data.config.trusted_domains as trusted
}

test_knock_trusted_allowed if {
	authz.allow with input as join with input.matrix.membership as "knock"
		with data.config.trusted_domains as trusted
}

test_join_untrusted_denied if {
	d := authz.decision with input as join with data.config.trusted_domains as []
	has_reason(d, "user domain of '@bob:partner.example' is not trusted")
}

test_join_blocked_denied if {
	d := authz.decision with input as join with data.config.trusted_domains as trusted
		with data.config.blocked_users as {"@bob:partner.example": "x"}
	has_reason(d, "user '@bob:partner.example' is blocked")
}

test_leave_always_allowed if {
	authz.allow with input as join with input.matrix.membership as "leave"
		with data.config.trusted_domains as []
		with data.config.blocked_users as {"@bob:partner.example": "x"}
}

test_self_leave_with_target_allowed if {
	authz.allow with input as join with input.matrix.membership as "leave"
		with input.matrix.target as "@bob:partner.example"
		with data.config.blocked_users as {"@bob:partner.example": "x"}
}

test_kick_by_member_allowed if {
	authz.allow with input as invite with input.matrix.membership as "leave"
		with data.config.trusted_domains as trusted
}

test_kick_by_blocked_member_denied if {
	d := authz.decision with input as invite with input.matrix.membership as "leave"
		with data.config.trusted_domains as trusted
		with data.config.blocked_users as {"@alice:localhost": "x"}
	has_reason(d, "user '@alice:localhost' is blocked")
}

test_kick_by_non_member_denied if {
	d := authz.decision with input as invite with input.matrix.membership as "leave"
		with input.matrix.room_members as ["@carol:localhost"]
		with data.config.trusted_domains as trusted
	has_reason(d, "user '@alice:localhost' may not remove '@bob:partner.example': not a member of room '!chat:localhost' of a trusted domain")
}

test_ban_by_member_allowed if {
	authz.allow with input as invite with input.matrix.membership as "ban"
		with data.config.trusted_domains as trusted
}

test_ban_by_non_member_denied if {
	d := authz.decision with input as invite with input.matrix.membership as "ban"
		with input.matrix.room_members as []
		with data.config.trusted_domains as trusted
	has_reason(d, "banning user '@alice:localhost' is not a member of room '!chat:localhost' of a trusted domain")
}
