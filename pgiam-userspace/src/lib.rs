//! pgiam: an identity-aware access layer for PostgreSQL.
//!
//! Clients reach pgiam instead of the database; pgiam learns from the kernel who they are,
//! maps that identity to a database role, logs in upstream as that role with credentials the
//! client never sees, and relays the session.

pub mod admin;
pub mod audit;
pub mod cancel;
pub mod catalog;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod people;
pub mod policy;
pub mod pool;
#[cfg(test)]
mod properties;
pub mod redirect;
pub mod server;
pub mod session;
pub mod settings;
pub mod sql;
pub mod statefile;
pub mod stream;
pub mod tls;
pub mod upstream;
pub mod wire;
