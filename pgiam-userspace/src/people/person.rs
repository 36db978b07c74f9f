//! A person, as an OpenID Connect provider vouched for them: the verified claims a session's
//! principals, its policy attributes and its audit records carry beside the workload identity.

use serde::Serialize;

use super::oidc::Claims;
use crate::config::Issuer;

/// How the person came to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// `pgiam login`, bound to the caller's uid and login session.
    Login,
    /// An ID token given as the connection's password.
    Password,
}

/// A verified person.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Person {
    /// The `[[oidc]]` alias of the issuer.
    pub alias: String,
    pub issuer: String,
    pub subject: String,
    /// Only an address the issuer verified (or one of an issuer trusted with unverified ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// How they authenticated (RFC 8176 values, as the issuer says).
    pub amr: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    /// When they authenticated, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_time: Option<i64>,
    /// A second factor was used (an `amr` or `acr` of the issuer's `mfa_amr`/`mfa_acr`).
    pub mfa: bool,
    /// When the token this was read from expires, Unix seconds (a login's refreshes move it;
    /// a session keeps the value it started with).
    pub expires_at: i64,
    pub via: Via,
    /// The login this came from (`pgiam login`): sessions end with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
}

impl Person {
    /// The configured issuer this person's tokens come from: the same alias *and* URL (an
    /// alias given to another issuer by a reload is not theirs).
    pub fn issuer_in<'a>(&self, issuers: &'a [Issuer]) -> Option<&'a Issuer> {
        issuers
            .iter()
            .find(|i| i.alias == self.alias && i.issuer == self.issuer)
    }

    pub fn new(issuer: &Issuer, claims: Claims, via: Via, login: Option<String>) -> Person {
        let mfa = claims.amr.iter().any(|a| issuer.mfa_amr.contains(a))
            || claims
                .acr
                .as_ref()
                .is_some_and(|a| issuer.mfa_acr.contains(a));
        let email = claims
            .email
            .filter(|_| claims.email_verified || issuer.trust_unverified_email);
        Person {
            alias: issuer.alias.clone(),
            issuer: claims.issuer,
            subject: claims.subject,
            email,
            groups: claims.groups,
            amr: claims.amr,
            acr: claims.acr,
            auth_time: claims.auth_time,
            mfa,
            expires_at: claims.expires_at,
            via,
            login,
        }
    }

    /// `oidc:<alias>:<sub>`: the name that is this person at this issuer, whatever else changes.
    pub fn principal(&self) -> String {
        format!("oidc:{}:{}", self.alias, self.subject)
    }

    /// Every principal name the person answers to, most specific first.
    pub fn principals(&self) -> Vec<String> {
        let mut p = Vec::with_capacity(2 + self.groups.len());
        p.push(self.principal());
        if let Some(e) = &self.email {
            p.push(format!("email:{e}"));
        }
        for g in &self.groups {
            p.push(format!("oidc-group:{}:{g}", self.alias));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> Issuer {
        toml::from_str(
            r#"
            alias = "corp"
            issuer = "https://idp.example.com"
            client_id = "pgiam"
            "#,
        )
        .unwrap()
    }

    fn claims(amr: &[&str], email_verified: bool) -> Claims {
        Claims {
            issuer: "https://idp.example.com".into(),
            subject: "u1".into(),
            email: Some("a@example.com".into()),
            email_verified,
            groups: vec!["dba".into()],
            amr: amr.iter().map(|s| s.to_string()).collect(),
            acr: None,
            auth_time: Some(1),
            expires_at: 2,
        }
    }

    #[test]
    fn principals_name_the_person_their_verified_email_and_groups() {
        let p = Person::new(&issuer(), claims(&["pwd"], true), Via::Login, None);
        assert_eq!(
            p.principals(),
            ["oidc:corp:u1", "email:a@example.com", "oidc-group:corp:dba"]
        );
        assert!(!p.mfa);
        let unverified = Person::new(&issuer(), claims(&["pwd"], false), Via::Login, None);
        assert_eq!(
            unverified.principals(),
            ["oidc:corp:u1", "oidc-group:corp:dba"]
        );
    }

    #[test]
    fn a_second_factor_in_amr_or_acr_is_mfa() {
        assert!(Person::new(&issuer(), claims(&["pwd", "otp"], true), Via::Login, None).mfa);
        let mut i = issuer();
        i.mfa_acr = vec!["urn:example:mfa".into()];
        let mut c = claims(&["pwd"], true);
        c.acr = Some("urn:example:mfa".into());
        assert!(Person::new(&i, c, Via::Login, None).mfa);
    }
}
