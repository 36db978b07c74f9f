use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    Verify {
        /// The JSON Lines audit file.
        file: PathBuf,
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            let config = pgiam::config::Config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(pgiam::server::run(config))
        }
        Command::Audit { command } => std::process::exit(audit_command(command)),
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

/// Runs an audit subcommand; returns its exit status (0 intact, 1 not, 2 cannot read).
fn audit_command(command: AuditCommand) -> i32 {
    use std::io::{BufReader, Write};
    const INTACT: i32 = 0;
    const BROKEN: i32 = 1;
    const UNREADABLE: i32 = 2;
    match command {
        AuditCommand::Verify { file } => {
            let name = file.display();
            match pgiam::audit::verify(&file) {
                Err(e) => {
                    eprintln!("pgiam: cannot read {name}: {e}");
                    return UNREADABLE;
                }
                Ok(pgiam::audit::Verified::Broken { line, reason }) => {
                    eprintln!("{name}: line {line}: {reason}");
                    return BROKEN;
                }
                Ok(pgiam::audit::Verified::Intact { .. }) => {}
            }
            let checked =
                std::fs::File::open(&file).and_then(|f| audit_read::check(BufReader::new(f)));
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
                    println!(
                        "{name}: {} records, hash chain intact; {} statements, {} executions, \
                         {} completions, every reference resolved",
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
