//! `pgiam.toml`: listeners, client TLS, the upstream, role credentials and identity mappings.
//!
//! Loading validates everything that can be checked without touching the network, so a bad file
//! is refused at start (and later at reload) with a message naming the offending key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where pgiam keeps state it generates, such as its host-local TLS certificate.
    pub state_dir: PathBuf,
    pub listen: Listen,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub client_tls: ClientTls,
    pub upstream: Upstream,
    #[serde(default)]
    pub roles: BTreeMap<String, RoleCredentials>,
    #[serde(default, rename = "mapping")]
    pub mappings: Vec<Mapping>,
    /// Transparent interception with eBPF; absent: clients connect to the listeners explicitly.
    pub interception: Option<Interception>,
    /// The tamper-evident audit log; absent: no audit (pgiam warns at start).
    pub audit: Option<Audit>,
    /// Statement authorization. Required: without a policy nothing would be decided.
    pub policy: PolicyConfig,
    /// The admin socket; absent: no `pgiam sessions`, `kill`, `revoke`, `status`.
    pub admin: Option<Admin>,
    /// Limits of the backend pools that mappings with `pool = "session"` draw from.
    #[serde(default)]
    pub pool: Pool,
    /// `text` (the default) or `json`: one JSON object per line, for journald and log
    /// pipelines, with the session id in each session's lines.
    #[serde(default)]
    pub log_format: LogFormat,
    /// OpenID Connect issuers people log in with (`pgiam login`), or whose ID tokens a client
    /// may give as its password.
    #[serde(default, rename = "oidc")]
    pub issuers: Vec<Issuer>,
    /// `[people]`: the socket `pgiam login` speaks over.
    #[serde(default)]
    pub people: PeopleSettings,
}

/// `[[oidc]]`: an OpenID Connect provider whose people pgiam recognises.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Issuer {
    /// The short name principals carry: `oidc:<alias>:<sub>`, `oidc-group:<alias>:<group>`.
    pub alias: String,
    /// The issuer URL exactly as its tokens' `iss` says it (discovery is read from
    /// `<issuer>/.well-known/openid-configuration`). https, or http on a loopback address.
    pub issuer: String,
    /// The client pgiam's device flow and refreshes use (a public client, or a confidential
    /// one with `client_secret_file`).
    pub client_id: String,
    /// File holding the client secret, for providers that make device-flow clients
    /// confidential. A relative path is resolved against `$CREDENTIALS_DIRECTORY`.
    pub client_secret_file: Option<PathBuf>,
    /// `aud` values an ID token may carry; empty: `client_id` only.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Scopes the device flow asks for.
    #[serde(default = "default_oidc_scopes")]
    pub scopes: Vec<String>,
    /// The claim holding the person's groups (a list of strings, or one string).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// `amr` values that show a second factor (RFC 8176): any of them makes `mfa` true.
    #[serde(default = "default_mfa_amr")]
    pub mfa_amr: Vec<String>,
    /// `acr` values that show a second factor (for providers that say it there instead).
    #[serde(default)]
    pub mfa_acr: Vec<String>,
    /// Keep a login alive with its refresh token until the issuer refuses it; off: a login
    /// ends when its ID token expires.
    #[serde(default = "default_true")]
    pub refresh: bool,
    /// Ask the issuer every this many seconds whether each login is still active (RFC 7662
    /// token introspection, where discovery names an endpoint): a login the issuer revoked
    /// ends then, not at its next refresh. 0: never.
    #[serde(default = "default_introspect_secs")]
    pub introspect_secs: u64,
    /// A client may give an ID token of this issuer as its password (asked for only when no
    /// mapping matches the client's workload identity, and only over TLS, a unix socket or an
    /// intercepted connection).
    #[serde(default)]
    pub accept_passwords: bool,
    /// Principals `email:<address>` from addresses the issuer has not verified too.
    #[serde(default)]
    pub trust_unverified_email: bool,
}

impl Issuer {
    pub fn client_secret_path(&self) -> Option<PathBuf> {
        credential_path(self.client_secret_file.as_ref()?)
    }

