//! What a message asks of the bus, read once from its `to` and `type` (and, for allocation,
//! its body): the one `match` that picks the component.

use super::allocation::AllocationRequest;
use super::session::SessionOp;
use crate::rethink::address::{Component, NodeAddresses};
use crate::rethink::{BusError, Message};

/// A parsed request. A message with several `to`s never names a component.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Request {
    /// To `mn:/session`: answered by the session component, decided by no one.
    Session(SessionOp),
    /// `subscribe` to the subscription manager: one decision per resource.
    Subscribe,
    /// Anything else to the subscription manager (it answers `unsubscribe`).
    Unsubscribe,
    /// To an address-allocation component.
    Allocation(AllocationRequest),
    /// To the registry connector.
    Registry,
    /// To the identity-management connector.
    Idm,
    /// Anything else: routed to whoever its `to`s reach.
    Route,
}

impl Request {
    /// Reads what `message` asks of the node of `nodes`.
    ///
    /// # Errors
    /// 400 for a session or allocation request the component cannot read.
    pub(super) fn parse(nodes: &NodeAddresses, message: &Message) -> Result<Request, BusError> {
        let component = match message.to.as_slice() {
            [to] => nodes.component(to),
            _ => None,
        };
        Ok(match component {
            Some(Component::Session) => Request::Session(SessionOp::parse(message)?),
            Some(Component::SubscriptionManager) if message.kind_is("subscribe") => {
                Request::Subscribe
            }
            Some(Component::SubscriptionManager) => Request::Unsubscribe,
            Some(
                c @ (Component::Allocation
                | Component::HypertyAllocation
                | Component::ObjectAllocation),
            ) => Request::Allocation(AllocationRequest::parse(c, message)?),
            Some(Component::Registry) => Request::Registry,
            Some(Component::Idm) => Request::Idm,
            None => Request::Route,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(to: &str, kind: &str) -> Result<Request, BusError> {
        let message = Message::parse(format!(
            r#"{{"id":1,"type":"{kind}","from":"runtime://localhost/1","to":"{to}"}}"#
        ))
        .map_err(|(e, _)| e)?;
        Request::parse(&NodeAddresses::new("localhost"), &message)
    }

    #[test]
    fn components_are_chosen_by_address_and_type() {
        let sm = "domain://msg-node.localhost/sm";
        assert_eq!(
            parse("mn:/session", "ping"),
            Ok(Request::Session(SessionOp::Open))
        );
        assert_eq!(
            parse("mn:/session", "close"),
            Ok(Request::Session(SessionOp::Close))
        );
        assert!(parse("mn:/session", "update").is_err());
        assert_eq!(parse(sm, "SUBSCRIBE"), Ok(Request::Subscribe));
        assert_eq!(parse(sm, "unsubscribe"), Ok(Request::Unsubscribe));
        assert_eq!(
            parse("domain://registry.localhost", "read"),
            Ok(Request::Registry)
        );
        assert_eq!(parse("domain://idm.localhost", "read"), Ok(Request::Idm));
        assert_eq!(parse("hyperty://localhost/x", "create"), Ok(Request::Route));
        assert!(matches!(
            parse("domain://msg-node.localhost/address-allocation", "create"),
            Ok(Request::Allocation(_))
        ));
        assert!(parse("domain://msg-node.localhost/address-allocation", "update").is_err());
    }
}
