use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use pgiam::admin::protocol::Request;
use pgiam::audit::read as audit_read;

/// pgiam: identity-aware access layer for PostgreSQL.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Path to pgiam.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit.
    CheckConfig {
        /// Path to pgiam.toml.
        config: PathBuf,
    },
    /// Remove pinned eBPF programs and maps: interception stops for every process.
    UninstallBpf {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show how pgiam reads SQL: per statement, the command, every relation with its access,
    /// the functions called, and role changes, DO blocks, COPY PROGRAM and server file access.
    Sql {
        #[command(subcommand)]
        command: SqlCommand,
    },
    /// Statement policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print the eBPF interception counters.
    BpfStats {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List the live sessions (over the admin socket).
    Sessions {
        #[command(flatten)]
        target: AdminTarget,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Only sessions answering to this principal (any name of theirs, e.g. uid:1000).
        #[arg(long)]
        principal: Option<String>,
        /// Only sessions with this database role.
        #[arg(long)]
        role: Option<String>,
        /// Only sessions on this database.
        #[arg(long)]
        db: Option<String>,
    },
    /// End a session, or every session of a principal, now: its running statement is
    /// cancelled and the client told FATAL 57P01; the audit log names you.
    Kill {
        #[command(flatten)]
        target: AdminTarget,
        /// The session id (`pgiam sessions` shows it).
        #[arg(required_unless_present = "principal", conflicts_with = "principal")]
        session: Option<String>,
        /// Every session answering to this principal.
        #[arg(long)]
        principal: Option<String>,
    },
    /// Refuse a principal's new sessions and end its live ones; kept across restarts.
    Revoke {
        #[command(flatten)]
        target: AdminTarget,
        /// The principal, e.g. unit:billing.service, uid:1000.
        #[arg(long)]
        principal: String,
        /// How long, e.g. 30m, 2h, 1d; without it, until `pgiam unrevoke`.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Why, for the audit log and the client's error.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a revocation.
    Unrevoke {
        #[command(flatten)]
        target: AdminTarget,
        #[arg(long)]
        principal: String,
    },
    /// List the revocations in force.
    Revocations {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Log in as yourself with your organisation's identity provider (OAuth device flow: open
    /// the link shown, on any device). Every connection from this login session then carries
    /// you, with no change to any tool or DSN, until you log out or the login expires.
    Login {
        #[command(flatten)]
        target: LoginTarget,
        /// The issuer's alias (`[[oidc]] alias`), when pgiam knows several.
        #[arg(long)]
        issuer: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// End your login: the sessions that carry it end too.
    Logout {
        #[command(flatten)]
        target: LoginTarget,
    },
    /// Who this login session is logged in as.
    Whoami {
        #[command(flatten)]
        target: LoginTarget,
        #[arg(long)]
        json: bool,
    },
    /// Print your login's ID token, for a tool that can only give it as its password.
    Token {
        #[command(flatten)]
        target: LoginTarget,
    },
    /// Version, uptime, policy, interception, audit and upstream state of the running pgiam.
    Status {
        #[command(flatten)]
        target: AdminTarget,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Where the login socket is.
#[derive(clap::Args)]
struct LoginTarget {
    /// pgiam's login socket (`[people] socket`).
    #[arg(long, default_value = "/run/pgiam/login.sock")]
    socket: PathBuf,
}

/// Where the admin socket is: `--socket`, or the `[admin] socket` of `--config`.
#[derive(clap::Args)]
struct AdminTarget {
    /// pgiam.toml of the running pgiam.
    #[arg(long, short, default_value = "/etc/pgiam/pgiam.toml")]
    config: PathBuf,
    /// The admin socket itself (instead of reading it from the config).
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl AdminTarget {
    /// Reads only `[admin] socket`: an operator may read the config without its secrets
    /// being valid for them.
    fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        let text = std::fs::read_to_string(&self.config).with_context(|| {
            format!(
                "reading {} (give --socket to name the admin socket instead)",
                self.config.display()
            )
        })?;
        let value: toml::Value = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", self.config.display()))?;
        let admin = value.get("admin").with_context(|| {
            format!(
                "{} has no [admin] section: the running pgiam has no admin socket",
                self.config.display()
            )
        })?;
        Ok(match admin.get("socket").and_then(|s| s.as_str()) {
            Some(s) => PathBuf::from(s),
            None => pgiam::config::default_admin_socket(),
        })
    }
}

#[derive(Subcommand)]
enum SqlCommand {
    /// Classify a query string (one JSON object per statement).
    Classify {
        /// The SQL text, as a client would send it in a Query message.
        sql: String,
        /// Parse as a server with standard_conforming_strings = off does.
        #[arg(long)]
        no_standard_conforming_strings: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a Cedar policy file against pgiam's schema.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Print the Cedar schema policies are validated against.
    Schema,
    /// Decide a query string as pgiam would for a principal, and say why.
    Test {
        /// The policy file; or give --config to use the one pgiam.toml names.
        #[arg(long, required_unless_present = "config")]
        policy: Option<PathBuf>,
        /// pgiam.toml: its policy file, search_path, upstream mode and mappings.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The principal, e.g. unit:billing.service, user:alice, uid:1000.
        #[arg(long = "as")]
        principal: String,
        /// The database.
        #[arg(long)]
        db: String,
        /// The database role (default: from the config's mapping, else the principal's value).
        #[arg(long)]
        role: Option<String>,
        /// The query string.
        #[arg(long)]
        sql: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check an audit file's hash chain and the references between its records.
    ///
    /// The chain: every line intact, none removed, inserted or moved. The references: each
    /// execution's `of` names an earlier statement record of a session still open, each
    /// completion's an earlier decision record. Prints the number of records, statements,
    /// executions and completions. Exit status 0: intact; 1: not, and the first line at fault
    /// is named; 2: the file cannot be read.
    ///
    /// Several files are a rotated set, oldest first: each must start where the one before it
    /// ends (`--rotated FILE` finds FILE's rotated predecessors itself).
    Verify {
        /// The JSON Lines audit file(s), oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Verify FILE together with its rotated files (FILE.<time>), oldest first.
        #[arg(long)]
        rotated: bool,
    },
    /// Print every record with the statement each execution runs put in.
    ///
    /// One JSON object per line; an execution gets the SQL, classification, session,
    /// principal, role and database of the statement record it points to, so that every line
    /// reads on its own. The hash chain is not checked (`verify` does that). Exit status 0:
    /// every reference resolved; 1: some did not (those records are printed as they are, the
    /// problems on stderr); 2: the input cannot be read.
    Expand {
        /// The JSON Lines audit file; `-` reads standard input.
        file: PathBuf,
    },
}

fn bpffs_dir(config: &std::path::Path) -> anyhow::Result<PathBuf> {
    let c = pgiam::config::Config::load(config)?;
    let i = c
        .interception
        .with_context(|| format!("{}: no [interception] section", config.display()))?;
    Ok(i.bpffs_dir)
}

/// Log lines on stderr (journald takes them from there): text for people, or one JSON object
/// per line for log pipelines (`log_format = "json"`).
fn init_logging(format: pgiam::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        pgiam::config::LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        pgiam::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config: path } => {
            let config = pgiam::config::Config::load(&path)?;
            init_logging(config.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                // Statements are classified in place on these threads (see CLASSIFY_STACK):
                // reserved address space, committed only as deep statements touch it.
                .thread_stack_size(pgiam::sql::CLASSIFY_STACK + (16 << 20))
                .build()
                .context("starting the runtime")?
                .block_on(pgiam::server::run(config, &path))
        }
        command => {
            // A command's output piped into `head` ends quietly when the reader goes, as
            // other command-line tools do (Rust ignores SIGPIPE, so a print would panic).
            // Not for `run`: a client that goes must never end the proxy.
            // SAFETY: before any thread exists; restores the default disposition only.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
            init_logging(pgiam::config::LogFormat::Text);
            tool(command)
        }
    }
}

/// Every command but `run`.
fn tool(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { .. } => unreachable!("run is handled by main"),
        Command::Audit { command } => std::process::exit(audit_command(command)),
        Command::Sessions {
            target,
            json,
            principal,
            role,
            db,
        } => {
            let filter = pgiam::admin::client::Filter {
                principal,
                role,
                database: db,
            };
            let result = admin_ask(&target, &Request::Sessions)?;
            let sessions: Vec<serde_json::Value> = result
                .as_array()
                .context("pgiam answered sessions with something else than a list")?
                .iter()
                .filter(|s| filter.keeps(s))
                .cloned()
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&sessions)?);
            } else {
                let now = pgiam::admin::registry::unix_ms(std::time::SystemTime::now());
                print!("{}", pgiam::admin::client::sessions_table(&sessions, now));
            }
            Ok(())
        }
        Command::Kill {
            target,
            session,
            principal,
        } => {
            let result = admin_ask(&target, &Request::Kill { session, principal })?;
            for id in result["killed"].as_array().into_iter().flatten() {
                println!("killed {}", id.as_str().unwrap_or("?"));
            }
            Ok(())
        }
        Command::Revoke {
            target,
            principal,
            duration,
            reason,
        } => {
            let result = admin_ask(
                &target,
                &Request::Revoke {
                    principal: principal.clone(),
                    for_secs: duration.map(|d| d.as_secs().max(1)),
                    reason,
                },
            )?;
            let ended = result["sessions"].as_array().map_or(0, Vec::len);
            if result["audited"] == false {
                eprintln!("pgiam: warning: the revocation is in force but not in the audit log");
            }
            match duration {
                Some(d) => println!(
                    "revoked {principal} for {}; {ended} live session(s) ended",
                    humantime::format_duration(d)
                ),
                None => {
                    println!("revoked {principal} until unrevoked; {ended} live session(s) ended")
                }
            }
            Ok(())
        }
        Command::Unrevoke { target, principal } => {
            admin_ask(
                &target,
                &Request::Unrevoke {
                    principal: principal.clone(),
                },
            )?;
            println!("unrevoked {principal}");
            Ok(())
        }
        Command::Revocations { target } => {
            let result = admin_ask(&target, &Request::Revocations)?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
        Command::Login {
            target,
            issuer,
            json,
        } => {
            use std::io::Write as _;
            let request = pgiam::people::socket::Request::Login { issuer };
            let result = pgiam::people::client::ask(&target.socket, &request, |pending| {
                let p = &pending["pending"];
                let code = p["user_code"].as_str().unwrap_or("?");
                println!(
                    "To log in, go to {} and enter the code {code}",
                    p["verification_uri"].as_str().unwrap_or("?")
                );
                if let Some(url) = p["verification_uri_complete"].as_str() {
                    println!("or open {url}");
                }
                eprintln!("Waiting for your approval…");
                let _ = std::io::stdout().flush();
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                println!("Logged in: {}", pgiam::people::client::describe(&result));
            }
            Ok(())
        }
        Command::Logout { target } => {
            let result = pgiam::people::client::ask(
                &target.socket,
                &pgiam::people::socket::Request::Logout,
                |_| {},
            )?;
            let ended = result["sessions"].as_array().map_or(0, Vec::len);
            println!(
                "Logged out {}; {ended} session(s) ended",
                result["person"]["subject"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        Command::Whoami { target, json } => {
            let result = pgiam::people::client::ask(
                &target.socket,
                &pgiam::people::socket::Request::Whoami,
                |_| {},
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                println!("{}", pgiam::people::client::describe(&result));
            }
            Ok(())
        }
        Command::Token { target } => {
            let result = pgiam::people::client::ask(
                &target.socket,
                &pgiam::people::socket::Request::Token,
                |_| {},
            )?;
            println!(
                "{}",
                result["id_token"]
                    .as_str()
                    .context("pgiam answered without a token")?
            );
            Ok(())
        }
        Command::Status { target, json } => {
            let result = admin_ask(&target, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                print!("{}", status_text(&result));
            }
            Ok(())
        }
        Command::Sql {
            command:
                SqlCommand::Classify {
                    sql,
                    no_standard_conforming_strings,
                },
        } => {
            for statement in pgiam::sql::classify(&sql, !no_standard_conforming_strings)? {
                println!("{}", serde_json::to_string(&statement)?);
            }
            Ok(())
        }
        Command::Policy { command } => policy_command(command),
        Command::UninstallBpf { config } => {
            let dir = bpffs_dir(&config)?;
            let n = pgiam::redirect::uninstall(&dir)
                .with_context(|| format!("removing pins under {}", dir.display()))?;
            println!("removed {n} pinned objects under {}", dir.display());
            Ok(())
        }
        Command::BpfStats { config } => {
            for (name, value) in pgiam::redirect::read_stats(&bpffs_dir(&config)?)? {
                println!("{name} {value}");
            }
            Ok(())
        }
        Command::CheckConfig { config } => {
            let c = pgiam::config::Config::load(&config)?;
            let policy = pgiam::policy::Policy::load(&c.policy.file)?;
            println!(
                "{}: ok ({} mappings, {} roles, {} policies)",
                config.display(),
                c.mappings.len(),
                c.roles.len(),
                policy.len()
            );
            Ok(())
        }
    }
}

/// Asks the running pgiam; an error answer ends the CLI with status 1, an unreachable socket
/// with status 2.
fn admin_ask(target: &AdminTarget, request: &Request) -> anyhow::Result<serde_json::Value> {
    let socket = target.socket()?;
    let answer = match pgiam::admin::client::ask(&socket, request) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pgiam: {e:#}");
            std::process::exit(2);
        }
    };
    if !answer.ok {
        eprintln!(
            "pgiam: {}",
            answer.error.as_deref().unwrap_or("the request failed")
        );
        std::process::exit(1);
    }
    Ok(answer.result.unwrap_or(serde_json::Value::Null))
}

/// `pgiam status` for people.
fn status_text(s: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pgiam {} (pid {}), up {}",
        s["version"].as_str().unwrap_or("?"),
        s["pid"],
        humantime::format_duration(std::time::Duration::from_secs(
            s["uptime_secs"].as_u64().unwrap_or(0)
        ))
    );
    let c = &s["config"];
    let _ = writeln!(
        out,
        "config:       {} (generation {})",
        c["file"].as_str().unwrap_or("?"),
        c["generation"]
    );
    let p = &s["policy"];
    let _ = writeln!(
        out,
        "policy:       {} ({} policies, generation {})",
        p["file"].as_str().unwrap_or("?"),
        p["policies"],
        p["generation"]
    );
    let _ = writeln!(
        out,
        "sessions:     {} live, {} since start; {} principal(s) revoked",
        s["sessions"]["live"], s["sessions"]["total"], s["revocations"]
    );
    let pool = &s["pool"];
    let _ = writeln!(
        out,
        "pool:         {} backend(s) in use, {} idle; {} session(s) waiting",
        pool["in_use"], pool["idle"], pool["waiting"]
    );
    let i = &s["interception"];
    if i.is_null() {
        let _ = writeln!(out, "interception: off (explicit clients only)");
    } else {
        let counters = match i["counters"].as_object() {
            Some(c) if !c.contains_key("error") => c
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            _ => format!("unreadable: {}", i["counters"]["error"]),
        };
        let _ = writeln!(
            out,
            "interception: cgroup {} ports {} fast path {}; {counters}",
            i["cgroup"].as_str().unwrap_or("?"),
            i["ports"],
            i["fast_path"]
        );
    }
    let a = &s["audit"];
    if a.is_null() {
        let _ = writeln!(out, "audit:        off");
    } else {
        let _ = writeln!(
            out,
            "audit:        {} ({}), {} records since start, {} on the device, {} bytes{}",
            a["path"].as_str().unwrap_or("?"),
            a["durability"].as_str().unwrap_or("?"),
            a["records"],
            a["synced"],
            a["bytes"],
            match a["failed"].as_str() {
                Some(e) => format!("; FAILED: {e}"),
                None => String::new(),
            }
        );
    }
    let u = &s["upstream"];
    let _ = match u["reachable"].as_bool() {
        Some(true) => writeln!(
            out,
            "upstream:     {} reachable ({:.1} ms)",
            u["address"].as_str().unwrap_or("?"),
            u["connect_ms"].as_f64().unwrap_or(0.0)
        ),
        _ => writeln!(
            out,
            "upstream:     {} UNREACHABLE: {}",
            u["address"].as_str().unwrap_or("?"),
            u["error"].as_str().unwrap_or("?")
        ),
    };
    out
}

/// Runs an audit subcommand; returns its exit status (0 intact, 1 not, 2 cannot read).
fn audit_command(command: AuditCommand) -> i32 {
    use std::io::{BufReader, Write};
    const INTACT: i32 = 0;
    const BROKEN: i32 = 1;
    const UNREADABLE: i32 = 2;
    match command {
        AuditCommand::Verify { mut files, rotated } => {
            if rotated {
                let mut set = Vec::new();
                for f in &files {
                    match pgiam::audit::rotate::rotated_files(f) {
                        Ok(older) => set.extend(older),
                        Err(e) => {
                            eprintln!(
                                "pgiam: cannot list the rotated files of {}: {e}",
                                f.display()
                            );
                            return UNREADABLE;
                        }
                    }
                    set.push(f.clone());
                }
                files = set;
            }
            let name = match files.as_slice() {
                [one] => one.display().to_string(),
                [.., last] => format!("{} and {} rotated file(s)", last.display(), files.len() - 1),
                [] => unreachable!("clap requires a file"),
            };
            match pgiam::audit::verify_set(&files) {
                Err(e) => {
                    eprintln!("pgiam: cannot read {name}: {e}");
                    return UNREADABLE;
                }
                Ok(Err((i, pgiam::audit::Verified::Broken { line, reason }))) => {
                    eprintln!("{}: line {line}: {reason}", files[i].display());
                    return BROKEN;
                }
                Ok(_) => {}
            }
            // References across the whole set, read as one stream.
            let mut first = Vec::new();
            let mut continues = None;
            let opened: std::io::Result<Vec<std::fs::File>> =
                files.iter().map(std::fs::File::open).collect();
            let checked = opened.and_then(|opened| {
                let mut chained: Box<dyn std::io::Read> = Box::new(std::io::empty());
                for f in opened {
                    chained = Box::new(std::io::Read::chain(chained, f));
                }
                let mut input = BufReader::new(chained);
                std::io::BufRead::read_until(&mut input, b'\n', &mut first)?;
                continues = pgiam::audit::rotate::continues_from(first.trim_ascii_end());
                let continuing = continues.is_some();
                let reader = if continuing {
                    audit_read::Reader::continuing()
                } else {
                    audit_read::Reader::new()
                };
                audit_read::check_with(reader, std::io::Read::chain(&first[..], input))
            });
            match checked {
                Err(e) => {
                    eprintln!("pgiam: cannot read {name}: {e}");
                    UNREADABLE
                }
                Ok(Err(broken)) => {
                    eprintln!("{name}: {broken}");
                    BROKEN
                }
                Ok(Ok(c)) => {
                    let mut earlier = if c.earlier > 0 {
                        format!(" ({} point before the first file: rotated away)", c.earlier)
                    } else {
                        String::new()
                    };
                    if let Some((file, _)) = &continues {
                        earlier.push_str(&format!("; it continues {file}, which was not checked"));
                    }
                    println!(
                        "{name}: {} records, hash chain intact; {} statements, {} executions, \
                         {} completions, every reference resolved{earlier}",
                        c.records, c.statements, c.executions, c.completions
                    );
                    INTACT
                }
            }
        }
        AuditCommand::Expand { file } => {
            let name = file.display();
            let input: Box<dyn std::io::BufRead> = if file.as_os_str() == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                match std::fs::File::open(&file) {
                    Ok(f) => Box::new(BufReader::new(f)),
                    Err(e) => {
                        eprintln!("pgiam: cannot read {name}: {e}");
                        return UNREADABLE;
                    }
                }
            };
            let out = std::io::BufWriter::new(std::io::stdout().lock());
            match audit_read::expand(input, out) {
                Ok((_, problems)) if problems.is_empty() => INTACT,
                Ok((_, problems)) => {
                    let mut err = std::io::stderr().lock();
                    for p in &problems {
                        let _ = writeln!(err, "{name}: {p}");
                    }
                    BROKEN
                }
                // The reader stopped early (`expand … | head`): not a fault of the file.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => INTACT,
                Err(e) => {
                    eprintln!("pgiam: expanding {name}: {e}");
                    UNREADABLE
                }
            }
        }
    }
}

fn policy_command(command: PolicyCommand) -> anyhow::Result<()> {
    use pgiam::policy::{Policy, Principal, Resolver};
    match command {
        PolicyCommand::Check { file } => {
            let p = Policy::load(&file)?;
            println!("{}: ok ({} policies)", file.display(), p.len());
            Ok(())
        }
        PolicyCommand::Schema => {
            print!("{}", pgiam::policy::SCHEMA.trim_start());
            Ok(())
        }
        PolicyCommand::Test {
            policy,
            config,
            principal,
            db,
            role,
            sql,
        } => {
            let config = config
                .map(|c| pgiam::config::Config::load(&c))
                .transpose()?;
            let file = match (&policy, &config) {
                (Some(p), _) => p.clone(),
                (None, Some(c)) => c.policy.file.clone(),
                (None, None) => unreachable!("clap requires one"),
            };
            let policy = Policy::load(&file)?;
            let (kind, value) = principal
                .split_once(':')
                .with_context(|| format!("{principal:?}: a principal is written KIND:VALUE"))?;
            let role = role
                .or_else(|| {
                    let c = config.as_ref()?;
                    Some(
                        c.find_mapping(std::slice::from_ref(&principal), &db)?
                            .role
                            .clone(),
                    )
                })
                .unwrap_or_else(|| value.to_owned());
            let identity = pgiam::identity::Identity::for_principal(kind, value)
                .with_context(|| format!("{principal:?}: unknown principal kind {kind:?}"))?;
            let who = Principal::new(&principal, &role, &db, &identity);
            let search_path = config
                .as_ref()
                .map(|c| c.policy.search_path.clone())
                .unwrap_or_else(|| vec!["public".into()]);
            let gateway = config
                .as_ref()
                .is_some_and(|c| c.upstream.mode == pgiam::config::UpstreamMode::Gateway);
            let mut resolver = Resolver::new(&search_path, &role);
            let statements = pgiam::sql::classify(&sql, true)?;
            let decision = statements
                .iter()
                .find_map(|s| pgiam::policy::fixed_refusal(s, gateway))
                .unwrap_or_else(|| {
                    // As in a session: a search_path set by one statement is searched from
                    // that statement on.
                    let mut asks = Vec::new();
                    for s in &statements {
                        if let Err(d) = resolver.widen_for(s) {
                            return d;
                        }
                        asks.extend(resolver.asks(s));
                    }
                    policy.decide_all(&who, &asks)
                });
            let connect = policy.decide(
                &who,
                &pgiam::policy::Ask::on_database(pgiam::policy::Action::Connect, "connect"),
            );
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "decision": if decision.allowed { "allow" } else { "deny" },
                    "policies": decision.policies,
                    "denied": decision.denied,
                    "reason": decision.reason,
                    "connect": if connect.allowed { "allow" } else { "deny" },
                    "principal": principal,
                    "role": role,
                    "database": db,
                    "statements": statements,
                }))?
            );
            if decision.allowed {
                Ok(())
            } else {
                std::process::exit(2)
            }
        }
    }
}