    /// The `aud` values accepted.
    pub fn accepted_audiences(&self) -> Vec<String> {
        if self.audiences.is_empty() {
            vec![self.client_id.clone()]
        } else {
            self.audiences.clone()
        }
    }
}

fn default_oidc_scopes() -> Vec<String> {
    ["openid", "email", "profile", "groups", "offline_access"]
        .map(String::from)
        .to_vec()
}

fn default_introspect_secs() -> u64 {
    60
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_mfa_amr() -> Vec<String> {
    // RFC 8176: "mfa" itself, and factors that are never the first one alone.
    [
        "mfa", "otp", "hwk", "swk", "sms", "tel", "fpt", "face", "iris", "retina", "sc",
    ]
    .map(String::from)
    .to_vec()
}

/// `[people]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeopleSettings {
    /// The unix socket `pgiam login`, `logout`, `whoami` and `token` speak over. Any local
    /// user may open it: what it binds is decided by the peer's kernel credentials.
    #[serde(default = "default_login_socket")]
    pub socket: PathBuf,
    /// The longest a device-flow login waits for the person's approval.
    #[serde(default = "default_login_timeout_secs")]
    pub login_timeout_secs: u64,
}

impl Default for PeopleSettings {
    fn default() -> Self {
        PeopleSettings {
            socket: default_login_socket(),
            login_timeout_secs: default_login_timeout_secs(),
        }
    }
}

pub fn default_login_socket() -> PathBuf {
    "/run/pgiam/login.sock".into()
}

fn default_login_timeout_secs() -> u64 {
    600
}

/// A credential file's path: a relative one is resolved against `$CREDENTIALS_DIRECTORY`
/// (systemd `LoadCredential=`).
fn credential_path(path: &Path) -> Option<PathBuf> {
    if path.is_relative() {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            return Some(Path::new(&dir).join(path));
        }
    }
    Some(path.to_owned())
}

/// How pgiam writes its own log lines.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// The unix socket the CLI verbs speak over.
    #[serde(default = "default_admin_socket")]
    pub socket: PathBuf,
    /// Permission bits of the socket file. Who may give orders is decided by the peer's
    /// credentials (root, pgiam's own user, members of `group`) whatever these allow.
    #[serde(default = "default_admin_socket_mode")]
    pub socket_mode: u32,
    /// A group whose members may use the socket beside root; the socket file is given to it.
    pub group: Option<String>,
    /// Where Prometheus scrapes `/metrics`: a loopback address and port, e.g.
    /// `127.0.0.1:9187` (the metrics name roles and count refusals: not for the network).
    pub metrics: Option<SocketAddr>,
}

pub fn default_admin_socket() -> PathBuf {
    "/run/pgiam/admin.sock".into()
}

fn default_admin_socket_mode() -> u32 {
    0o660
}

/// `[policy]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Cedar policy file, validated against pgiam's schema (`pgiam policy schema`). Reloaded
    /// on SIGHUP; a file that does not validate is refused and the policy in force stays.
    pub file: PathBuf,
    /// The search_path a session starts with unless its client chooses one at startup (it is
    /// sent as a startup parameter, so a role's or database's default never applies; RESET
    /// returns to it). `$user` means the session's role. Unqualified names are authorized
    /// against these schemas and every schema a search_path the session sets later names.
    #[serde(default = "default_search_path")]
    pub search_path: Vec<String>,
    /// The user-defined operators and casts of a database (which functions they run, asked
    /// about as `execute`) are read from its catalog again once this old, and after DDL
    /// through pgiam.
    #[serde(default = "default_catalog_max_age_secs")]
    pub catalog_max_age_secs: u64,
}

fn default_catalog_max_age_secs() -> u64 {
    60
}

fn default_search_path() -> Vec<String> {
    vec!["public".into()]
}

