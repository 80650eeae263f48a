# Policy for kind "claim": may the principal take `claim.address` for good?
# Nobody holds the address yet; once claimed it is the principal's forever
# (released with the runtime, never handed to another principal).
#
#   claim.kind "runtime": a runtime URL a socket names at its handshake.
#
# Allowed for runtime URLs of this node's domain, and of the domains listed in
# data.config.claims.runtime_domains (partners whose runtimes may use this
# node). Denied past the per-principal limits (msgnode.limits).
package msgnode.claim

import data.msgnode.lib

claim := object.get(input, "claim", {})

claim_kind := object.get(claim, "kind", "")

address := object.get(claim, "address", "")

# The domain the node reports (absent: the address has none, never claimable).
claim_domain := object.get(claim, "domain", "")

cfg := object.get(data.config, "claims", {})

runtime_domains := {lower(d) | some d in object.get(cfg, "runtime_domains", [])}

allow if {
	claim_kind == "runtime"
	lower(claim_domain) == lower(input.context.node)
}

allow if {
	claim_kind == "runtime"
	claim_domain != ""
	lower(claim_domain) in runtime_domains
}

deny contains sprintf("runtime URL '%s' is not of this node's domain (claims.runtime_domains lists the others allowed)", [address]) if {
	claim_kind == "runtime"
	not allow
}

deny contains sprintf("claims of kind '%s' are not allowed", [claim_kind]) if claim_kind != "runtime"

deny contains r if some r in data.msgnode.common.deny

deny contains r if some r in data.msgnode.limits.deny

deny contains sprintf("address '%s' is blocked", [address]) if {
	address != ""
	lib.blocked_address(address)
}
