//! Matrix policy enforcement point: the only code that talks to the homeserver.
//!
//! Built so far: the application-service registration (`registration`). Planned here (issue
//! #3): the client-server proxy that asks the PDP before forwarding sends, state events,
//! invites, joins and room creation, and the appservice that receives Synapse's transactions.

pub mod registration;
