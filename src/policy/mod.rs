//! Asking for decisions: the typed policy-input contract and the decider the enforcement
//! points (proxy, appservice, bus) ask, below all of them.
//!
//! - `input` — [`Input`]: the one document per decision (`schemas/input.schema.json`), built
//!   from typed values only.
//! - `decider` — [`Decider`]: the in-process PDP or a remote, OPA-compatible one
//!   (`[pep] pdp_url`), failing closed; [`refusal`] is what a refused request is told;
//!   each enforcement point names itself ([`EnforcementPoint`]) for the decision log.

pub mod decider;
pub mod input;

pub use crate::pdp::EnforcementPoint;
pub use decider::{refusal, Decider, POLICY_UNAVAILABLE};
pub use input::Input;
