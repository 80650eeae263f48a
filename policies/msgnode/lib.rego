# Helpers shared by every msgnode policy: URL and Matrix ID parsing, domain
# trust, address ownership and block-list lookups.
#
# Everything here is a pure function of its arguments plus `data.config` and
# `input.context.node`; nothing walks the big block-lists (they are objects
# keyed by id, looked up in O(log n)).
#
# Undefined and ill-typed input is made explicit here, once: every input field
# the policies read goes through obj/str/arr (an absent or ill-typed field is
# {}, "" or []), so no builtin sees an argument of the wrong type and no
# negated call gets an undefined argument. The engines differ there: OPA
# reads `not f(x)` with x undefined as undefined (the rule does not fire),
# regorus as true; a builtin given the wrong type is an error on OPA and on
# regorus's interpreter, but undefined on its VM. A policy that depends on
# either reading decides differently on each engine, and fails open on one.
package msgnode.lib

# obj(x) is x when it is an object, else {}.
obj(x) := x if {
	is_object(x)
} else := {}

# str(x) is x when it is a string, else "".
str(x) := x if {
	is_string(x)
} else := ""

# arr(x) is x when it is an array, else [].
arr(x) := x if {
	is_array(x)
} else := []

# The request's context and the node's domain (lowercased; "" when absent).
context := obj(object.get(input, "context", {}))

node := lower(str(object.get(context, "node", "")))

# The requesting subject ({} when absent).
subject := obj(object.get(input, "subject", {}))

# scheme("hyperty://localhost/abc") == "hyperty" (lowercased, text before the first ":").
scheme(url) := lower(substring(url, 0, i)) if {
	i := indexof(url, ":")
	i > 0
}

# domain("hyperty://Localhost:8443/abc/changes") == "localhost": the host of
# a "scheme://host/..." URL, lowercased, without port. Undefined for URLs
# without an authority ("mn:/session"): never negate a call with it as an
# argument (see the top of this file); test a rule or function that holds
# for the URL instead (`trusted_url`). (Kept to three builtins: it runs for
# every address of a request.)
domain(url) := host if {
	parts := split(url, "/")
	parts[1] == ""
	host := lower(split(parts[2], ":")[0])
	host != ""
}

# base_address("comm://localhost/abc/changes") == "comm://localhost/abc": the
# address an object or hyperty was allocated as (scheme, authority and first
# path segment). A URL with no path is its own base.
base_address(url) := concat("/", array.slice(split(url, "/"), 0, 4))

# matrix_server("@alice:localhost:8448") == "localhost": the server name after
# the first ":" of a Matrix user or room ID, lowercased, without port.
matrix_server(id) := lower(split(substring(id, i + 1, -1), ":")[0]) if {
	i := indexof(id, ":")
	i > 0
}

# Trusted domains: this node's own domain (input.context.node) and
# data.config.trusted_domains, as a set computed once per decision.
trusted_domains contains node if node != ""

trusted_domains contains d if some d in data.config.trusted_domains

# A domain is trusted when it is in trusted_domains or a direct subdomain (one
# more label) of one: "msg-node.localhost" and "registry.localhost" are
# trusted when "localhost" is; "a.b.localhost" is not.
trusted_domain(d) if d in trusted_domains

trusted_domain(d) if substring(d, indexof(d, ".") + 1, -1) in trusted_domains

# trusted_url(url) holds when url has a domain and that domain is trusted.
trusted_url(url) if trusted_domain(domain(url))

# Whether the requesting connection holds `url`. The node says so for the
# message's `from` in one flag, subject.holds_from (O(1) however many addresses
# the runtime holds); inputs of older clients may list subject.addresses
# instead, still read here. The runtime URL is always the connection's own.
owned_addresses contains a if {
	some a in arr(object.get(subject, "addresses", []))
	is_string(a)
}

owned_addresses contains runtime if {
	runtime := str(object.get(subject, "runtime", ""))
	runtime != ""
}

# owns(url) holds when url is the message's `from` and the node says the
# connection holds it, when url is an owned address or a sub-resource of one
# ("<runtime>/registry/allocation", "<object>/changes"), or when it belongs to a
# domain listed in data.config.anti_spoofing.bindable_foreign_domains.
owns(url) if {
	url == message_from
	object.get(subject, "holds_from", false) == true
}

owns(url) if url in owned_addresses

owns(url) if {
	some a in owned_addresses
	startswith(url, concat("", [a, "/"]))
}

owns(url) if domain(url) in object.get(data.config, ["anti_spoofing", "bindable_foreign_domains"], [])

# blocked_address(url) holds when url, or the address it is a sub-resource of,
# is a key of data.config.blocked_addresses.
blocked_address(url) if data.config.blocked_addresses[url]

blocked_address(url) if data.config.blocked_addresses[base_address(url)]

# blocked_user(u) holds when u (a Matrix user ID or a user:// identity URL) is a
# key of data.config.blocked_users.
blocked_user(u) if data.config.blocked_users[u]

# Normalised reTHINK message fields, defined (possibly empty) even when the
# input is malformed so that deny rules still fire and name what is missing.
message := obj(object.get(input, "message", {}))

message_type := str(object.get(message, "type", ""))

message_from := str(object.get(message, "from", ""))

# The destinations as an array: `to` may be one URL or an array of URLs
# (entries that are not strings are left out, and `malformed_message` says so).
raw_to := object.get(message, "to", [])

message_to := [raw_to] if is_string(raw_to)

message_to := [t | some t in raw_to; is_string(t)] if is_array(raw_to)

default message_to := []

# What is wrong with the shape of the message (its fields of the wrong type).
malformed_message contains sprintf("message '%s' is not a string", [f]) if {
	some f in ["type", "from"]
	not is_string(object.get(message, f, ""))
}

malformed_message contains "message 'to' is not an address or an array of addresses" if {
	not is_string(raw_to)
	not is_array(raw_to)
}

malformed_message contains "message 'to' holds an entry that is not an address" if {
	some t in arr(raw_to)
	not is_string(t)
}

# shown(x): x as a reason shows it (a string as it is, anything else as JSON):
# sprintf's %v writes non-strings differently on each engine.
shown(x) := x if {
	is_string(x)
} else := json.marshal(x)