impl PolicyConfig {
    /// The search_path as a setting value, each schema quoted as an identifier.
    pub fn search_path_setting(&self) -> String {
        self.search_path
            .iter()
            .map(|s| {
                // Simple lower-case names as they are (that is how PostgreSQL shows them);
                // anything else quoted, so the server reads exactly this name.
                let simple = s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if simple {
                    s.clone()
                } else {
                    format!("\"{}\"", s.replace('"', "\"\""))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// JSON Lines file, appended to (its hash chain continues across restarts).
    pub path: PathBuf,
    /// What a record waits for before its decision takes effect (see [`crate::audit::Durability`]).
    #[serde(default)]
    pub durability: crate::audit::Durability,
    /// The longest a record nobody waits for stays off the device: the background group flush's
    /// period (`changes`), or how long a record stays in memory (`buffered`).
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Rotate the file once it holds this many bytes (inside pgiam, the chain carried into the
    /// new file); absent: no rotation by size.
    pub rotate_size_bytes: Option<u64>,
    /// Rotate the file once it is this old; absent: no rotation by age.
    pub rotate_age_secs: Option<u64>,
    /// Rotated files kept (the oldest beyond are deleted); absent: all.
    pub keep_rotated: Option<usize>,
}

impl Audit {
    pub fn rotation(&self) -> crate::audit::rotate::Policy {
        crate::audit::rotate::Policy {
            max_bytes: self.rotate_size_bytes,
            max_age: self.rotate_age_secs.map(Duration::from_secs),
            keep: self.keep_rotated,
        }
    }
}

fn default_flush_interval_ms() -> u64 {
    100
}

/// `[interception]`: which connections the kernel sends to pgiam.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interception {
    /// cgroup v2 path (inside the hierarchy) whose processes are intercepted; `/` is the host.
    #[serde(default = "default_cgroup")]
    pub cgroup: String,
    /// Database addresses: IPs, CIDRs or host names (resolved and refreshed).
    pub endpoints: Vec<String>,
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
    /// sk_msg socket-to-socket redirect between the application and pgiam.
    #[serde(default = "default_true")]
    pub fast_path: bool,
    /// While pgiam is stopped, let intercepted connections through to the database instead of
    /// refusing them. Off by default: fail closed.
    #[serde(default)]
    pub fail_open: bool,
    /// Also intercept sockets bound to a network device (SO_BINDTODEVICE).
    #[serde(default)]
    pub intercept_bound_devices: bool,
    /// SO_MARK on pgiam's own upstream sockets; the kernel never redirects those.
    #[serde(default = "default_mark")]
    pub mark: u32,
    /// Where programs and maps are pinned (a versioned directory below it).
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// How often host names in `endpoints` are resolved again.
    #[serde(default = "default_resolve_interval_secs")]
    pub resolve_interval_secs: u64,
}

fn default_cgroup() -> String {
    "/".into()
}

fn default_ports() -> Vec<u16> {
    vec![5432]
}

fn default_true() -> bool {
    true
}

fn default_mark() -> u32 {
    // "pgia"
    0x7067_6961
}

fn default_bpffs_dir() -> PathBuf {
    "/sys/fs/bpf/pgiam".into()
}

fn default_resolve_interval_secs() -> u64 {
    30
}

/// An `endpoints` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSpec {
    Net { addr: std::net::IpAddr, prefix: u8 },
    Host(String),
}

impl EndpointSpec {
    pub fn parse(s: &str) -> Result<EndpointSpec, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        match addr.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let prefix = match prefix {
                    Some(p) => p
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= max)
                        .ok_or_else(|| format!("{s:?}: prefix must be 0..={max}"))?,
                    None => max,
                };
                Ok(EndpointSpec::Net { addr: ip, prefix })
            }
            Err(_)
                if prefix.is_none()
                    && !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') =>
            {
                Ok(EndpointSpec::Host(s.to_owned()))
            }
            Err(_) => Err(format!("{s:?} is neither an IP, a CIDR nor a host name")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Loopback TCP listener; the peer's identity is the kernel's record for a client in the
    /// intercepted subtree (intercepted, or dialling this address), else found through /proc.
    pub tcp: Option<SocketAddr>,
    /// IPv6 loopback listener (`[::1]:PORT`), where interception sends IPv6 connections.
    pub tcp6: Option<SocketAddr>,
    /// Unix socket path; the peer's identity comes from SO_PEERCRED.
    pub unix: Option<PathBuf>,
    /// Permission bits of the unix socket. Any local user may connect by default: what they
    /// may do is decided by their identity, not by who can open the socket.
    #[serde(default = "default_unix_mode")]
    pub unix_mode: u32,
}

fn default_unix_mode() -> u32 {
    0o666
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest frontend or backend message pgiam accepts, in bytes.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// Time from accept until the session is established (TLS, startup, upstream login).
    #[serde(default = "default_startup_timeout_secs")]
    pub startup_timeout_secs: u64,
    /// On SIGTERM, the longest pgiam waits for its sessions to end (each is told 57P01 and
    /// writes its end record) before it exits anyway.
    #[serde(default = "default_shutdown_timeout_secs")]
    pub shutdown_timeout_secs: u64,
    /// How long a client may leave a message half sent: a session whose client sent part of
    /// a message and then nothing for this long is ended (08P01), so that it does not hold its
    /// server connection for ever.
    #[serde(default = "default_message_timeout_secs")]
    pub message_timeout_secs: u64,
}

fn default_message_timeout_secs() -> u64 {
    30
}

fn default_shutdown_timeout_secs() -> u64 {
    10
}

fn default_max_message_size() -> usize {
    64 << 20
}

fn default_startup_timeout_secs() -> u64 {
    10
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: default_max_message_size(),
            startup_timeout_secs: default_startup_timeout_secs(),
            shutdown_timeout_secs: default_shutdown_timeout_secs(),
            message_timeout_secs: default_message_timeout_secs(),
        }
    }
}

