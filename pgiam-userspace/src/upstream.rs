//! pgiam's own connections to PostgreSQL: connect, TLS, log in as the mapped role, cancel.
//!
//! Credentials come from files named in the config, never from the client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{lookup_host, TcpSocket, TcpStream, UnixStream};

use crate::config::{self, Config};
use crate::stream::BoxStream;
use crate::tls::{self, TlsError};
use crate::wire::{self, Authentication, BackendMessage, TransactionStatus, WireError};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to {0}")]
    ConnectTimeout(String),
    #[error("the server refused TLS, which the configuration requires")]
    TlsRefused,
    #[error("TLS handshake with the server failed: {0}")]
    Tls(std::io::Error),
    #[error("connection to the server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection during login")]
    Closed,
    #[error("invalid message from the server: {0}")]
    Protocol(#[from] WireError),
    #[error("unexpected message from the server during login: {0}")]
    Unexpected(&'static str),
    #[error("the server asks for {0} authentication, which pgiam does not support")]
    UnsupportedAuth(&'static str),
    #[error("the server asks for a password but role {0:?} has no password_file")]
    NoPassword(String),
    #[error("cannot read the password file {path}: {source}")]
    Password {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("SCRAM authentication failed: {0}")]
    Scram(std::io::Error),
    /// The server's own ErrorResponse during login, forwarded as-is to the client.
    #[error("the server refused the login: {message}")]
    Server { message: String, frame: Bytes },
}

/// Where and how pgiam reaches the database.
pub struct Upstream {
    config: config::Upstream,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    max_message_size: usize,
    /// SO_MARK for pgiam's own sockets, so interception never sends them back to pgiam.
    mark: Option<u32>,
    greetings: Greetings,
}

/// A logged-in upstream connection, ready for queries.
pub struct Established {
    pub stream: BoxStream,
    /// What the server reported at login (ParameterStatus), in its order, latest value per name.
    pub parameters: Parameters,
    /// The server's NoticeResponse frames from login, to pass on to the client.
    pub notices: BytesMut,
    pub process_id: i32,
    pub secret_key: i32,
    pub status: TransactionStatus,
}

/// A login's ParameterStatus reports. Shared until changed: a pooled backend's are handed to
/// every transaction that takes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parameters(Arc<Vec<(String, String)>>);

impl Parameters {
    pub fn set(&mut self, name: &[u8], value: &[u8]) {
        let name = String::from_utf8_lossy(name);
        let value = String::from_utf8_lossy(value).into_owned();
        if self.get(&name) == Some(value.as_str()) {
            return;
        }
        let reports = Arc::make_mut(&mut self.0);
        match reports.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value,
            None => reports.push((name.into_owned(), value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// On unless the server said otherwise.
    pub fn standard_conforming_strings(&self) -> bool {
        self.get("standard_conforming_strings") != Some("off")
    }

    /// ParameterStatus messages for every report here that `told` does not already hold.
    pub fn encode_news(&self, told: Option<&Parameters>, out: &mut BytesMut) {
        // A pooled backend taken again reports what its session was told, in the same order
        // (often the very same list): every transaction of a transaction-pooled session asks.
        if told.is_some_and(|t| Arc::ptr_eq(&self.0, &t.0) || self.0 == t.0) {
            return;
        }
        for (name, value) in self.0.iter() {
            if told.and_then(|t| t.get(name)) != Some(value.as_str()) {
                wire::parameter_status(name.as_bytes(), value.as_bytes(), out);
            }
        }
    }
}

/// Everything that decides what a login's greeting says: who logs in, with which startup
/// parameters, to which server, assuming which role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoginKey {
    pub role: String,
    pub params: Vec<(String, String)>,
    pub target: Option<SocketAddr>,
    pub assume: Option<String>,
}

/// What the last login with a key was told, so the next one can be answered before its own
/// connection exists. Bounded: a fleet of distinct keys (an application_name per connection)
/// just starts over, and those logins connect at once. Keys are shared with the sessions
/// waiting to log in with them.
#[derive(Default)]
struct Greetings(std::sync::Mutex<std::collections::HashMap<Arc<LoginKey>, Arc<Parameters>>>);

const GREETINGS_KEPT: usize = 1024;

impl Upstream {
    pub fn new(config: &Config) -> Result<Upstream, TlsError> {
        Ok(Upstream {
            tls: tls::upstream_connector(&config.upstream)?,
            config: config.upstream.clone(),
            max_message_size: config.limits.max_message_size,
            mark: config.interception.as_ref().map(|i| i.mark),
            greetings: Greetings::default(),
        })
    }

    /// What the last login with this key was told, if pgiam has seen one (with the key as
    /// pgiam keeps it).
    pub fn remembered(&self, key: &LoginKey) -> Option<(Arc<LoginKey>, Arc<Parameters>)> {
        let g = self.greetings.0.lock().unwrap_or_else(|e| e.into_inner());
        g.get_key_value(key).map(|(k, p)| (k.clone(), p.clone()))
    }

    pub fn remember(&self, key: &Arc<LoginKey>, parameters: &Parameters) {
        let mut g = self.greetings.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.get(key).is_some_and(|p| **p == *parameters) {
            return;
        }
        if g.len() >= GREETINGS_KEPT {
            g.clear();
        }
        g.insert(key.clone(), Arc::new(parameters.clone()));
    }

    pub fn describe(&self, target: Option<SocketAddr>) -> String {
        if let Some(t) = target {
            t.to_string()
        } else if self.config.is_unix() {
            self.config.unix_path().display().to_string()
        } else {
            format!("{}:{}", self.config.host, self.config.port)
        }
    }

    async fn tcp(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(mark) = self.mark {
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark).map_err(
                |e| std::io::Error::other(format!("SO_MARK (needs CAP_NET_ADMIN): {e}")),
            )?;
        }
        socket.set_nodelay(true)?;
        socket.connect(addr).await
    }

    /// Opens a transport to the server (`target`, or the configured endpoint) and negotiates
    /// TLS as configured.
    async fn open(&self, target: Option<SocketAddr>) -> Result<BoxStream, UpstreamError> {
        let described = self.describe(target);
        let connect = async {
            if let Some(addr) = target {
                self.tcp(addr).await.map(|s| Box::new(s) as BoxStream)
            } else if self.config.is_unix() {
                UnixStream::connect(self.config.unix_path())
                    .await
                    .map(|s| Box::new(s) as BoxStream)
            } else {
                let mut last = None;
                for addr in lookup_host((self.config.host.as_str(), self.config.port)).await? {
                    match self.tcp(addr).await {
                        Ok(s) => return Ok(Box::new(s) as BoxStream),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| std::io::Error::other("host name has no address")))
            }
        };
        let mut stream = tokio::time::timeout(self.config.connect_timeout(), connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(described.clone()))?
            .map_err(|source| UpstreamError::Connect {
                target: described,
                source,
            })?;
        let Some((connector, name)) = &self.tls else {
            return Ok(stream);
        };
        let mut req = BytesMut::new();
        frontend::ssl_request(&mut req);
        stream.write_all(&req).await?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await?;
        if answer[0] != b'S' {
            return Err(UpstreamError::TlsRefused);
        }
        // Without a configured server_name, an intercepted connection's certificate is checked
        // against the address the application dialled.
        let name = match (target, &self.config.server_name) {
            (Some(t), None) => ServerName::IpAddress(t.ip().into()),
            _ => name.clone(),
        };
        let tls = connector
            .connect(name, stream)
            .await
            .map_err(UpstreamError::Tls)?;
        Ok(Box::new(tls))
    }

    /// Connects and logs in as `role`. `params` are the client's startup parameters that pgiam
    /// lets through (database, application_name, GUCs); `user` is always `role`.
    pub async fn login(
        &self,
        role: &str,
        credentials: &config::RoleCredentials,
        params: &[(String, String)],
        target: Option<SocketAddr>,
    ) -> Result<Established, UpstreamError> {
        let mut stream = self.open(target).await?;
        let mut out = BytesMut::new();
        let startup = std::iter::once(("user", role))
            .chain(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        frontend::startup_message(startup, &mut out)?;
        // Every write is flushed: over TLS, what a writer accepted may otherwise wait in it.
        stream.write_all(&out).await?;
        stream.flush().await?;

        let mut buf = BytesMut::with_capacity(4096);
        let mut scram: Option<ScramSha256> = None;
        let mut parameters = Parameters::default();
        let mut notices = BytesMut::new();
        let mut key = None;
        let mut authenticated = false;
        loop {
            let (tag, body) = read_message(&mut stream, &mut buf, self.max_message_size).await?;
            out.clear();
            match wire::decode_backend(tag, &body)? {
                BackendMessage::Authentication(auth) if !authenticated => match auth {
                    Authentication::Ok => {
                        if scram.is_some() {
                            return Err(UpstreamError::Unexpected(
                                "AuthenticationOk before SCRAM completed",
                            ));
                        }
                        authenticated = true;
                    }
                    Authentication::CleartextPassword => {
                        let pw = read_password(role, credentials)?;
                        frontend::password_message(pw.as_bytes(), &mut out)?;
                    }
                    Authentication::Md5Password { salt } => {
                        let pw = read_password(role, credentials)?;
                        let hash = postgres_protocol::authentication::md5_hash(
                            role.as_bytes(),
                            pw.as_bytes(),
                            salt,
                        );
                        frontend::password_message(hash.as_bytes(), &mut out)?;
                    }
                    Authentication::Sasl { mechanisms } => {
                        if !mechanisms.contains(&SCRAM_SHA_256.as_bytes()) {
                            return Err(UpstreamError::UnsupportedAuth(
                                "SASL without SCRAM-SHA-256",
                            ));
                        }
                        let pw = read_password(role, credentials)?;
                        // Channel binding is not offered ('n'), which a server advertising
                        // SCRAM-SHA-256-PLUS accepts; it never silently downgrades a 'y'.
                        let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                        frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)?;
                        scram = Some(s);
                    }
                    Authentication::SaslContinue(data) => {
                        let s = scram
                            .as_mut()
                            .ok_or(UpstreamError::Unexpected("SASLContinue before SASL"))?;
                        s.update(data).map_err(UpstreamError::Scram)?;
                        frontend::sasl_response(s.message(), &mut out)?;
                    }
                    Authentication::SaslFinal(data) => {
                        // finish() checks the server's signature: the server proves it knows
                        // the password too.
                        let mut s = scram
                            .take()
                            .ok_or(UpstreamError::Unexpected("SASLFinal before SASL"))?;
                        s.finish(data).map_err(UpstreamError::Scram)?;
                    }
                    Authentication::KerberosV5 => {
                        return Err(UpstreamError::UnsupportedAuth("Kerberos V5"))
                    }
                    Authentication::Gss | Authentication::GssContinue(_) => {
                        return Err(UpstreamError::UnsupportedAuth("GSSAPI"))
                    }
                    Authentication::Sspi => return Err(UpstreamError::UnsupportedAuth("SSPI")),
                },
                BackendMessage::ParameterStatus { name, value } if authenticated => {
                    parameters.set(name, value)
                }
                BackendMessage::NoticeResponse(_) => append_frame(&mut notices, tag, &body),
                BackendMessage::BackendKeyData {
                    process_id,
                    secret_key,
                } if authenticated => key = Some((process_id, secret_key)),
                BackendMessage::ReadyForQuery(status) if authenticated => {
                    let (process_id, secret_key) = key.ok_or(UpstreamError::Unexpected(
                        "ReadyForQuery without BackendKeyData",
                    ))?;
                    if !buf.is_empty() {
                        return Err(UpstreamError::Unexpected("data after ReadyForQuery"));
                    }
                    return Ok(Established {
                        stream,
                        parameters,
                        notices,
                        process_id,
                        secret_key,
                        status,
                    });
                }
                BackendMessage::ErrorResponse(fields) => {
                    let message = fields.get_str(b'M').unwrap_or("?").to_owned();
                    return Err(server_error(tag, &body, message));
                }
                BackendMessage::NegotiateProtocolVersion { .. } => {
                    // pgiam asks for 3.0 with no protocol options: nothing to negotiate down.
                    return Err(UpstreamError::Unexpected("NegotiateProtocolVersion"));
                }
                _ => return Err(UpstreamError::Unexpected("message out of order")),
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
                stream.flush().await?;
            }
        }
    }

    /// Gateway mode: the session becomes `role` (SET ROLE) before the client sees it. The
    /// server's reports on the change (is_superuser, …) join the login's parameters.
    pub async fn assume_role(
        &self,
        established: &mut Established,
        role: &str,
    ) -> Result<(), UpstreamError> {
        let mut out = BytesMut::new();
        let sql = format!("SET ROLE \"{}\"", role.replace('"', "\"\""));
        frontend::query(&sql, &mut out)?;
        established.stream.write_all(&out).await?;
        established.stream.flush().await?;
        let mut buf = BytesMut::new();
        let mut failed = None;
        loop {
            let (tag, body) =
                read_message(&mut established.stream, &mut buf, self.max_message_size).await?;
            match wire::decode_backend(tag, &body)? {
                BackendMessage::CommandComplete { .. } => {}
                BackendMessage::ParameterStatus { name, value } => {
                    established.parameters.set(name, value)
                }
                BackendMessage::NoticeResponse(_) => {
                    append_frame(&mut established.notices, tag, &body)
                }
                BackendMessage::ErrorResponse(fields) => {
                    let message =
                        format!("SET ROLE {role}: {}", fields.get_str(b'M').unwrap_or("?"));
                    failed = Some(server_error(tag, &body, message));
                }
                BackendMessage::ReadyForQuery(status) => {
                    if !buf.is_empty() {
                        return Err(UpstreamError::Unexpected("data after ReadyForQuery"));
                    }
                    established.status = status;
                    return failed.map_or(Ok(()), Err);
                }
                _ => return Err(UpstreamError::Unexpected("message out of order")),
            }
        }
    }

    /// Whether the configured server takes a connection now (TCP or unix, and TLS as
    /// configured); no login is attempted.
    pub async fn reachable(&self) -> Result<(), UpstreamError> {
        let mut stream = self.open(None).await?;
        let _ = stream.shutdown().await;
        Ok(())
    }

    /// Forwards a cancel for the backend `process_id` with its real key. PostgreSQL answers
    /// nothing; the connection just closes.
    pub async fn cancel(
        &self,
        process_id: i32,
        secret_key: i32,
        target: Option<SocketAddr>,
    ) -> Result<(), UpstreamError> {
        let mut stream = self.open(target).await?;
        let mut out = BytesMut::new();
        frontend::cancel_request(process_id, secret_key, &mut out);
        stream.write_all(&out).await?;
        stream.flush().await?;
        // Wait for the server to close, so the cancel has been processed when we return.
        let mut sink = [0u8; 64];
        while stream.read(&mut sink).await? > 0 {}
        Ok(())
    }
}

/// The server's own ErrorResponse, kept whole to pass on to the client.
fn server_error(tag: u8, body: &[u8], message: String) -> UpstreamError {
    let mut frame = BytesMut::new();
    append_frame(&mut frame, tag, body);
    UpstreamError::Server {
        message,
        frame: frame.freeze(),
    }
}

fn append_frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

/// Reads the role's password file; a trailing newline is not part of the password.
fn read_password(
    role: &str,
    credentials: &config::RoleCredentials,
) -> Result<String, UpstreamError> {
    let path = credentials
        .password_path()
        .ok_or_else(|| UpstreamError::NoPassword(role.to_owned()))?;
    let mut pw = std::fs::read_to_string(&path)
        .map_err(|source| UpstreamError::Password { path, source })?;
    while pw.ends_with(['\n', '\r']) {
        pw.pop();
    }
    Ok(pw)
}

/// Reads one whole message, buffering as needed.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_message_size: usize,
) -> Result<(u8, BytesMut), UpstreamError> {
    loop {
        if let Some(m) = wire::next_message(buf, max_message_size)? {
            return Ok(m);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(UpstreamError::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reports(frames: &[u8]) -> Vec<(String, String)> {
        let mut buf = BytesMut::from(frames);
        let mut out = Vec::new();
        while let Some((tag, body)) = wire::next_message(&mut buf, 1 << 20).unwrap() {
            match wire::decode_backend(tag, &body).unwrap() {
                BackendMessage::ParameterStatus { name, value } => out.push((
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                )),
                _ => panic!("not a ParameterStatus"),
            }
        }
        out
    }

    #[test]
    fn a_later_login_reports_only_what_the_client_was_not_told() {
        let mut told = Parameters::default();
        told.set(b"DateStyle", b"ISO, MDY");
        told.set(b"standard_conforming_strings", b"on");
        let mut all = BytesMut::new();
        told.encode_news(None, &mut all);
        assert_eq!(reports(&all).len(), 2);

        let mut now = told.clone();
        now.set(b"DateStyle", b"SQL, DMY");
        now.set(b"is_superuser", b"off");
        now.set(b"standard_conforming_strings", b"on");
        let mut news = BytesMut::new();
        now.encode_news(Some(&told), &mut news);
        assert_eq!(
            reports(&news),
            [
                ("DateStyle".to_owned(), "SQL, DMY".to_owned()),
                ("is_superuser".to_owned(), "off".to_owned())
            ]
        );
        assert!(now.standard_conforming_strings());
        now.set(b"standard_conforming_strings", b"off");
        assert!(!now.standard_conforming_strings());
    }
}
