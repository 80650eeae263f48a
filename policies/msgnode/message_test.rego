# Unit tests for kind "message" (msgnode.message and msgnode.common), through
# the entry point data.msgnode.authz.
package msgnode.message_test

import data.msgnode.authz

subject := {
	"user": "@alice:localhost",
	"runtime": "runtime://localhost/7d3f9c2a",
	"addresses": ["hyperty://localhost/alice-chat"],
	"authenticated": true,
	"identity": "user://idp.example/alice",
}

base := {
	"kind": "message",
	"message": {
		"id": 1,
		"type": "create",
		"from": "hyperty://localhost/alice-chat",
		"to": "hyperty://localhost/bob-chat",
		"body": {"value": {"text": "hi"}},
	},
	"subject": subject,
	"context": {"node": "localhost", "time": "2026-11-25T09:00:00Z"},
}

has_reason(d, s) if {
	some r in d.reasons
	contains(r, s)
}

test_allowed_type_allows if {
	authz.decision == {"allow": true, "reasons": []} with input as base
}

test_type_case_insensitive if {
	authz.allow with input as base with input.message.type as "PING"
}

test_unknown_type_denied if {
	d := authz.decision with input as base with input.message.type as "teleport"
	not d.allow
	has_reason(d, "message type 'teleport' is not allowed")
}

test_allowed_types_from_data if {
	authz.allow with input as base with input.message.type as "teleport"
		with data.config.message.allowed_types as ["teleport"]
}

test_unauthenticated_denied if {
	d := authz.decision with input as base with input.subject.authenticated as false
	has_reason(d, "subject is not authenticated")
}

test_missing_authenticated_denied if {
	d := authz.decision with input as base with input.subject as {"user": "@alice:localhost", "runtime": "runtime://localhost/7d3f9c2a", "addresses": ["hyperty://localhost/alice-chat"]}
	has_reason(d, "subject is not authenticated")
}

test_spoofed_from_denied if {
	d := authz.decision with input as base with input.message.from as "hyperty://localhost/bob-chat"
	has_reason(d, "sender 'hyperty://localhost/bob-chat' is not an address of this connection")
}

test_subresource_from_allowed if {
	authz.allow with input as base with input.message.from as "runtime://localhost/7d3f9c2a/registry/allocation"
}

test_missing_from_and_to_denied if {
	d := authz.decision with input as base with input.message as {"id": 1, "type": "create"}
	has_reason(d, "message has no 'from'")
	has_reason(d, "message has no 'to'")
}

test_untrusted_destination_denied if {
	d := authz.decision with input as base with input.message.to as ["hyperty://localhost/bob", "hyperty://evil.example/x"]
	has_reason(d, "destination 'hyperty://evil.example/x' is not in a trusted domain")
	count(d.reasons) == 1
}

test_untrusted_sender_denied if {
	d := authz.decision with input as base with input.message.from as "hyperty://rogue.example/x"
		with input.subject.addresses as ["hyperty://rogue.example/x"]
	has_reason(d, "sender 'hyperty://rogue.example/x' is not in a trusted domain")
}

test_trusted_domain_from_data if {
	authz.allow with input as base with input.message.to as "hyperty://partner.example/x"
		with data.config.trusted_domains as ["partner.example"] with data.config.time_windows as {}
}

test_scheme_denied if {
	d := authz.decision with input as base with input.message.to as "http://localhost/x"
	has_reason(d, "scheme of 'http://localhost/x' is not allowed")
}

test_blocked_user_denied if {
	d := authz.decision with input as base with input.subject.user as "@mallory:localhost"
		with data.config.blocked_users as {"@mallory:localhost": "SEC-1"}
	has_reason(d, "user '@mallory:localhost' is blocked")
}

test_blocked_identity_denied if {
	d := authz.decision with input as base with data.config.blocked_users as {"user://idp.example/alice": "SEC-2"}
	has_reason(d, "identity 'user://idp.example/alice' is blocked")
}

test_untrusted_idp_denied if {
	d := authz.decision with input as base with input.subject.identity as "user://shady.example/alice"
	has_reason(d, "identity provider of 'user://shady.example/alice' is not trusted")
}

test_no_identity_no_idp_check if {
	authz.allow with input as base with input.subject as object.remove(subject, ["identity"])
}

test_blocked_destination_denied if {
	d := authz.decision with input as base with data.config.blocked_addresses as {"hyperty://localhost/bob-chat": "x"}
	has_reason(d, "address 'hyperty://localhost/bob-chat' is blocked")
}

test_blocked_sender_subresource_denied if {
	d := authz.decision with input as base
		with input.message.from as "hyperty://localhost/alice-chat/status"
		with data.config.blocked_addresses as {"hyperty://localhost/alice-chat": "x"}
	has_reason(d, "address 'hyperty://localhost/alice-chat/status' is blocked")
}