impl Limits {
    pub fn startup_timeout(&self) -> Duration {
        Duration::from_secs(self.startup_timeout_secs)
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", tag = "mode", deny_unknown_fields)]
pub enum ClientTls {
    /// A CA pgiam creates in `state_dir` on first start (`client-ca.crt`), issuing each client
    /// a certificate for the name it dialled: `sslmode=require` works out of the box, and
    /// `verify-full` once clients trust that CA.
    #[default]
    Generate,
    /// The same with the operator's CA (PEM certificate and key).
    Ca { cert: PathBuf, key: PathBuf },
    /// An operator-provided certificate chain and key (PEM), shown to every client.
    Files { cert: PathBuf, key: PathBuf },
    /// SSLRequest is answered 'N'; direct-SSL connections are closed.
    Disabled,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Host name or IP address; a value starting with '/' is a unix socket directory.
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub tls: UpstreamTls,
    /// CA bundle (PEM) for `verify-full`.
    pub ca_file: Option<PathBuf>,
    /// Name checked against the server certificate; defaults to `host`.
    pub server_name: Option<String>,
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// `role-login`: log in as the mapped role with its own credentials. `gateway`: log in as
    /// `gateway_role` (NOINHERIT, a member of every mapped role) and SET ROLE to the mapped
    /// role; no client statement may then change the role.
    #[serde(default)]
    pub mode: UpstreamMode,
    /// The login role in `gateway` mode; its credentials are under `[roles.NAME]`.
    pub gateway_role: Option<String>,
    /// When a session's own server connection opens.
    #[serde(default)]
    pub connect: UpstreamConnect,
}

/// `at-login` (the default): every session's backend opens with its login, so the client is
/// told its backend's real pid (what `pg_terminate_backend`, `pg_stat_activity` and NOTIFY
/// senders name) and a login the server would refuse is refused at once. `deferred`: at the
/// session's first message, once a login with the same role, parameters and server has shown
/// pgiam what the server greets it with (until then, at login). Idle clients (a pool's spare
/// connections) then hold no backend, and are told a pid pgiam makes up, as a pooler's are.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamConnect {
    Deferred,
    #[default]
    AtLogin,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamMode {
    #[default]
    RoleLogin,
    Gateway,
}

fn default_port() -> u16 {
    5432
}

fn default_connect_timeout_secs() -> u64 {
    5
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    #[default]
    Disable,
    /// Encrypt, without verifying the server's certificate (libpq's `sslmode=require`).
    Require,
    /// Encrypt and verify the certificate chain against `ca_file` and the host name.
    VerifyFull,
}

impl Upstream {
    pub fn is_unix(&self) -> bool {
        self.host.starts_with('/')
    }

    pub fn unix_path(&self) -> PathBuf {
        Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleCredentials {
    /// File holding the role's password (a trailing newline is ignored). Read at every login,
    /// so a rotated password needs no restart. A relative path is resolved against
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
    pub password_file: Option<PathBuf>,
}

impl RoleCredentials {
    pub fn password_path(&self) -> Option<PathBuf> {
        credential_path(self.password_file.as_ref()?)
    }
}

/// One rule: a principal connecting to a database becomes a database role. Rules are tried in
/// file order and the first that matches decides, as in a firewall.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// A principal name such as `unit:billing-api.service`, `user:deploy` or `uid:1001`.
    pub principal: String,
    /// The database the client asks for, or `*` for any.
    pub database: String,
    /// The database role pgiam logs in as.
    pub role: String,
    /// Whether a backend outlives its client (`session`: reset and kept for the next client
    /// with the same login) or closes with it (`none`, the default).
    #[serde(default)]
    pub pool: PoolMode,
}

/// How a mapping's sessions get their backends.
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    /// Each session opens its own backend and closes it at its end.
    #[default]
    None,
    /// A backend whose client has left is reset (DISCARD ALL, then a check that it is back to
    /// its login state) and kept for the next session with the same login role, database,
    /// startup parameters and server.
    Session,
    /// As `session`, and besides, between two transactions of a session its backend goes
    /// back to the pool for the next transaction of any session of the same principal (the
    /// identity the mapping matched), role, database and startup parameters. A session that
    /// leaves state in its backend that must outlive the transaction (session SET, LISTEN,
    /// temporary objects, WITH HOLD cursors, SQL PREPARE, session advisory locks) keeps the
    /// backend until it ends. A backend goes to another principal only after the reset.
    Transaction,
}

/// `[pool]`: the limits every pooled mapping shares.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Idle backends kept per login (role, database, startup parameters, server).
    #[serde(default = "default_pool_size")]
    pub size: usize,
    /// The most backends pooled mappings hold open to one server, in use and idle; a session
    /// that needs one beyond it waits in a queue.
    #[serde(default = "default_pool_max_backends")]
    pub max_backends: usize,
    /// How long a session waits in that queue before it is refused (53300).
    #[serde(default = "default_pool_queue_timeout_secs")]
    pub queue_timeout_secs: u64,
    /// An idle backend unused this long is closed.
    #[serde(default = "default_pool_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// A backend older than this is closed when its client leaves, not reused.
    #[serde(default = "default_pool_max_lifetime_secs")]
    pub max_lifetime_secs: u64,
}

fn default_pool_size() -> usize {
    20
}

fn default_pool_max_backends() -> usize {
    100
}

fn default_pool_queue_timeout_secs() -> u64 {
    10
}

fn default_pool_idle_timeout_secs() -> u64 {
    300
}

fn default_pool_max_lifetime_secs() -> u64 {
    3600
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            size: default_pool_size(),
            max_backends: default_pool_max_backends(),
            queue_timeout_secs: default_pool_queue_timeout_secs(),
            idle_timeout_secs: default_pool_idle_timeout_secs(),
            max_lifetime_secs: default_pool_max_lifetime_secs(),
        }
    }
}

