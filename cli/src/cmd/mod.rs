//! Command definitions and dispatch.

mod budgets;
mod ca;
mod coord;
mod dev;
mod evidence;
mod run;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "caracal", version, about = "Caracal: pre-execution authority for AI agents")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run every service in one process on SQLite and the embedded bus (no external service).
    Dev(dev::DevArgs),
    /// Run one service (or all) against the configured database and bus (production).
    Serve {
        #[arg(value_enum)]
        service: Service,
        /// Configuration file (TOML); `CARACAL__SECTION__KEY` variables override it.
        #[arg(long, short, env = "CARACAL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Apply database migrations and exit.
    Migrate {
        #[arg(long, short, env = "CARACAL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print every problem.
    CheckConfig {
        #[arg(long, short, env = "CARACAL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// The audit ledger: query entries, export them with their proofs (read-only).
    #[command(subcommand)]
    Ledger(evidence::LedgerCmd),
    /// Check the ledger's Merkle tree against its signed heads (read-only).
    #[command(subcommand)]
    Merkle(evidence::MerkleCmd),
    /// Run an agent command under authority: session, mandate, proxy and CA set for it.
    Run(run::RunArgs),
    /// Operator bootstrap.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// The gateway's TLS interception CA: export the certificates agents trust, rotate it.
    #[command(subcommand)]
    Ca(ca::CaCmd),
    /// Budgets: spend, reservations and what remains in the current window.
    #[command(subcommand)]
    Budgets(budgets::BudgetsCmd),
    /// Agent sessions kept by the coordinator: list, show, revoke.
    #[command(subcommand)]
    Sessions(coord::SessionsCmd),
    /// Revoke agents, sessions, delegations, credentials, mandates, revocation ids, the tenant
    /// or resources — and everything they started — at every gateway, in one call.
    Revoke(coord::RevokeArgs),
}

#[derive(Subcommand, Debug)]
pub enum AdminCmd {
    /// Create the first platform admin token of a database and print it once (exit 3 when
    /// one already exists).
    BootstrapToken {
        #[arg(long, short, env = "CARACAL_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Gateway,
    Sts,
    Control,
    Coordinator,
    Audit,
    All,
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Dev(args) => dev::run(args),
        Command::Serve { service, config } => serve::run_serve(service, config),
        Command::Migrate { config } => serve::run_migrate(config),
        Command::CheckConfig { config } => serve::run_check(config),
        Command::Ledger(c) => evidence::run_ledger(c),
        Command::Merkle(c) => evidence::run_merkle(c),
        Command::Admin(AdminCmd::BootstrapToken { config }) => serve::run_bootstrap_token(config),
        Command::Budgets(c) => budgets::run(c),
        Command::Run(a) => run::run(a),
        Command::Ca(c) => ca::run(c),
        Command::Sessions(c) => coord::run_sessions(c),
        Command::Revoke(a) => coord::run_revoke(a),
    }
}
