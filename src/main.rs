//! The `seckill` command: parses the CLI and hands over to the library.

use clap::Parser;

/// mimalloc instead of the system allocator: every request allocates (headers, JSON, batch vectors),
/// and glibc malloc showed as a tenth of the process's CPU under a storm.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = seckill::cli::Cli::parse();
    seckill::cli::init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(seckill::cli::run(cli))
}
