//! Talking to an OpenID Connect provider: discovery, its signing keys (cached, fetched again
//! for a key id not yet seen, at most every [`JWKS_REFETCH`]), ID token verification, the
//! device authorization grant (RFC 8628), refresh, revocation (RFC 7009) and introspection
//! (RFC 7662).
//!
//! Nothing here decides who may do what: a verified token becomes [`Claims`], and
//! [`super::Person`] is built from those.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Issuer;

/// The least time between two fetches of one issuer's keys: a stream of tokens with made-up
/// key ids must not become a stream of requests to the provider.
pub const JWKS_REFETCH: Duration = Duration::from_secs(10);

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
const LEEWAY_SECS: u64 = 30;

/// Why a token was not accepted: what the client's 28000 and the log say.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("not a JWT: {0}")]
    Malformed(String),
    #[error("issued by {0:?}, which is not a configured issuer")]
    UnknownIssuer(String),
    #[error("signed by a key issuer {issuer} does not publish (kid {kid:?})")]
    UnknownKey { issuer: String, kid: Option<String> },
    #[error("signed with {0:?}: only asymmetric signatures (RS*, PS*, ES*, EdDSA) are accepted")]
    Algorithm(Algorithm),
    #[error("bad signature")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("not valid yet (nbf)")]
    NotYetValid,
    #[error("for another audience (aud is not {0})")]
    Audience(String),
    #[error("invalid claims: {0}")]
    Claims(String),
    #[error("issuer {issuer} cannot be reached: {message}")]
    Unreachable { issuer: String, message: String },
}

/// What a provider says about itself at `/.well-known/openid-configuration`.
#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub jwks_uri: String,
    pub token_endpoint: String,
    pub device_authorization_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    pub introspection_endpoint: Option<String>,
}

/// The claims pgiam reads from an ID token; any other claim is ignored.
#[derive(Debug, Clone)]
pub struct Claims {
    pub issuer: String,
    pub subject: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub groups: Vec<String>,
    pub amr: Vec<String>,
    pub acr: Option<String>,
    pub auth_time: Option<i64>,
    pub expires_at: i64,
}

/// An issuer's discovery document and keys, as last fetched.
#[derive(Default)]
struct Cached {
    discovery: Option<(Discovery, Instant)>,
    keys: Option<JwkSet>,
    keys_fetched: Option<Instant>,
}

/// The HTTP client and what pgiam knows of each issuer (by issuer URL, so a reload that
/// keeps an issuer keeps its keys).
pub struct Providers {
    http: reqwest::Client,
    cache: Mutex<HashMap<String, Cached>>,
}

impl Default for Providers {
    fn default() -> Self {
        Providers {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                // A provider's endpoints answer directly; a redirect to elsewhere is not
                // followed with a device code or a refresh token in the body.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client with rustls builds"),
            cache: Mutex::new(HashMap::new()),
        }
    }
}

/// A discovery document is read again after this long (endpoints rarely move).
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

impl Providers {
    fn unreachable(issuer: &Issuer, e: impl std::fmt::Display) -> TokenError {
        TokenError::Unreachable {
            issuer: issuer.issuer.clone(),
            message: e.to_string(),
        }
    }

