# Policy for kind "message": a reTHINK message a connected runtime sends
# through the node (hyperty to hyperty, to a node component, to the registry).
#
# allow: the message type is allowed (data.config.message.allowed_types).
# deny:  everything else in this file, plus msgnode.common (authentication,
#        blocked users, identity provider trust).
package msgnode.message

import data.msgnode.lib

# The message fields, normalised by msgnode.lib (see there). Rules of other
# packages are always referenced by full path, functions through the `lib`
# import: see "Performance" in policies/README.md.
raw_type := data.msgnode.lib.message_type

msg_type := lower(raw_type)

sender := data.msgnode.lib.message_from

destinations := data.msgnode.lib.message_to

subject := data.msgnode.common.subject

# What is wrong with the message's shape (fields of the wrong type).
deny contains r if some r in data.msgnode.lib.malformed_message

# The message type (compared lowercased) is one of the allowed types.
allow if msg_type in data.config.message.allowed_types

deny contains sprintf("message type '%s' is not allowed", [raw_type]) if {
	not msg_type in data.config.message.allowed_types
}

deny contains r if some r in data.msgnode.common.deny

# Structural checks (the schema already enforces these; the policy fails
# closed on its own too).
deny contains "message has no 'from'" if sender == ""

deny contains "message has no 'to'" if count(destinations) == 0

# Anti-spoofing: `from` must be an address bound to this connection, or a
# sub-resource of one.
deny contains sprintf("sender '%s' is not an address of this connection (spoofed 'from')", [sender]) if {
	sender != ""
	not lib.owns(sender)
}

# Only an object's holder publishes to its changes and registration topics
# (targets: what the node knows of each `to`).
deny contains sprintf("only the holder of '%s' publishes to '%s'", [lib.base_address(address), address]) if {
	some t in lib.arr(object.get(input, "targets", []))
	target := lib.obj(t)
	object.get(target, "topic", "") in {"changes", "registration"}
	object.get(target, "held_by_sender", false) != true
	address := lib.str(object.get(target, "address", ""))
}

deny contains "input 'targets' is not an array of objects" if {
	targets := object.get(input, "targets", [])
	not all_objects(targets)
}

all_objects(xs) if {
	is_array(xs)
	every x in xs {
		is_object(x)
	}
}

deny contains r if some r in data.msgnode.limits.deny

# Sender and every destination must be in trusted domains.
deny contains sprintf("sender '%s' is not in a trusted domain", [sender]) if {
	sender != ""
	not sender in trusted_addresses
}

deny contains sprintf("destination '%s' is not in a trusted domain", [to]) if {
	some to in destinations
	not to in trusted_addresses
}

# The addresses with a domain, and a trusted one (an address without a domain
# is never trusted).
trusted_addresses contains url if {
	some url, d in domain_of
	lib.trusted_domain(d)
}

# Sender and destination schemes must be allowed, when
# data.config.message.allowed_schemes is set (an address without a scheme has
# none of them).
deny contains sprintf("scheme of '%s' is not allowed", [url]) if {
	data.config.message.allowed_schemes
	some url in addresses
	not url in allowed_scheme_addresses
}

allowed_scheme_addresses contains url if {
	some url in addresses
	lib.scheme(url) in data.config.message.allowed_schemes
}

addresses contains sender if sender != ""

addresses contains to if some to in destinations

# The domain of each address, parsed once per decision (no entry: the URL has
# no domain).
domain_of := {url: d | some url in addresses; d := lib.domain(url)}

address_domains := {d | some d in domain_of}

# Blocked addresses (or the allocated address they belong to), as sender or
# destination.
deny contains sprintf("address '%s' is blocked", [url]) if {
	some url in addresses
	lib.blocked_address(url)
}

# Group restriction: a destination listed in
# data.config.group_restricted_destinations accepts messages only from members
# (subject.user or subject.identity) of one of its groups.
deny contains sprintf("destination '%s' only accepts senders in group(s) %s", [to, concat(", ", groups)]) if {
	some to in destinations
	groups := restricted_groups(to)
	not sender_in_any(groups)
}

# The groups for the exact destination, else for the address it belongs to.
restricted_groups(to) := groups if {
	restricted := object.get(data.config, "group_restricted_destinations", {})
	groups := object.get(restricted, to, object.get(restricted, lib.base_address(to), null))
	groups != null
}

sender_in_any(groups) if {
	some g in groups
	subject.user in object.get(data.config.groups, g, [])
}

sender_in_any(groups) if {
	some g in groups
	data.msgnode.common.identity in object.get(data.config.groups, g, [])
}

# Time windows (data.config.time_windows): windows are indexed by what they
# restrict, `by_type` (lowercase message type) and `by_domain` (sender or
# destination domain), so finding the applicable ones is two lookups. Every
# applicable window must contain the decision time (weekday, HH:MM range, date
# range; all UTC from input.context.time). No window applies: no restriction.
deny contains sprintf("message type '%s' is outside time window '%s'", [raw_type, w.name]) if {
	some w in applicable_windows
	not inside_window(w)
}

# A time window cannot be checked without the decision's time.
deny contains sprintf("context 'time' %s is not an RFC 3339 time", [lib.shown(t)]) if {
	count(applicable_windows) > 0
	t := object.get(data.msgnode.lib.context, "time", null)
	not decision_ns
}

