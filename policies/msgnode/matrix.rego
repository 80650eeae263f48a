# Policies for the Matrix kinds, asked by the Matrix PEP (client-server proxy
# and appservice):
#   - "matrix_event": may `matrix.sender` send an event of `matrix.event_type`
#     into `matrix.room_id`?
#   - "membership": may `matrix.sender` change `matrix.target`'s (or, without
#     a target, its own) membership to `matrix.membership`?
package msgnode.matrix

import data.msgnode.lib

mx := lib.obj(object.get(input, "matrix", {}))

sender := lib.str(object.get(mx, "sender", ""))

room_id := lib.str(object.get(mx, "room_id", ""))

event_type := lib.str(object.get(mx, "event_type", ""))

membership := lib.str(object.get(mx, "membership", ""))

target := lib.str(object.get(mx, "target", ""))

cfg := object.get(data.config, "matrix", {})

# --- kind matrix_event -------------------------------------------------------

# Event types allowed in the room: the per-room override when there is one,
# else the default list.
room_event_types := object.get(object.get(cfg.event_types, "rooms", {}), room_id, cfg.event_types.default)

event_allow if event_type in room_event_types

event_deny contains sprintf("event type '%s' is not allowed in room '%s'", [event_type, room_id]) if {
	not event_type in room_event_types
}

event_deny contains r if some r in blocked_deny

# --- kind membership ---------------------------------------------------------

members := lib.arr(object.get(mx, "room_members", []))

# trusted_id(id): the server of Matrix id `id` is trusted (an id without a
# server is not).
trusted_id(id) if lib.trusted_domain(lib.matrix_server(id))

# invite: the inviter is a member of the room and of a trusted server, and
# the invitee is of a trusted server.
membership_allow if {
	membership == "invite"
	sender in members
	trusted_id(sender)
	trusted_id(target)
}

membership_deny contains sprintf("inviter '%s' is not a member of room '%s'", [sender, room_id]) if {
	membership == "invite"
	not sender in members
}

membership_deny contains sprintf("inviter domain of '%s' is not trusted", [sender]) if {
	membership == "invite"
	not trusted_id(sender)
}

membership_deny contains "invite has no target" if {
	membership == "invite"
	target == ""
}

membership_deny contains sprintf("invitee domain of '%s' is not trusted", [target]) if {
	membership == "invite"
	target != ""
	not trusted_id(target)
}

# join (and knock, a request to join): users of trusted servers.
membership_allow if {
	membership in {"join", "knock"}
	trusted_id(sender)
}

membership_deny contains sprintf("user domain of '%s' is not trusted", [sender]) if {
	membership in {"join", "knock"}
	not trusted_id(sender)
}

# ban: a room member of a trusted server (Synapse still checks power levels).
membership_allow if {
	membership == "ban"
	ban_sender_ok
}

membership_deny contains sprintf("banning user '%s' is not a member of room '%s' of a trusted domain", [sender, room_id]) if {
	membership == "ban"
	not ban_sender_ok
}

ban_sender_ok if {
	sender in members
	trusted_id(sender)
}

# leave of one's own: always allowed, also for blocked users (nobody is kept in a room).
self_leave if {
	membership == "leave"
	target in {"", sender}
}

membership_allow if self_leave

# kick and unban (a leave of someone else): a room member of a trusted server
# (Synapse still checks power levels).
membership_allow if {
	membership == "leave"
	not self_leave
	ban_sender_ok
}

membership_deny contains sprintf("user '%s' may not remove '%s': not a member of room '%s' of a trusted domain", [sender, target, room_id]) if {
	membership == "leave"
	not self_leave
	not ban_sender_ok
}

membership_deny contains r if {
	not self_leave
	some r in blocked_deny
}

# --- shared ------------------------------------------------------------------

# Blocked sender, blocked authenticated user (when the PEP knows it) and, for
# memberships, blocked target.
blocked_deny contains sprintf("user '%s' is blocked", [sender]) if lib.blocked_user(sender)

blocked_deny contains sprintf("user '%s' is blocked", [data.msgnode.lib.subject.user]) if lib.blocked_user(data.msgnode.lib.subject.user)

blocked_deny contains sprintf("user '%s' is blocked", [target]) if {
	target != ""
	lib.blocked_user(target)
}
