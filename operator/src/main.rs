use clap::Parser;

fn main() {
    let cli = regmirror::cli::Cli::parse();
    std::process::exit(regmirror::cli::run(cli));
}
