# Policy for kind "subscription": may `subscription.subscriber` subscribe to
# the data object `subscription.resource` (e.g. comm://localhost/abc/changes)?
# The bus asks once per resource of a `subscribe` message.
#
# An object listed in data.config.subscription.consent accepts only the
# subscribers its owner consented to. Any other object may be subscribed to
# when it lives in this node's domain, in a domain of
# data.config.subscription.trusted_domains, or is in
# data.config.subscription.allow_list.
package msgnode.subscription

import data.msgnode.lib

sub := lib.obj(object.get(input, "subscription", {}))

# The subscribe message's sender and destinations (msgnode.lib normalises
# them). Rules of other packages are always referenced by full path: see
# "Performance" in policies/README.md.
sender := data.msgnode.lib.message_from

destinations := data.msgnode.lib.message_to

resource := lib.str(object.get(sub, "resource", ""))

subscriber := lib.str(object.get(sub, "subscriber", ""))

# The object the resource belongs to: "comm://localhost/abc/changes" -> "comm://localhost/abc".
object_url := lib.base_address(resource)

cfg := object.get(data.config, "subscription", {})

consents := object.get(cfg, "consent", {})

# The consent entry for the exact resource, else for its object (null: none).
consent_list := object.get(consents, resource, object.get(consents, object_url, null))

has_consent_entry := consent_list != null

# Consent: the owner listed the subscriber address, or the subject's user or identity.
consented if subscriber in consent_list

consented if data.msgnode.lib.subject.user in consent_list

consented if data.msgnode.common.identity in consent_list

# The holder's own principal (another runtime of the same user or network
# server) consents by holding the object.
consented if {
	holder := object.get(sub, "holder", "")
	holder != ""
	holder in subject_principals
}

subject_principals contains input.subject.user if input.subject.user

subject_principals contains concat("", ["network-server:", input.subject.network_server]) if is_string(input.subject.network_server)

allow if consented

# Objects without a consent entry: the node's own domain ...
allow if {
	not has_consent_entry
	lib.domain(resource) == data.msgnode.lib.node
}

# ... or a domain trusted for subscriptions ...
allow if {
	not has_consent_entry
	lib.domain(resource) in object.get(cfg, "trusted_domains", [])
}

# ... or an allow-listed object (or exact resource).
allow if {
	not has_consent_entry
	cfg.allow_list[object_url]
}

allow if {
	not has_consent_entry
	cfg.allow_list[resource]
}

deny contains sprintf("subscription to '%s' requires the owner's consent for '%s'", [object_url, subscriber]) if {
	has_consent_entry
	not consented
}

deny contains sprintf("subscription to '%s' is not allowed for '%s'", [object_url, subscriber]) if {
	not has_consent_entry
	not allow
}

# What is sent to an object's children always reaches its holder (the node
# routes it there whatever is subscribed); another runtime listens in only with
# the holder's consent. The object has a holder when the node names it
# (`holder`, its principal) or when it is another domain's (held there, by
# someone the node does not know; only that domain's peer node speaks for it).
# A local object nobody holds yet may be subscribed to: its holder, once there
# is one, still receives everything sent to its children.
has_holder if object.get(sub, "holder", "") != ""

has_holder if lib.domain(object_url) != data.msgnode.lib.node

peer_of_object if input.subject.peer == lib.domain(object_url)

deny contains sprintf("the children of '%s' belong to its holder: listening in needs its consent for '%s'", [object_url, subscriber]) if {
	object.get(sub, "topic", "") == "children"
	has_holder
	object.get(sub, "held_by_subscriber", false) != true
	not peer_of_object
	not consented
}

deny contains "subscription has no 'resource'" if resource == ""

deny contains "subscription has no 'subscriber'" if subscriber == ""

deny contains r if some r in data.msgnode.lib.malformed_message

deny contains r if some r in data.msgnode.common.deny

# Past the per-principal limits (msgnode.limits): subscriptions, and return
# routes when the subscribe's `from` is not held yet.
deny contains r if some r in data.msgnode.limits.deny

# Blocked object, subscriber or message endpoints.
deny contains sprintf("address '%s' is blocked", [url]) if {
	some url in {resource, subscriber}
	url != ""
	lib.blocked_address(url)
}

deny contains sprintf("address '%s' is blocked", [url]) if {
	some url in message_addresses
	lib.blocked_address(url)
}

message_addresses contains sender if sender != ""

message_addresses contains to if some to in destinations

# Anti-spoofing on the subscribe message's `from`, when the message is given.
deny contains sprintf("sender '%s' is not an address of this connection (spoofed 'from')", [sender]) if {
	sender != ""
	not lib.owns(sender)
}
