# Checks on the requesting subject shared by the reTHINK kinds (`message`,
# `subscription` and `claim`): authentication, blocked users and
# identity-provider trust.
package msgnode.common

import data.msgnode.lib

subject := data.msgnode.lib.subject

# The identity (user://idp/user) asserted for the connection ("" when none).
identity := lib.str(object.get(subject, "identity", ""))

# The connection must be authenticated.
deny contains "subject is not authenticated" if not subject.authenticated == true

# The Matrix user behind the connection must not be blocked.
deny contains sprintf("user '%s' is blocked", [subject.user]) if lib.blocked_user(subject.user)

# Neither may the identity asserted for it.
deny contains sprintf("identity '%s' is blocked", [identity]) if lib.blocked_user(identity)

# An identity that is not a string cannot be checked.
deny contains "subject 'identity' is not a string" if {
	not is_string(object.get(subject, "identity", ""))
}

# When data.config.trusted_idps is set, an asserted identity must come from one
# of those identity providers (the IdP domain is the identity URL's domain; an
# identity without one is from no trusted provider).
deny contains sprintf("identity provider of '%s' is not trusted", [identity]) if {
	identity != ""
	data.config.trusted_idps
	not trusted_idp
}

trusted_idp if lib.domain(identity) in data.config.trusted_idps
