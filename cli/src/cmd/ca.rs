//! `caracal ca export|rotate`: the TLS interception CA of the gateway. `export` prints the
//! certificates agents must trust (PEM; for `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`,
//! `NODE_EXTRA_CA_CERTS`, `CURL_CA_BUNDLE`); `rotate` replaces the CA (the old certificate stays
//! in the exported bundle until the next rotation; restart the gateways to use the new one).

use std::path::PathBuf;
use std::process::ExitCode;

use caracal_gateway::intercept::{CaFile, ca_path};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// Print the CA certificates to trust (creates the CA if there is none yet).
    Export {
        #[arg(long, short, env = "CARACAL_CONFIG")]
        config: Option<PathBuf>,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Make a new CA; the previous certificate stays trusted in the bundle.
    Rotate {
        #[arg(long, short, env = "CARACAL_CONFIG")]
        config: Option<PathBuf>,
    },
}

pub fn run(cmd: CaCmd) -> ExitCode {
    let (config, rotate, out) = match cmd {
        CaCmd::Export { config, out } => (config, false, out),
        CaCmd::Rotate { config } => (config, true, None),
    };
    let cfg = match super::serve::load_config(config.as_deref()) {
        Ok(c) => c,
        Err(c) => return c,
    };
    let path = ca_path(&cfg);
    let r = if rotate {
        CaFile::rotate(&path)
    } else {
        CaFile::load_or_create(&path)
    };
    match r {
        Ok(ca) if rotate => {
            eprintln!(
                "new interception CA {:?} in {}; restart the gateways, and distribute the bundle (caracal ca export)",
                ca.common_name,
                path.display()
            );
            ExitCode::SUCCESS
        }
        Ok(ca) => match out {
            Some(p) => match std::fs::write(&p, ca.bundle()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write {}: {e}", p.display());
                    ExitCode::FAILURE
                }
            },
            None => {
                print!("{}", ca.bundle());
                ExitCode::SUCCESS
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
