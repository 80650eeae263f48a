# Entry point of the msgnode policy bundle. The PEPs evaluate
# `data.msgnode.authz.decision` for every request:
#
#   {"allow": bool, "reasons": [string]}
#
# `allow` is true only when the policy of the request's kind allows it and no
# deny rule fired. `reasons` is the sorted list of deny reasons, plus one
# reason when no rule allowed the request. Deny overrides allow.
package msgnode.authz

# The kind policies are referenced by full path (data.msgnode.message.allow),
# not through `import` aliases: regorus 0.14 evaluates every rule of a package
# referenced through an alias, i.e. all kinds' rules for every request.

default allow := false

allow if {
	kind_allow
	count(deny) == 0
}

kind := k if {
	k := object.get(input, "kind", "")
	is_string(k)
} else := ""

# What the policy of each kind allows.
kind_allow if {
	kind == "message"
	data.msgnode.message.allow
}

kind_allow if {
	kind == "subscription"
	data.msgnode.subscription.allow
}

kind_allow if {
	kind == "matrix_event"
	data.msgnode.matrix.event_allow
}

kind_allow if {
	kind == "membership"
	data.msgnode.matrix.membership_allow
}

kind_allow if {
	kind == "claim"
	data.msgnode.claim.allow
}

# Why the request is denied: the deny rules of its kind.
deny contains r if {
	kind == "message"
	some r in data.msgnode.message.deny
}

deny contains r if {
	kind == "subscription"
	some r in data.msgnode.subscription.deny
}

deny contains r if {
	kind == "matrix_event"
	some r in data.msgnode.matrix.event_deny
}

deny contains r if {
	kind == "membership"
	some r in data.msgnode.matrix.membership_deny
}

deny contains r if {
	kind == "claim"
	some r in data.msgnode.claim.deny
}

# The reason when nothing allowed the request and no deny rule said why.
fallback_reason := sprintf("no rule allows membership '%s'", [data.msgnode.matrix.membership]) if {
	kind == "membership"
} else := sprintf("no rule allows kind '%s'", [kind])

all_reasons contains r if some r in deny

all_reasons contains fallback_reason if {
	not kind_allow
	count(deny) == 0
}

reasons := sort([r | some r in all_reasons])

decision := {"allow": allow, "reasons": reasons}
