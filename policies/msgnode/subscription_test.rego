# Unit tests for kind "subscription" (msgnode.subscription).
package msgnode.subscription_test

import data.msgnode.authz

base := {
	"kind": "subscription",
	"message": {
		"id": 12,
		"type": "subscribe",
		"from": "runtime://localhost/7d3f9c2a/sm",
		"to": "domain://msg-node.localhost/sm",
		"body": {"resources": ["comm://localhost/chat-1/changes"], "source": "hyperty://localhost/alice-chat"},
	},
	"subscription": {"resource": "comm://localhost/chat-1/changes", "subscriber": "hyperty://localhost/alice-chat"},
	"subject": {
		"user": "@alice:localhost",
		"runtime": "runtime://localhost/7d3f9c2a",
		"addresses": ["hyperty://localhost/alice-chat"],
		"authenticated": true,
	},
	"context": {"node": "localhost", "time": "2026-11-25T09:00:00Z"},
}

has_reason(d, s) if {
	some r in d.reasons
	contains(r, s)
}

test_own_domain_allows if {
	authz.decision == {"allow": true, "reasons": []} with input as base
}

test_trusted_subscription_domain_allows if {
	authz.allow with input as base with input.subscription.resource as "comm://partner.example/board/changes"
		with data.config.subscription.trusted_domains as ["partner.example"]
}

test_untrusted_domain_denied if {
	d := authz.decision with input as base with input.subscription.resource as "comm://other.example/board/changes"
		with data.config.subscription.trusted_domains as []
	has_reason(d, "subscription to 'comm://other.example/board' is not allowed for 'hyperty://localhost/alice-chat'")
}

test_allow_list_allows if {
	authz.allow with input as base with input.subscription.resource as "comm://other.example/board/changes"
		with data.config.subscription.allow_list as {"comm://other.example/board": "public"}
}

test_consent_by_subscriber if {
	authz.allow with input as base with input.subscription.resource as "comm://other.example/board/changes"
		with data.config.subscription.consent as {"comm://other.example/board": ["hyperty://localhost/alice-chat"]}
}

test_consent_by_user if {
	authz.allow with input as base with input.subscription.resource as "comm://other.example/board/changes"
		with data.config.subscription.consent as {"comm://other.example/board": ["@alice:localhost"]}
}

test_consent_entry_is_exclusive if {
	d := authz.decision with input as base
		with data.config.subscription.consent as {"comm://localhost/chat-1": ["@bob:localhost"]}
	has_reason(d, "subscription to 'comm://localhost/chat-1' requires the owner's consent for 'hyperty://localhost/alice-chat'")
}

test_spoofed_from_denied if {
	d := authz.decision with input as base with input.message.from as "runtime://localhost/other/sm"
	has_reason(d, "sender 'runtime://localhost/other/sm' is not an address of this connection")
}

test_without_message_no_spoof_check if {
	authz.allow with input as object.remove(base, ["message"])
}

test_blocked_subscriber_denied if {
	d := authz.decision with input as base with data.config.blocked_addresses as {"hyperty://localhost/alice-chat": "x"}
	has_reason(d, "address 'hyperty://localhost/alice-chat' is blocked")
}

test_blocked_object_denied if {
	d := authz.decision with input as base with data.config.blocked_addresses as {"comm://localhost/chat-1": "x"}
	has_reason(d, "address 'comm://localhost/chat-1/changes' is blocked")
}

test_blocked_user_denied if {
	d := authz.decision with input as base with data.config.blocked_users as {"@alice:localhost": "x"}
	has_reason(d, "user '@alice:localhost' is blocked")
}

test_unauthenticated_denied if {
	d := authz.decision with input as base with input.subject.authenticated as false
	has_reason(d, "subject is not authenticated")
}

test_missing_subscription_denied if {
	d := authz.decision with input as object.remove(base, ["subscription"])
	has_reason(d, "subscription has no 'resource'")
	has_reason(d, "subscription has no 'subscriber'")
}
