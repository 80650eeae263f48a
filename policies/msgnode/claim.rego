# Policy for kind "claim": may the principal take `claim.address`? Nobody
# holds the address yet; once claimed it is the principal's for good
# (released with the runtime, never handed to another principal).
#
#   claim.kind "runtime": a runtime URL a socket names at its handshake.
#     Allowed for runtime URLs of this node's domain, and of the domains listed
#     in data.config.claims.runtime_domains (partners whose runtimes may use
#     this node).
#   claim.kind "runtime_address": a `from` under a runtime scheme
#     (runtime://, hyperty-runtime://) of this node's domain that nobody holds,
#     used by a connection for the first time — the reference stubs send from
#     hyperty-runtime://D/protostub/1/sm while connected as runtime://D/1.
#     Allowed while data.config.claims.runtime_addresses is true (shipped).
#   claim.kind "hyperty": a hyperty address of this node's domain used as a
#     `from` before anybody held it (runtimes that make up their hyperty
#     addresses instead of asking the node). Allowed only when
#     data.config.claims.hyperty_addresses is true (shipped: false). With it on,
#     whoever first sends from an address nobody holds takes it — also one a
#     runtime released, if its URL is known.
#   claim.kind "identity": a user:// identity a registry entry names but the
#     connection did not verify; allowed, the entry is filed (and found) under
#     that identity. Only when data.config.claims.identities is true (shipped:
#     false): anyone could then be listed under anyone's identity.
#
# Denied past the per-principal limits (msgnode.limits).
package msgnode.claim

import data.msgnode.lib

claim := lib.obj(object.get(input, "claim", {}))

claim_kind := lib.str(object.get(claim, "kind", ""))

address := lib.str(object.get(claim, "address", ""))

# The domain the node reports (absent: the address has none, never claimable).
claim_domain := lower(lib.str(object.get(claim, "domain", "")))

cfg := object.get(data.config, "claims", {})

runtime_domains := {lower(d) | some d in object.get(cfg, "runtime_domains", [])}

# The claimed domain is this node's (an empty one never is).
local if {
	claim_domain != ""
	claim_domain == lib.node
}

switched_on(name) if object.get(cfg, name, false) == true

allow if {
	claim_kind == "runtime"
	local
}

allow if {
	claim_kind == "runtime"
	claim_domain != ""
	claim_domain in runtime_domains
}

allow if {
	claim_kind == "runtime_address"
	local
	switched_on("runtime_addresses")
}

allow if {
	claim_kind == "hyperty"
	local
	switched_on("hyperty_addresses")
}

allow if {
	claim_kind == "identity"
	switched_on("identities")
}

deny contains sprintf("runtime URL '%s' is not of this node's domain (claims.runtime_domains lists the others allowed)", [address]) if {
	claim_kind == "runtime"
	not allow
}

deny contains sprintf("'%s' is not of this node's domain", [address]) if {
	claim_kind in {"runtime_address", "hyperty"}
	not local
}

deny contains sprintf("addresses nobody holds are not taken on first use here (data.config.claims.%s is off): '%s'", [switch, address]) if {
	some kind, switch in {"runtime_address": "runtime_addresses", "hyperty": "hyperty_addresses"}
	claim_kind == kind
	not switched_on(switch)
}

deny contains sprintf("identity '%s' is not verified, and unverified identities are not accepted (data.config.claims.identities is off)", [address]) if {
	claim_kind == "identity"
	not switched_on("identities")
}

deny contains sprintf("claims of kind '%s' are not allowed", [claim_kind]) if {
	not claim_kind in {"runtime", "runtime_address", "hyperty", "identity"}
}

deny contains r if some r in data.msgnode.common.deny

deny contains r if some r in data.msgnode.limits.deny

deny contains sprintf("address '%s' is blocked", [address]) if {
	address != ""
	lib.blocked_address(address)
}

deny contains sprintf("identity '%s' is blocked", [address]) if {
	claim_kind == "identity"
	lib.blocked_user(address)
}