# The decision's time in ns; undefined when context.time is not RFC 3339
# (checked first: parsing a malformed time is an error on some engines and
# undefined on others).
decision_ns := time.parse_rfc3339_ns(t) if {
	t := lib.str(object.get(data.msgnode.lib.context, "time", ""))
	regex.match(`^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$`, t)
}

applicable_windows contains w if some w in data.config.time_windows.by_type[msg_type]

applicable_windows contains w if {
	some d in address_domains
	some w in data.config.time_windows.by_domain[d]
}

inside_window(w) if {
	ns := decision_ns
	weekday_ok(w, ns)
	hours_ok(w, ns)
	dates_ok(w, ns)
}

weekday_ok(w, _) if not w.weekdays

weekday_ok(w, ns) if time.weekday(ns) in w.weekdays

hours_ok(w, _) if not w.start

hours_ok(w, ns) if {
	[h, m, _] := time.clock(ns)
	minutes := (h * 60) + m
	minutes >= hhmm(w.start)
	minutes < hhmm(w.end)
}

dates_ok(w, ns) if {
	not_before_ok(w, ns)
	not_after_ok(w, ns)
}

not_before_ok(w, _) if not w.not_before

not_before_ok(w, ns) if ns >= time.parse_rfc3339_ns(w.not_before)

not_after_ok(w, _) if not w.not_after

not_after_ok(w, ns) if ns < time.parse_rfc3339_ns(w.not_after)

# hhmm("08:30") == 510 (minutes after midnight); "24:00" == 1440.
hhmm(s) := (int2(parts[0]) * 60) + int2(parts[1]) if parts := split(s, ":")

# int2("08") == 8. regorus' to_number parses strings as JSON numbers and
# rejects leading zeros ("08" is an error there, 8 in OPA), so strip them.
int2(s) := 0 if trim_left(s, "0") == ""

int2(s) := to_number(t) if {
	t := trim_left(s, "0")
	t != ""
}

# Address allocation (data.config.allocation). For a `create` (allocate) or
# `delete` (release) sent to one of this node's allocation components, the PEP
# adds `input.allocation` = {action, scheme, number, held}: what the request
# asks for, as the bus understood it, and how many addresses the runtime holds
# already. Nothing here walks a list: `held` is a count.
#
# A release is only checked for its shape: refusing one for quota, size or
# scheme would keep addresses bound that the runtime wants to give back.

# The allocation components: the current one and the legacy pair.
allocation_addresses := {concat("", ["domain://msg-node.", data.msgnode.lib.node, "/", c]) |
	some c in ["address-allocation", "hyperty-address-allocation", "object-address-allocation"]
}

# The destinations that make this message an allocation request.
allocation_destinations contains to if {
	msg_type in {"create", "delete"}
	some to in destinations
	trim_right(lower(to), "/") in allocation_addresses
}

# The allocation the PEP described (undefined when it described none).
alloc := input.allocation if is_object(input.allocation)

# Fail closed: an allocation request without its description would bypass
# every quota.
deny contains sprintf("allocation request to '%s' has no 'allocation' input", [to]) if {
	some to in allocation_destinations
	not alloc
}

deny contains sprintf("allocation action %s is not 'create' or 'delete'", [quoted(action)]) if {
	action := object.get(alloc, "action", null)
	not action in {"create", "delete"}
}

deny contains sprintf("allocation action '%s' does not match message type '%s'", [alloc.action, raw_type]) if {
	alloc.action in {"create", "delete"}
	alloc.action != msg_type
}

deny contains sprintf("allocation number must be an integer of at least 1, got %s", [lib.shown(n)]) if {
	n := object.get(alloc, "number", null)
	not positive_integer(n)
}

deny contains sprintf("allocation of %v addresses in one request is over the limit of %v per request", [alloc.number, max]) if {
	alloc.action == "create"
	max := data.config.allocation.max_per_request
	is_number(alloc.number)
	alloc.number > max
}

deny contains sprintf("allocation 'held' must be an integer of at least 0, got %s", [lib.shown(held)]) if {
	alloc.action == "create"
	held := object.get(alloc, "held", null)
	not count_value(held)
}

deny contains sprintf("allocation of %v addresses would make the runtime hold %v, over the limit of %v per runtime (it holds %v)", [n, alloc.held + n, max, alloc.held]) if {
	alloc.action == "create"
	max := data.config.allocation.max_addresses_per_runtime
	n := alloc.number
	is_number(n)
	count_value(alloc.held)
	alloc.held + n > max
}

deny contains "allocation has no 'scheme'" if {
	alloc.action == "create"
	not is_string(object.get(alloc, "scheme", null))
}

deny contains sprintf("allocation scheme '%s' is not allowed (allowed: %s)", [alloc.scheme, concat(", ", schemes)]) if {
	alloc.action == "create"
	schemes := data.config.allocation.schemes
	is_string(alloc.scheme)
	not lower(alloc.scheme) in schemes
}

# quoted("grab") == "'grab'"; anything but a string as JSON.
quoted(x) := concat("", ["'", x, "'"]) if {
	is_string(x)
} else := json.marshal(x)

positive_integer(n) if {
	is_number(n)
	n >= 1
	floor(n) == n
}

count_value(n) if {
	is_number(n)
	n >= 0
	floor(n) == n
}
