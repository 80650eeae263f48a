# Unit tests for msgnode.lib (URL parsing, trust, ownership, block-lists).
package msgnode.lib_test

import data.msgnode.lib

test_scheme if {
	lib.scheme("hyperty://localhost/abc") == "hyperty"
	lib.scheme("HYPERTY-Runtime://localhost/abc") == "hyperty-runtime"
	lib.scheme("mn:/session") == "mn"
	not lib.scheme("no-scheme")
}

test_domain if {
	lib.domain("hyperty://localhost/abc") == "localhost"
	lib.domain("comm://Partner.Example:8443/abc/changes") == "partner.example"
	lib.domain("domain://registry.localhost") == "registry.localhost"
	lib.domain("user://idp.example/alice") == "idp.example"
	not lib.domain("mn:/session")
	not lib.domain("hyperty:///abc")
}

test_base_address if {
	lib.base_address("comm://localhost/abc/changes") == "comm://localhost/abc"
	lib.base_address("comm://localhost/abc/children/chat") == "comm://localhost/abc"
	lib.base_address("hyperty://localhost/abc") == "hyperty://localhost/abc"
	lib.base_address("domain://registry.localhost") == "domain://registry.localhost"
}

test_matrix_server if {
	lib.matrix_server("@alice:localhost") == "localhost"
	lib.matrix_server("@bob:Partner.Example:8448") == "partner.example"
	lib.matrix_server("!room:localhost") == "localhost"
	not lib.matrix_server("alice")
}

test_trusted_domain if {
	lib.trusted_domain("localhost") with input.context.node as "localhost"
	lib.trusted_domain("msg-node.localhost") with input.context.node as "localhost"
	lib.trusted_domain("partner.example") with input.context.node as "localhost"
		with data.config.trusted_domains as ["partner.example"]
	lib.trusted_domain("sub.partner.example") with input.context.node as "localhost"
		with data.config.trusted_domains as ["partner.example"]
	not lib.trusted_domain("evil.example") with input.context.node as "localhost"
		with data.config.trusted_domains as ["partner.example"]
	not lib.trusted_domain("notpartner.example") with input.context.node as "localhost"
		with data.config.trusted_domains as ["partner.example"]
	not lib.trusted_domain("a.b.localhost") with input.context.node as "localhost"
	not lib.trusted_url("mn:/session") with input.context.node as "localhost"
}

test_owns if {
	subject := {"runtime": "runtime://localhost/123", "addresses": ["hyperty://localhost/abc"]}
	lib.owns("hyperty://localhost/abc") with input.subject as subject
	lib.owns("hyperty://localhost/abc/status") with input.subject as subject
	lib.owns("runtime://localhost/123/registry/allocation") with input.subject as subject
	not lib.owns("hyperty://localhost/abcdef") with input.subject as subject
	not lib.owns("hyperty://localhost/other") with input.subject as subject
	lib.owns("hyperty://partner.example/x") with input.subject as subject
		with data.config.anti_spoofing.bindable_foreign_domains as ["partner.example"]
}

test_blocked_address if {
	blocked := {"hyperty://localhost/bad": "note"}
	lib.blocked_address("hyperty://localhost/bad") with data.config.blocked_addresses as blocked
	lib.blocked_address("hyperty://localhost/bad/status") with data.config.blocked_addresses as blocked
	not lib.blocked_address("hyperty://localhost/good") with data.config.blocked_addresses as blocked
}

test_blocked_user if {
	lib.blocked_user("@mallory:localhost") with data.config.blocked_users as {"@mallory:localhost": "x"}
	not lib.blocked_user("@alice:localhost") with data.config.blocked_users as {"@mallory:localhost": "x"}
}

test_message_to_string_or_array if {
	lib.message_to == ["hyperty://localhost/a"] with input.message as {"to": "hyperty://localhost/a"}
	lib.message_to == ["hyperty://localhost/a", "hyperty://localhost/b"] with input.message as {"to": ["hyperty://localhost/a", "hyperty://localhost/b"]}
	lib.message_to == [] with input.message as {}
}

# The shipped configuration keeps its comparison keys lowercase, as the
# policies compare lowercased values against them.
test_config_lowercase if {
	every t in data.config.message.allowed_types {
		t == lower(t)
	}
	every s in data.config.message.allowed_schemes {
		s == lower(s)
	}
	every d in data.config.trusted_domains {
		d == lower(d)
	}
	every d in data.config.anti_spoofing.bindable_foreign_domains {
		d == lower(d)
	}
	every s in data.config.allocation.schemes {
		s == lower(s)
	}
}

# Every reTHINK message type, and the PING/PONG clients send, may pass.
test_config_allowed_types_cover_rethink if {
	rethink := {"create", "read", "update", "delete", "subscribe", "unsubscribe", "response", "forward", "execute", "ping", "pong"}
	every t in rethink {
		t in data.config.message.allowed_types
	}
}

test_config_blocklist_is_large if {
	count(data.config.blocked_addresses) >= 1000
}

# Every scheme the node allocates addresses in can also be used in messages.
test_allocated_schemes_are_message_schemes if {
	every s in data.config.allocation.schemes {
		s in data.config.message.allowed_schemes
	}
}
