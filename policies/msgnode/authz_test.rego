# Unit tests for the entry point msgnode.authz: combination, fallback reason,
# decision shape.
package msgnode.authz_test

import data.msgnode.authz

ctx := {"node": "localhost", "time": "2026-11-25T09:00:00Z"}

test_default_deny_unknown_kind if {
	authz.decision == {"allow": false, "reasons": ["no rule allows kind 'teleport'"]} with input as {"kind": "teleport", "context": ctx}
}

test_default_deny_missing_kind if {
	authz.decision == {"allow": false, "reasons": ["no rule allows kind ''"]} with input as {"context": ctx}
}

test_default_deny_empty_input if {
	not authz.allow with input as {}
}

test_membership_fallback_reason if {
	d := authz.decision with input as {"kind": "membership", "matrix": {"room_id": "!r:localhost", "sender": "@alice:localhost", "membership": "shrug"}, "context": ctx}
	d == {"allow": false, "reasons": ["no rule allows membership 'shrug'"]}
}

test_deny_overrides_allow if {
	# The type is allowed, but the sender is spoofed.
	d := authz.decision with input as {
		"kind": "message",
		"message": {"id": 1, "type": "create", "from": "hyperty://localhost/bob", "to": "hyperty://localhost/carol"},
		"subject": {"user": "@alice:localhost", "runtime": "runtime://localhost/1", "addresses": ["hyperty://localhost/alice"], "authenticated": true},
		"context": ctx,
	}
	authz.kind_allow with input as {
		"kind": "message",
		"message": {"id": 1, "type": "create", "from": "hyperty://localhost/bob", "to": "hyperty://localhost/carol"},
		"subject": {"authenticated": true},
		"context": ctx,
	}
	d.allow == false
	count(d.reasons) == 1
}

test_reasons_sorted if {
	d := authz.decision with input as {
		"kind": "message",
		"message": {"id": 1, "type": "teleport", "from": "hyperty://evil.example/x", "to": "hyperty://localhost/carol"},
		"subject": {"authenticated": false},
		"context": ctx,
	}
	count(d.reasons) >= 3
	d.reasons == sort(d.reasons)
}
