//! The real `hookbridge` binary, run as an operator would.

use std::process::Command;

/// `hookbridge ARGS` with none of the harness's `HOOKBRIDGE_*` variables
/// (they share the binary's configuration prefix, and it refuses unknown
/// keys): each run sets its own.
pub fn hookbridge(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hookbridge"));
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HOOKBRIDGE_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// [`hookbridge`] for tokio, killed if the test drops it.
pub fn hookbridge_async(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::from(hookbridge(args));
    cmd.kill_on_drop(true);
    cmd
}
