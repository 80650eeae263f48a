# Helpers shared by every msgnode policy: URL and Matrix ID parsing, domain
# trust, address ownership and block-list lookups.
#
# Everything here is a pure function of its arguments plus `data.config` and
# `input.context.node`; nothing walks the big block-lists (they are objects
# keyed by id, looked up in O(log n)).
package msgnode.lib

# scheme("hyperty://localhost/abc") == "hyperty" (lowercased, text before the first ":").
scheme(url) := lower(substring(url, 0, i)) if {
	i := indexof(url, ":")
	i > 0
}

# domain("hyperty://Localhost:8443/abc/changes") == "localhost": the host of
# a "scheme://host/..." URL, lowercased, without port. Undefined for URLs
# without an authority ("mn:/session") — callers treat undefined as "not
# trusted". (Kept to three builtins: it runs for every address of a request.)
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
trusted_domains contains lower(input.context.node)

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
owned_addresses contains a if some a in object.get(input, ["subject", "addresses"], [])

owned_addresses contains input.subject.runtime

# owns(url) holds when url is the message's `from` and the node says the
# connection holds it, when url is an owned address or a sub-resource of one
# ("<runtime>/registry/allocation", "<object>/changes"), or when it belongs to a
# domain listed in data.config.anti_spoofing.bindable_foreign_domains.
owns(url) if {
	url == message_from
	input.subject.holds_from == true
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
message := object.get(input, "message", {})

message_type := object.get(message, "type", "")

message_from := object.get(message, "from", "")

# The destinations as an array: `to` may be one URL or an array of URLs.
message_to := [message.to] if is_string(message.to)

message_to := message.to if is_array(message.to)

default message_to := []
