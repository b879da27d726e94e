//! kubectl-migrate: copy onto PATH and run `kubectl migrate ...`. See `kube_migrate::app::kubectl`.
use clap::Parser;
use kube_migrate::app::kubectl::{Options, run};

#[tokio::main]
async fn main() {
    kube_migrate::tls::install_crypto_provider();
    if let Err(error) = run(Options::parse()).await {
        eprintln!("error: {error}");
        std::process::exit(error.exit_code());
    }
}