test_group_restricted_destination if {
	cfg_groups := {"family": ["@bob:localhost"]}
	restricted := {"hyperty://localhost/grandma": ["family"]}
	d := authz.decision with input as base with input.message.to as "hyperty://localhost/grandma/chat"
		with data.config.groups as cfg_groups
		with data.config.group_restricted_destinations as restricted
	has_reason(d, "destination 'hyperty://localhost/grandma/chat' only accepts senders in group(s) family")
	authz.allow with input as base with input.message.to as "hyperty://localhost/grandma"
		with input.subject.user as "@bob:localhost"
		with data.config.groups as cfg_groups
		with data.config.group_restricted_destinations as restricted
}

test_group_by_identity if {
	authz.allow with input as base with input.message.to as "hyperty://localhost/grandma"
		with data.config.groups as {"family": ["user://idp.example/alice"]}
		with data.config.group_restricted_destinations as {"hyperty://localhost/grandma": ["family"]}
}

window := {"name": "office", "weekdays": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"], "start": "08:00", "end": "18:00"}

windows := {"by_type": {"execute": [window]}}

test_time_window_inside_allows if {
	# 2026-11-25 is a Wednesday.
	authz.allow with input as base with input.message.type as "execute"
		with data.config.time_windows as windows
}

test_time_window_weekend_denied if {
	d := authz.decision with input as base with input.message.type as "execute"
		with input.context.time as "2026-11-28T09:00:00Z"
		with data.config.time_windows as windows
	has_reason(d, "message type 'execute' is outside time window 'office'")
}

test_time_window_hours_denied if {
	d := authz.decision with input as base with input.message.type as "execute"
		with input.context.time as "2026-11-25T18:00:00Z"
		with data.config.time_windows as windows
	has_reason(d, "outside time window 'office'")
	authz.allow with input as base with input.message.type as "execute"
		with input.context.time as "2026-11-25T17:59:59Z"
		with data.config.time_windows as windows
}

test_time_window_other_type_unaffected if {
	authz.allow with input as base with input.context.time as "2026-11-28T03:00:00Z"
		with data.config.time_windows as windows
}

test_time_window_domain_and_dates if {
	w := {"name": "partner", "not_before": "2026-01-01T00:00:00Z", "not_after": "2026-11-01T00:00:00Z"}
	d := authz.decision with input as base with input.message.to as "hyperty://partner.example/x"
		with data.config.trusted_domains as ["partner.example"]
		with data.config.time_windows as {"by_domain": {"partner.example": [w]}}
	has_reason(d, "outside time window 'partner'")
	authz.allow with input as base with data.config.time_windows as {"by_domain": {"partner.example": [w]}}
}

test_no_time_windows_no_restriction if {
	authz.allow with input as base with input.message.type as "execute"
		with input.context.time as "2026-11-29T03:00:00Z"
		with data.config.time_windows as {}
}

test_hhmm if {
	data.msgnode.message.hhmm("08:30") == 510
	data.msgnode.message.hhmm("00:00") == 0
	data.msgnode.message.hhmm("24:00") == 1440
	data.msgnode.message.hhmm("19:05") == 1145
}

# Foreign addresses as return routes: a `from` of a domain listed in
# anti_spoofing.bindable_foreign_domains passes anti-spoofing before the node
# bound it; the domain must still be trusted.
test_bindable_foreign_from_allowed if {
	authz.decision == {"allow": true, "reasons": []} with input as base
		with input.message.from as "hyperty://broker.example/agent"
		with data.config.trusted_domains as ["broker.example"]
		with data.config.anti_spoofing.bindable_foreign_domains as ["broker.example"]
}

test_foreign_from_not_bindable_denied if {
	d := authz.decision with input as base
		with input.message.from as "hyperty://broker.example/agent"
		with data.config.trusted_domains as ["broker.example"]
		with data.config.anti_spoofing.bindable_foreign_domains as ["other.example"]
	d.reasons == ["sender 'hyperty://broker.example/agent' is not an address of this connection (spoofed 'from')"]
}

test_bindable_foreign_from_still_needs_trust if {
	d := authz.decision with input as base
		with input.message.from as "hyperty://broker.example/agent"
		with data.config.trusted_domains as []
		with data.config.anti_spoofing.bindable_foreign_domains as ["broker.example"]
	d.reasons == ["sender 'hyperty://broker.example/agent' is not in a trusted domain"]
}

# Routed messages of every reTHINK type are decided; a hyperty answers with a
# response (from = request.to, to = request.from).
test_hyperty_response_allowed if {
	authz.allow with input as base with input.message.type as "response"
		with input.message.body as {"code": 200, "value": {"accepted": true}}
}