impl Pool {
    pub fn queue_timeout(&self) -> Duration {
        Duration::from_secs(self.queue_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    pub fn max_lifetime(&self) -> Duration {
        Duration::from_secs(self.max_lifetime_secs)
    }
}

impl Mapping {
    fn matches_database(&self, database: &str) -> bool {
        self.database == "*" || self.database == database
    }
}

/// Principal name prefixes that identity produces (see `identity::Identity::principals`).
pub const PRINCIPAL_KINDS: &[&str] = &[
    "uid",
    "gid",
    "user",
    "group",
    "unit",
    "cgroup",
    "container",
    "exe",
    // People (`pgiam login`, or an ID token as password): see `people::Person::principals`.
    "oidc",
    "oidc-group",
    "email",
];

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.listen.tcp.is_none() && self.listen.unix.is_none() {
            return Err("[listen] needs `tcp`, `unix` or both".into());
        }
        for addr in self.listen.tcp.iter().chain(&self.listen.tcp6) {
            // Identity of a TCP peer is read from this host's /proc: a remote peer has none.
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "listen.tcp = {addr}: only loopback addresses are allowed, because the \
                     client's identity is taken from this host's kernel"
                ));
            }
        }
        if let Some(i) = &self.interception {
            if !self.listen.tcp.is_some_and(|a| a.is_ipv4()) {
                return Err(
                    "[interception] needs an IPv4 listen.tcp to send connections to".into(),
                );
            }
            if self.listen.tcp6.is_some_and(|a| a.is_ipv4()) {
                return Err("listen.tcp6 must be an IPv6 address such as \"[::1]:6432\"".into());
            }
            if i.endpoints.is_empty() {
                return Err("interception.endpoints is empty: nothing would be intercepted".into());
            }
            for e in &i.endpoints {
                EndpointSpec::parse(e).map_err(|m| format!("interception.endpoints: {m}"))?;
            }
            if i.ports.is_empty() || i.ports.contains(&0) {
                return Err("interception.ports must list ports from 1 to 65535".into());
            }
            if i.mark == 0 {
                return Err("interception.mark must not be 0".into());
            }
            if !i.cgroup.starts_with('/') {
                return Err(
                    "interception.cgroup is a path such as \"/\" or \"/system.slice\"".into(),
                );
            }
            if i.resolve_interval_secs == 0 {
                return Err("interception.resolve_interval_secs must be at least 1".into());
            }
        }
        if let Some(a) = &self.audit {
            if a.rotate_size_bytes.is_some_and(|b| b < 4096) {
                return Err("audit.rotate_size_bytes must be at least 4096".into());
            }
            if a.rotate_age_secs == Some(0) {
                return Err("audit.rotate_age_secs must be at least 1".into());
            }
            if a.keep_rotated == Some(0) {
                return Err(
                    "audit.keep_rotated must be at least 1 (leave it out to keep every file)"
                        .into(),
                );
            }
        }
        if let Some(a) = &self.admin {
            if let Some(m) = a.metrics {
                if !m.ip().is_loopback() {
                    return Err(format!(
                        "admin.metrics = \"{m}\": metrics are served on a loopback address only \
                         (e.g. \"127.0.0.1:9187\"); expose them through your scraper's agent"
                    ));
                }
            }
            if a.socket_mode & !0o777 != 0 {
                return Err("admin.socket_mode takes permission bits only (e.g. 0o660)".into());
            }
        }
        if self.pool.size == 0 && self.mappings.iter().any(|m| m.pool != PoolMode::None) {
            return Err("pool.size must be at least 1 when a mapping pools".into());
        }
        if self.pool.max_backends == 0 {
            return Err("pool.max_backends must be at least 1".into());
        }
        if self.pool.queue_timeout_secs == 0
            || self.pool.idle_timeout_secs == 0
            || self.pool.max_lifetime_secs == 0
        {
            return Err(
                "pool.queue_timeout_secs, idle_timeout_secs and max_lifetime_secs must be at least 1"
                    .into(),
            );
        }
        if self.limits.max_message_size < 1024 {
            return Err("limits.max_message_size must be at least 1024".into());
        }
        if self.limits.message_timeout_secs == 0 {
            return Err("limits.message_timeout_secs must be at least 1".into());
        }
        if self.limits.startup_timeout_secs == 0 {
            return Err("limits.startup_timeout_secs must be at least 1".into());
        }
        if self.upstream.is_unix() && self.upstream.tls != UpstreamTls::Disable {
            return Err("upstream.tls must be \"disable\" for a unix socket upstream".into());
        }
        if self.upstream.tls == UpstreamTls::VerifyFull && self.upstream.ca_file.is_none() {
            return Err("upstream.tls = \"verify-full\" needs upstream.ca_file".into());
        }
        if self.policy.search_path.is_empty()
            || self
                .policy
                .search_path
                .iter()
                .any(|s| s.is_empty() || s.contains('\0'))
        {
            return Err("policy.search_path must list schema names".into());
        }
        self.validate_issuers()?;
        let gateway = match (self.upstream.mode, &self.upstream.gateway_role) {
            (UpstreamMode::Gateway, Some(g)) => {
                if !self.roles.contains_key(g) {
                    return Err(format!(
                        "upstream.gateway_role {g:?} has no [roles.{g}] entry with its credentials"
                    ));
                }
                true
            }
            (UpstreamMode::Gateway, None) => {
                return Err("upstream.mode = \"gateway\" needs upstream.gateway_role".into())
            }
            (UpstreamMode::RoleLogin, Some(_)) => {
                return Err("upstream.gateway_role is only used with mode = \"gateway\"".into())
            }
            (UpstreamMode::RoleLogin, None) => false,
        };
        for (i, m) in self.mappings.iter().enumerate() {
            let where_ = format!("mapping #{} ({})", i + 1, m.principal);
            let Some((kind, value)) = m.principal.split_once(':') else {
                return Err(format!("{where_}: a principal is written KIND:VALUE"));
            };
            if !PRINCIPAL_KINDS.contains(&kind) || value.is_empty() {
                return Err(format!(
                    "{where_}: unknown principal kind {kind:?}; expected one of {}",
                    PRINCIPAL_KINDS.join(", ")
                ));
            }
            if m.database.is_empty() || m.role.is_empty() {
                return Err(format!("{where_}: database and role must not be empty"));
            }
            if !gateway && !self.roles.contains_key(&m.role) {
                return Err(format!(
                    "{where_}: role {:?} has no [roles.{}] entry with its credentials",
                    m.role, m.role
                ));
            }
        }
        Ok(())
    }

    fn validate_issuers(&self) -> Result<(), String> {
        let mut aliases = std::collections::HashSet::new();
        for i in &self.issuers {
            let where_ = format!("[[oidc]] {:?}", i.alias);
            if i.alias.is_empty()
                || !i
                    .alias
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "{where_}: alias takes lower-case letters, digits, '-' and '_'"
                ));
            }
            if !aliases.insert(&i.alias) {
                return Err(format!("{where_}: alias used twice"));
            }
            let url = reqwest::Url::parse(&i.issuer)
                .map_err(|e| format!("{where_}: issuer {:?} is not a URL: {e}", i.issuer))?;
            let loopback = url.host_str().is_some_and(|h| {
                h == "localhost"
                    || h.trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|a| a.is_loopback())
            });
            if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
                return Err(format!(
                    "{where_}: issuer must be https (http only on a loopback address)"
                ));
            }
            if i.client_id.is_empty() {
                return Err(format!("{where_}: client_id must not be empty"));
            }
            if !i.scopes.iter().any(|s| s == "openid") {
                return Err(format!("{where_}: scopes must include \"openid\""));
            }
        }
        if self.people.login_timeout_secs == 0 {
            return Err("people.login_timeout_secs must be at least 1".into());
        }
        for m in &self.mappings {
            let alias = match m.principal.split_once(':') {
                Some(("oidc" | "oidc-group", rest)) => rest.split(':').next(),
                _ => None,
            };
            if let Some(alias) = alias {
                if !self.issuers.iter().any(|i| i.alias == alias) {
                    return Err(format!(
                        "mapping {}: no [[oidc]] issuer has alias {alias:?}",
                        m.principal
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether a person whose ID token is given as password could be mapped on `database`:
    /// some mapping of it names a person (`oidc:`, `oidc-group:` of an issuer that accepts
    /// tokens as passwords, or `email:` when one does).
    pub fn token_password_may_map(&self, database: &str) -> bool {
        let accepts = |alias: &str| {
            self.issuers
                .iter()
                .any(|i| i.accept_passwords && (alias.is_empty() || i.alias == alias))
        };
        self.mappings.iter().any(|m| {
            m.matches_database(database)
                && match m.principal.split_once(':') {
                    Some(("oidc" | "oidc-group", rest)) => {
                        accepts(rest.split(':').next().unwrap_or_default())
                    }
                    Some(("email", _)) => accepts(""),
                    _ => false,
                }
        })
    }

    /// The first mapping whose principal is one of `principals` and whose database matches.
    pub fn find_mapping<'a>(
        &'a self,
        principals: &[String],
        database: &str,
    ) -> Option<&'a Mapping> {
        self.mappings
            .iter()
            .find(|m| m.matches_database(database) && principals.contains(&m.principal))
    }
}

#[cfg(test)]
mod tests;
