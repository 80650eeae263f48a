# Per-principal limits (data.config.limits.per_principal): what one principal
# (a Matrix user, a network server, a peer node) may hold over all its
# runtimes. The node adds `subject.principal` = {runtimes, addresses,
# foreign_routes, registry_entries?, subscriptions?} to the decisions that can
# add to it: claims (a new runtime, or an address taken on first use: claimed
# addresses count as addresses), allocations, registry writes, messages whose
# `from` is not bound yet (a foreign return route to be) and the subscription
# decisions of a subscribe (a subscription; its `from` may become a return
# route too). Keys absent from the data: no limit. The node has higher hard
# limits of its own ([bus.limits]).
package msgnode.limits

import data.msgnode.lib

limits := object.get(object.get(data.config, "limits", {}), "per_principal", {})

held := lib.obj(object.get(data.msgnode.lib.subject, "principal", {}))

count_of(what) := n if {
	n := object.get(held, what, 0)
	is_number(n)
}

# A count that is not a number cannot be checked against its limit.
deny contains sprintf("subject 'principal.%s' is not a number", [what]) if {
	some what in ["runtimes", "addresses", "foreign_routes", "registry_entries", "subscriptions"]
	not is_number(object.get(held, what, 0))
}

allocation := lib.obj(object.get(input, "allocation", {}))

limited(what) := object.get(limits, what, -1)

claim_kind := lib.str(object.get(lib.obj(object.get(input, "claim", {})), "kind", ""))

# A claim of a runtime URL adds a runtime.
deny contains sprintf("this user already owns %d runtimes (the limit is %d)", [count_of("runtimes"), limited("runtimes")]) if {
	input.kind == "claim"
	claim_kind == "runtime"
	limited("runtimes") >= 0
	count_of("runtimes") >= limited("runtimes")
}

# An allocation adds `number` addresses.
deny contains sprintf("allocating %d addresses would give this user %d (the limit is %d)", [n, count_of("addresses") + n, limited("addresses")]) if {
	object.get(allocation, "action", "") == "create"
	n := object.get(allocation, "number", 0)
	is_number(n)
	limited("addresses") >= 0
	count_of("addresses") + n > limited("addresses")
}

# A claim of an address (on first use as a `from`) adds an address.
deny contains sprintf("claiming one more address would give this user %d (the limit is %d)", [count_of("addresses") + 1, limited("addresses")]) if {
	input.kind == "claim"
	claim_kind in {"runtime_address", "hyperty"}
	limited("addresses") >= 0
	count_of("addresses") + 1 > limited("addresses")
}

# A registry create adds an entry.
deny contains sprintf("this user already has %d registry entries (the limit is %d)", [count_of("registry_entries"), limited("registry_entries")]) if {
	lower(data.msgnode.lib.message_type) == "create"
	some to in data.msgnode.lib.message_to
	lower(to) == concat("", ["domain://registry.", data.msgnode.lib.node])
	limited("registry_entries") >= 0
	count_of("registry_entries") >= limited("registry_entries")
}

# A `from` the connection does not hold yet may become a return route: a
# message's (the node adds `principal` to it then) or a subscribe's.
adds_return_route if {
	input.kind == "message"
	held.foreign_routes
}

adds_return_route if {
	input.kind == "subscription"
	object.get(data.msgnode.lib.subject, "holds_from", true) == false
}

deny contains sprintf("this user already uses %d foreign return routes (the limit is %d)", [count_of("foreign_routes"), limited("foreign_routes")]) if {
	adds_return_route
	limited("foreign_routes") >= 0
	count_of("foreign_routes") >= limited("foreign_routes")
}

# A subscription adds one (`subscriptions` counts the resources of the same
# subscribe decided before this one). Re-decided on a new revision, a held
# subscription has no `principal`: limits never revoke.
deny contains sprintf("this user already holds %d subscriptions (the limit is %d)", [count_of("subscriptions"), limited("subscriptions")]) if {
	input.kind == "subscription"
	is_number(object.get(held, "subscriptions", null))
	limited("subscriptions") >= 0
	count_of("subscriptions") >= limited("subscriptions")
}