    /// The issuer's discovery document (cached for [`DISCOVERY_TTL`]).
    pub async fn discovery(&self, issuer: &Issuer) -> Result<Discovery, TokenError> {
        if let Some((d, at)) = self
            .lock()
            .get(&issuer.issuer)
            .and_then(|c| c.discovery.clone())
        {
            if at.elapsed() < DISCOVERY_TTL {
                return Ok(d);
            }
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.issuer.trim_end_matches('/')
        );
        let d: Discovery = self
            .get_json(&url)
            .await
            .map_err(|e| Self::unreachable(issuer, e))?;
        // A document for another issuer would have pgiam trust that issuer's keys.
        if d.issuer != issuer.issuer {
            return Err(Self::unreachable(
                issuer,
                format!("its discovery document names issuer {:?}", d.issuer),
            ));
        }
        self.lock()
            .entry(issuer.issuer.clone())
            .or_default()
            .discovery = Some((d.clone(), Instant::now()));
        Ok(d)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let response = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", response.status()));
        }
        response.json().await.map_err(|e| format!("GET {url}: {e}"))
    }

    /// The key `kid` names, fetching the key set when it is not cached or does not hold
    /// `kid` (a rotation), at most every [`JWKS_REFETCH`].
    async fn key(
        &self,
        issuer: &Issuer,
        kid: Option<&str>,
    ) -> Result<jsonwebtoken::jwk::Jwk, TokenError> {
        let find = |set: &JwkSet| match kid {
            Some(kid) => set.find(kid).cloned(),
            // A token without kid is accepted only from an issuer with one key.
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        let may_fetch = {
            let cache = self.lock();
            let cached = cache.get(&issuer.issuer);
            if let Some(k) = cached.and_then(|c| c.keys.as_ref()).and_then(find) {
                return Ok(k);
            }
            cached
                .and_then(|c| c.keys_fetched)
                .is_none_or(|at| at.elapsed() >= JWKS_REFETCH)
        };
        if may_fetch {
            let d = self.discovery(issuer).await?;
            // Marked before the request: concurrent unknown kids make one request, not many.
            self.lock()
                .entry(issuer.issuer.clone())
                .or_default()
                .keys_fetched = Some(Instant::now());
            let set: JwkSet = self
                .get_json(&d.jwks_uri)
                .await
                .map_err(|e| Self::unreachable(issuer, e))?;
            let found = find(&set);
            self.lock().entry(issuer.issuer.clone()).or_default().keys = Some(set);
            if let Some(k) = found {
                return Ok(k);
            }
        }
        Err(TokenError::UnknownKey {
            issuer: issuer.issuer.clone(),
            kid: kid.map(str::to_owned),
        })
    }

    /// Verifies an ID token of one of `issuers`: the issuer named by its (unverified) `iss`
    /// must be configured, and then signature, `iss`, `aud`, `exp` and `nbf` are checked
    /// against that issuer's settings and keys.
    pub async fn verify<'a>(
        &self,
        issuers: &'a [Issuer],
        token: &str,
    ) -> Result<(&'a Issuer, Claims), TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if !matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        ) {
            return Err(TokenError::Algorithm(header.alg));
        }
        let claimed_issuer = unverified_issuer(token)?;
        let issuer = issuers
            .iter()
            .find(|i| i.issuer == claimed_issuer)
            .ok_or(TokenError::UnknownIssuer(claimed_issuer))?;
        let jwk = self.key(issuer, header.kid.as_deref()).await?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&issuer.issuer]);
        let audiences = issuer.accepted_audiences();
        validation.set_audience(&audiences);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        )
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidAudience => TokenError::Audience(audiences.join(" or ")),
                ErrorKind::InvalidSignature => TokenError::Signature,
                ErrorKind::InvalidAlgorithm => TokenError::Signature,
                _ => TokenError::Claims(e.to_string()),
            }
        })?;
        Ok((issuer, claims_of(issuer, data.claims)?))
    }

    /// Starts a device authorization: what the person is shown, and the code pgiam polls with.
    pub async fn start_device(&self, issuer: &Issuer) -> Result<DeviceStart, TokenError> {
        let d = self.discovery(issuer).await?;
        let endpoint = d.device_authorization_endpoint.ok_or_else(|| {
            Self::unreachable(
                issuer,
                "the provider offers no device authorization endpoint",
            )
        })?;
        let mut form = vec![
            ("client_id", issuer.client_id.clone()),
            ("scope", issuer.scopes.join(" ")),
        ];
        self.add_secret(issuer, &mut form)?;
        let response = self
            .http
            .post(&endpoint)
            .form(&form)
            .send()
            .await
            .map_err(|e| Self::unreachable(issuer, e))?;
        let status = response.status();
        let body: serde_json::Value = response
            .json()
            .await
            .map_err(|e| Self::unreachable(issuer, e))?;
        if !status.is_success() {
            return Err(Self::unreachable(
                issuer,
                format!("device authorization refused: {}", oauth_error(&body)),
            ));
        }
        serde_json::from_value(body).map_err(|e| Self::unreachable(issuer, e))
    }

    /// Polls the token endpoint until the person has approved (`Ok(tokens)`), refused, or the
    /// code expired, or `deadline` passes.
    pub async fn poll_device(
        &self,
        issuer: &Issuer,
        start: &DeviceStart,
        deadline: Instant,
    ) -> Result<Tokens, String> {
        let d = self.discovery(issuer).await.map_err(|e| e.to_string())?;
        let mut interval = Duration::from_secs(start.interval.unwrap_or(5).max(1));
        let expires = Instant::now() + Duration::from_secs(start.expires_in.max(1));
        loop {
            tokio::time::sleep(interval).await;
            if Instant::now() >= deadline.min(expires) {
                return Err("the login was not approved in time".into());
            }
            let mut form = vec![
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:device_code".to_owned(),
                ),
                ("device_code", start.device_code.clone()),
                ("client_id", issuer.client_id.clone()),
            ];
            self.add_secret(issuer, &mut form)
                .map_err(|e| e.to_string())?;
            match self.token_request(&d.token_endpoint, &form).await {
                Ok(tokens) => return Ok(tokens),
                Err(TokenEndpoint::Refused(body)) => match body["error"].as_str() {
                    Some("authorization_pending") => {}
                    Some("slow_down") => interval += Duration::from_secs(5),
                    Some("access_denied") => return Err("the login was refused".into()),
                    Some("expired_token") => return Err("the login code expired".into()),
                    _ => return Err(format!("the provider refused: {}", oauth_error(&body))),
                },
                // A hiccup of the network is not the end of a login the person is approving.
                Err(TokenEndpoint::Unreachable(e)) => {
                    tracing::warn!(issuer = %issuer.issuer, "device flow: token endpoint: {e}")
                }
            }
        }
    }

    /// Exchanges a refresh token. `Err(Refused)` is the issuer's no (revoked, expired);
    /// `Err(Unreachable)` may pass.
    pub async fn refresh(
        &self,
        issuer: &Issuer,
        refresh_token: &str,
    ) -> Result<Tokens, TokenEndpoint> {
        let d = self
            .discovery(issuer)
            .await
            .map_err(|e| TokenEndpoint::Unreachable(e.to_string()))?;
        let mut form = vec![
            ("grant_type", "refresh_token".to_owned()),
            ("refresh_token", refresh_token.to_owned()),
            ("client_id", issuer.client_id.clone()),
        ];
        self.add_secret(issuer, &mut form)
            .map_err(|e| TokenEndpoint::Unreachable(e.to_string()))?;
        self.token_request(&d.token_endpoint, &form).await
    }

    /// Revokes a refresh token at the issuer (RFC 7009), best effort: a logout ends the
    /// person's sessions whether or not the provider can be told.
    pub async fn revoke(&self, issuer: &Issuer, refresh_token: &str) {
        let Ok(d) = self.discovery(issuer).await else {
            return;
        };
        let Some(endpoint) = d.revocation_endpoint else {
            return;
        };
        let mut form = vec![
            ("token", refresh_token.to_owned()),
            ("token_type_hint", "refresh_token".to_owned()),
            ("client_id", issuer.client_id.clone()),
        ];
        if self.add_secret(issuer, &mut form).is_err() {
            return;
        }
        if let Err(e) = self.http.post(&endpoint).form(&form).send().await {
            tracing::warn!(issuer = %issuer.issuer, "logout: the refresh token was not revoked: {e}");
        }
    }

    /// Whether the issuer still holds a refresh token active (RFC 7662). `Ok(None)`: the
    /// issuer has no introspection endpoint. An error is no answer, not a no: the login stands
    /// until its token expires, as with a refresh that gets no answer.
    pub async fn introspect(
        &self,
        issuer: &Issuer,
        refresh_token: &str,
    ) -> Result<Option<bool>, String> {
        let d = self.discovery(issuer).await.map_err(|e| e.to_string())?;
        let Some(endpoint) = d.introspection_endpoint else {
            return Ok(None);
        };
        let mut form = vec![
            ("token", refresh_token.to_owned()),
            ("token_type_hint", "refresh_token".to_owned()),
            ("client_id", issuer.client_id.clone()),
        ];
        self.add_secret(issuer, &mut form)
            .map_err(|e| e.to_string())?;
        let response = self
            .http
            .post(&endpoint)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("introspection endpoint answered HTTP {status}"));
        }
        let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
        match body["active"].as_bool() {
            Some(active) => Ok(Some(active)),
            None => Err(format!("introspection answer without `active`: {body}")),
        }
    }

    fn add_secret(
        &self,
        issuer: &Issuer,
        form: &mut Vec<(&'static str, String)>,
    ) -> Result<(), TokenError> {
        if let Some(path) = issuer.client_secret_path() {
            let secret = std::fs::read_to_string(&path).map_err(|e| {
                Self::unreachable(issuer, format!("client secret {}: {e}", path.display()))
            })?;
            form.push(("client_secret", secret.trim_end().to_owned()));
        }
        Ok(())
    }

    async fn token_request(
        &self,
        endpoint: &str,
        form: &[(&'static str, String)],
    ) -> Result<Tokens, TokenEndpoint> {
        let response = self
            .http
            .post(endpoint)
            .form(form)
            .send()
            .await
            .map_err(|e| TokenEndpoint::Unreachable(e.to_string()))?;
        let status = response.status();
        let body: serde_json::Value = response
            .json()
            .await
            .map_err(|e| TokenEndpoint::Unreachable(e.to_string()))?;
        if status.is_success() {
            serde_json::from_value(body).map_err(|e| TokenEndpoint::Unreachable(e.to_string()))
        } else if status.is_client_error() {
            Err(TokenEndpoint::Refused(body))
        } else {
            Err(TokenEndpoint::Unreachable(format!("HTTP {status}")))
        }
    }
}

/// A token endpoint's failure: its refusal (an OAuth error body), or no answer.
#[derive(Debug)]
pub enum TokenEndpoint {
    Refused(serde_json::Value),
    Unreachable(String),
}

impl std::fmt::Display for TokenEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenEndpoint::Refused(body) => write!(f, "refused: {}", oauth_error(body)),
            TokenEndpoint::Unreachable(e) => write!(f, "no answer: {e}"),
        }
    }
}

