//! test-kubelet: see `kube_migrate_testkit::app`.
use clap::Parser;
use kube_migrate::{telemetry, tls};
use kube_migrate_testkit::app::{Options, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let options = Options::parse();
    telemetry::init(options.log_format);
    let shutdown = kube_migrate::server::shutdown_on_signals();
    run(options, shutdown).await?;
    Ok(())
}
