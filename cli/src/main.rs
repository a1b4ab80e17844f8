//! `caracal`: the one binary. Lifecycle (`dev`, `serve`, `migrate`) and, later, evidence
//! commands. Parsing lives here; everything else in the modules.

mod cmd;

/// mimalloc: glibc's allocator showed up as a fifth of the STS's profile under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cmd::Cli::parse();
    cmd::run(cli)
}
