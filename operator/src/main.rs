use clap::Parser;

fn main() {
    regmirror_process::memory::bound_allocator();
    let cli = regmirror::cli::Cli::parse();
    std::process::exit(regmirror::cli::run(cli));
}
