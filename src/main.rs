//! The `seckill` command: parses the CLI and hands over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = seckill::cli::Cli::parse();
    seckill::cli::init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(seckill::cli::run(cli))
}
