//! The command line (placeholder until the daemon lands).

pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