/// What a device authorization request answers (RFC 8628 §3.2).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct DeviceStart {
    #[serde(skip_serializing)]
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    #[serde(default)]
    pub interval: Option<u64>,
}

/// A token endpoint's success.
#[derive(Debug, Clone, Deserialize)]
pub struct Tokens {
    pub id_token: Option<String>,
    pub refresh_token: Option<String>,
    pub expires_in: Option<u64>,
}

fn oauth_error(body: &serde_json::Value) -> String {
    match (body["error"].as_str(), body["error_description"].as_str()) {
        (Some(e), Some(d)) => format!("{e}: {d}"),
        (Some(e), None) => e.to_owned(),
        _ => body.to_string(),
    }
}

/// The `iss` of a token before its signature is checked: only to pick which issuer's keys
/// and settings to check it with.
fn unverified_issuer(token: &str) -> Result<String, TokenError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| TokenError::Malformed("no payload".into()))?;
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| TokenError::Malformed(format!("payload is not base64url: {e}")))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| TokenError::Malformed(e.to_string()))?;
    value["iss"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| TokenError::Claims("no iss".into()))
}

fn claims_of(
    issuer: &Issuer,
    mut c: serde_json::Map<String, serde_json::Value>,
) -> Result<Claims, TokenError> {
    use serde_json::Value;
    let string = |v: Option<Value>| match v {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let strings = |v: Option<Value>| -> Vec<String> {
        match v {
            Some(Value::Array(a)) => a
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .collect(),
            Some(Value::String(s)) => vec![s],
            _ => Vec::new(),
        }
    };
    let subject = string(c.remove("sub"))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TokenError::Claims("sub is missing or empty".into()))?;
    let expires_at = c
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| TokenError::Claims("exp is not a number".into()))?;
    let email_verified = match c.remove("email_verified") {
        Some(Value::Bool(b)) => b,
        // Some providers send it as a string.
        Some(Value::String(s)) => s == "true",
        _ => false,
    };
    Ok(Claims {
        issuer: issuer.issuer.clone(),
        subject,
        email: string(c.remove("email")),
        email_verified,
        groups: strings(c.remove(&issuer.groups_claim)),
        amr: strings(c.remove("amr")),
        acr: string(c.remove("acr")),
        auth_time: c.get("auth_time").and_then(Value::as_i64),
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unverified_issuer_is_read_from_the_payload() {
        // header {"alg":"none"}, payload {"iss":"x"}
        assert_eq!(
            unverified_issuer("eyJhbGciOiJub25lIn0.eyJpc3MiOiJ4In0.").unwrap(),
            "x"
        );
        assert!(unverified_issuer("onlyonepart").is_err());
    }
}
