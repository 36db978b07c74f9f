//! pgiam's core proxy against a real PostgreSQL with real clients (psql, pgbench,
//! tokio-postgres) and hand-driven protocol input for what real clients never send.

mod fixture;

mod admin;
mod audit;
mod bypass;
mod cancel;
mod catalog;
mod clients;
mod corpus;
mod deferred;
mod differential;
mod dump;
mod faults;
mod malformed;
mod policy;
mod pooling;
mod refusals;
mod reload;
mod resting;
mod settings;
mod tls;
mod transactions;
