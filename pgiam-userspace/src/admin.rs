//! The operator's side of pgiam: the live sessions and the orders that end them, revoked
//! principals, and the admin socket the CLI verbs (`pgiam sessions`, `kill`, `revoke`,
//! `unrevoke`, `status`) speak over.
//!
//! The socket speaks one JSON request per connection and answers one JSON line
//! ([`protocol`]); who may use it is decided by its peer credentials, and every order names
//! the operator in the audit log.

pub mod client;
pub mod metrics;
pub mod protocol;
pub mod registry;
pub mod revocations;
pub mod socket;
