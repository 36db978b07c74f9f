use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
enum AuditCommand {
    /// Check an audit file's hash chain: every line intact, none removed, inserted or moved.
    Verify {
        /// The JSON Lines audit file.
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
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => match pgiam::audit::verify(&file)
            .with_context(|| format!("reading {}", file.display()))?
        {
            pgiam::audit::Verified::Intact { records } => {
                println!("{}: {records} records, hash chain intact", file.display());
                Ok(())
            }
            pgiam::audit::Verified::Broken { line, reason } => {
                anyhow::bail!("{}: line {line}: {reason}", file.display())
            }
        },
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
            println!(
                "{}: ok ({} mappings, {} roles)",
                config.display(),
                c.mappings.len(),
                c.roles.len()
            );
            Ok(())
        }
    }
}
