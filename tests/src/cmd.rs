//! Running host commands with their output captured.

use std::process::Command;

use crate::{FixtureError, Result};

/// What a finished command printed.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `args[0]` with the rest as arguments and captures its output; a
/// non-zero exit is not an error here (see [`check`]).
pub fn capture(args: &[&str]) -> Result<CmdOutput> {
    let (program, rest) = args.split_first().ok_or_else(|| FixtureError::Command {
        cmd: String::new(),
        status: "not run".into(),
        stderr: "empty command".into(),
    })?;
    let output = Command::new(program)
        .args(rest)
        .output()
        .map_err(|source| FixtureError::Spawn {
            cmd: args.join(" "),
            source,
        })?;
    Ok(CmdOutput {
        success: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Turns a failed command into an error that names it and shows its stderr.
pub fn check(args: &[&str], output: CmdOutput) -> Result<CmdOutput> {
    if output.success {
        Ok(output)
    } else {
        Err(FixtureError::Command {
            cmd: args.join(" "),
            status: output
                .code
                .map_or_else(|| "killed by a signal".into(), |c| format!("exit {c}")),
            stderr: output.stderr.trim().to_owned(),
        })
    }
}

/// Runs a command that must succeed; returns its output.
pub fn run(args: &[&str]) -> Result<CmdOutput> {
    check(args, capture(args)?)
}
