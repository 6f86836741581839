//! Standalone data-plane binary (same as `keel dataplane`), used by the
//! crate's integration tests so they need not build the whole appliance.

use clap::Parser;

#[derive(Parser)]
#[command(name = "keel-dataplane", about = "keel VPC data plane")]
struct Cli {
    #[command(flatten)]
    args: keel_dataplane::daemon::DaemonArgs,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match keel_dataplane::daemon::run(cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("keel-dataplane: error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}
