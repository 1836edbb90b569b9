//! The `pairvisor` command line: noun-verb commands (`pairvisor vm start web1`)
//! that talk to a daemon's REST API. `--json` prints the API's JSON; exit
//! codes are stable (see [`ExitCode`]).

mod client;
mod commands;

pub use client::{CliError, Client};
pub use commands::{run, Cli, Command, LabCmd, ServeArgs, WitnessArgs};
/// HTTP methods, for callers of [`Client::call`].
pub use reqwest::Method;

/// Stable exit codes, for scripts (UPS software, cron).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Success.
    Ok = 0,
    /// Unexpected failure (server error, I/O).
    Failure = 1,
    /// Bad command-line usage (clap's own code).
    Usage = 2,
    /// The daemon could not be reached.
    Unreachable = 3,
    /// Not logged in, or the token expired.
    Unauthenticated = 4,
    /// The user's role does not allow the operation.
    Forbidden = 5,
    /// The named object does not exist.
    NotFound = 6,
    /// The object's state or relations refuse the operation (wrong VM state,
    /// name taken, volume attached).
    Conflict = 7,
    /// The request was invalid (bad name, size, admission rule).
    Invalid = 8,
}
