# Checks on the requesting subject shared by the reTHINK kinds (`message` and
# `subscription`): authentication, blocked users and identity-provider trust.
package msgnode.common

import data.msgnode.lib

subject := object.get(input, "subject", {})

# The connection must be authenticated.
deny contains "subject is not authenticated" if not subject.authenticated == true

# The Matrix user behind the connection must not be blocked.
deny contains sprintf("user '%s' is blocked", [subject.user]) if lib.blocked_user(subject.user)

# Neither may the identity (user://idp/user) asserted for it.
deny contains sprintf("identity '%s' is blocked", [subject.identity]) if lib.blocked_user(subject.identity)

# When data.config.trusted_idps is set, an asserted identity must come from one
# of those identity providers (the IdP domain is the identity URL's domain).
deny contains sprintf("identity provider of '%s' is not trusted", [subject.identity]) if {
	subject.identity
	idps := data.config.trusted_idps
	not lib.domain(subject.identity) in idps
}
