# Unit tests for address allocation (msgnode.message, data.config.allocation),
# through the entry point data.msgnode.authz.
package msgnode.allocation_test

import data.msgnode.authz

limits := {"max_addresses_per_runtime": 10, "max_per_request": 4, "schemes": ["hyperty", "comm"]}

base := {
	"kind": "message",
	"message": {
		"id": 1,
		"type": "create",
		"from": "runtime://localhost/7d3f9c2a/registry/allocation",
		"to": "domain://msg-node.localhost/address-allocation",
		"body": {"scheme": "comm", "value": {"number": 2}},
	},
	"allocation": {"action": "create", "scheme": "comm", "number": 2, "held": 3},
	"subject": {
		"user": "@alice:localhost",
		"runtime": "runtime://localhost/7d3f9c2a",
		"addresses": [],
		"authenticated": true,
	},
	"context": {"node": "localhost", "time": "2026-11-25T09:00:00Z"},
}

release := object.union(object.remove(base, ["message", "allocation"]), {
	"message": object.union(object.remove(base.message, ["body"]), {"type": "delete", "body": {"childrenResources": ["comm://localhost/a"]}}),
	"allocation": {"action": "delete", "number": 1, "held": 3},
})

# base with input.allocation replaced (object.union merges objects deeply, so
# fields cannot be removed through it).
with_alloc(a) := object.union(object.remove(base, ["allocation"]), {"allocation": a})

decide(req) := d if {
	d := authz.decision with input as req with data.config.allocation as limits
}

has_reason(d, s) if {
	some r in d.reasons
	contains(r, s)
}

denied_with(req, s) if {
	d := decide(req)
	d.allow == false
	has_reason(d, s)
}

test_create_allowed_on_every_allocation_address if {
	every c in ["address-allocation", "hyperty-address-allocation", "object-address-allocation"] {
		decide(object.union(base, {"message": object.union(base.message, {"to": concat("", ["domain://msg-node.localhost/", c])})})) == {"allow": true, "reasons": []}
	}
}

test_allocation_address_case_and_trailing_slash if {
	denied_with(object.remove(object.union(base, {"message": object.union(base.message, {"type": "CREATE", "to": "domain://MSG-NODE.localhost/Address-Allocation"})}), ["allocation"]), "has no 'allocation' input")
	denied_with(object.remove(object.union(base, {"message": object.union(base.message, {"to": "domain://msg-node.localhost/address-allocation/"})}), ["allocation"]), "has no 'allocation' input")
}

test_over_quota_denied if {
	req := with_alloc(object.union(base.allocation, {"held": 9}))
	d := decide(req)
	d == {"allow": false, "reasons": ["allocation of 2 addresses would make the runtime hold 11, over the limit of 10 per runtime (it holds 9)"]}
}

test_up_to_quota_allowed if {
	decide(with_alloc(object.union(base.allocation, {"held": 8}))).allow
}

test_per_request_limit if {
	denied_with(with_alloc(object.union(base.allocation, {"number": 5, "held": 0})), "allocation of 5 addresses in one request is over the limit of 4 per request")
	decide(with_alloc(object.union(base.allocation, {"number": 4, "held": 0}))).allow
}

test_number_must_be_positive_integer if {
	denied_with(with_alloc(object.union(base.allocation, {"number": 0})), "allocation number must be an integer of at least 1, got 0")
	denied_with(with_alloc(object.union(base.allocation, {"number": -3})), "got -3")
	denied_with(with_alloc(object.union(base.allocation, {"number": 1.5})), "got 1.5")
	denied_with(with_alloc(object.union(base.allocation, {"number": "2"})), "got 2")
	denied_with(with_alloc(object.remove(base.allocation, ["number"])), "got null")
}

test_scheme_not_allowed if {
	d := decide(with_alloc(object.union(base.allocation, {"scheme": "ctxt"})))
	d == {"allow": false, "reasons": ["allocation scheme 'ctxt' is not allowed (allowed: hyperty, comm)"]}
}

test_scheme_case_insensitive if {
	decide(with_alloc(object.union(base.allocation, {"scheme": "HYPERTY"}))).allow
}

test_create_needs_scheme_and_held if {
	denied_with(with_alloc(object.remove(base.allocation, ["scheme"])), "allocation has no 'scheme'")
	denied_with(with_alloc(object.remove(base.allocation, ["held"])), "allocation 'held' must be an integer of at least 0, got null")
	denied_with(with_alloc(object.union(base.allocation, {"held": -1})), "got -1")
}

test_missing_allocation_input_denied if {
	denied_with(object.remove(base, ["allocation"]), "allocation request to 'domain://msg-node.localhost/address-allocation' has no 'allocation' input")
	denied_with(object.remove(release, ["allocation"]), "has no 'allocation' input")
	denied_with(with_alloc("five"), "has no 'allocation' input")
}

test_allocation_input_not_needed_elsewhere if {
	# Another type to the allocation component, an allocation component of
	# another domain, an ordinary create.
	decide(object.remove(object.union(base, {"message": object.union(base.message, {"type": "read"})}), ["allocation"])).allow
	decide(object.remove(object.union(base, {"message": object.union(base.message, {"to": "domain://msg-node.msgnode.test/address-allocation"})}), ["allocation"])).allow
	decide(object.remove(object.union(base, {"message": object.union(base.message, {"to": "hyperty://localhost/bob"})}), ["allocation"])).allow
}

test_action_checked if {
	denied_with(with_alloc(object.union(base.allocation, {"action": "grab"})), "allocation action 'grab' is not 'create' or 'delete'")
	denied_with(with_alloc(object.union(base.allocation, {"action": "delete"})), "allocation action 'delete' does not match message type 'create'")
}

test_release_allowed if {
	decide(release) == {"allow": true, "reasons": []}
}

test_release_not_limited if {
	# At the quota, more than one request's worth, of a scheme no longer
	# allocated: a release still passes.
	decide(object.union(object.remove(release, ["allocation"]), {"allocation": {"action": "delete", "number": 50, "held": 60, "scheme": "ctxt"}})).allow
}

test_release_needs_number if {
	denied_with(object.union(object.remove(release, ["allocation"]), {"allocation": {"action": "delete", "number": 0}}), "allocation number must be an integer of at least 1, got 0")
}

test_limits_removed_from_data if {
	authz.allow with input as with_alloc({"action": "create", "scheme": "anything", "number": 5000, "held": 1000000})
		with data.config.allocation as {}
}

test_shipped_limits if {
	data.config.allocation.max_addresses_per_runtime == 1000
	data.config.allocation.max_per_request == 100
	authz.allow with input as with_alloc({"action": "create", "scheme": "hyperty", "number": 100, "held": 900})
	d := authz.decision with input as with_alloc({"action": "create", "scheme": "hyperty", "number": 100, "held": 901})
	has_reason(d, "over the limit of 1000 per runtime")
}
