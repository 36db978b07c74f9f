//! A person's ID token given as the connection's password, for clients that cannot run
//! `pgiam login` first (a CI job with its OIDC token, a tool that only takes a password).
//!
//! pgiam asks for a password only when nothing else maps the client: no login is bound to
//! its login session, its workload identity matches no mapping of the database, and some
//! mapping of the database names a person of an issuer that accepts tokens as passwords. The
//! password never leaves pgiam (the server sees pgiam's own login), and it never crosses a
//! network on its way in: pgiam listens on loopback and unix sockets only, and intercepted
//! connections are handed to it inside the host.

use std::sync::Arc;

use bytes::BytesMut;

use super::{Client, Refusal, Shared};
use crate::config::Issuer;
use crate::people::{Person, Via};
use crate::wire::{self, PgError};

/// The longest password read as a token: ID tokens are a few kilobytes.
const MAX_TOKEN: usize = 16 * 1024;

/// Asks the client for its password and returns the person its ID token names.
pub(super) async fn person_from_password(
    shared: &Shared,
    client: &mut Client,
    issuers: &[Issuer],
) -> Result<Arc<Person>, Refusal> {
    let mut b = BytesMut::new();
    wire::authentication_cleartext_password(&mut b);
    client.write(&b).await?;
    let body = loop {
        match wire::next_message(&mut client.buf, MAX_TOKEN + 5)
            .map_err(super::protocol_violation)?
        {
            Some((b'p', body)) => break body,
            Some((tag, _)) => {
                return Err(PgError::fatal(
                    "08P01",
                    format!(
                        "pgiam: expected a password message, got message type {:?}",
                        tag as char
                    ),
                )
                .into())
            }
            None => client.fill().await?,
        }
    };
    let refused = |why: String| -> Refusal {
        PgError::fatal(
            "28000",
            "pgiam: password authentication failed: the password is not an ID token pgiam accepts",
        )
        .with_detail(why)
        .into()
    };
    let password = wire::decode_password(&body).map_err(super::protocol_violation)?;
    let token =
        std::str::from_utf8(password).map_err(|_| refused("The password is not text.".into()))?;
    let accepting: Vec<Issuer> = issuers
        .iter()
        .filter(|i| i.accept_passwords)
        .cloned()
        .collect();
    let (issuer, claims) = shared
        .people
        .providers
        .verify(&accepting, token.trim())
        .await
        .map_err(|e| refused(format!("Token refused: {e}.")))?;
    Ok(Arc::new(Person::new(issuer, claims, Via::Password, None)))
}
