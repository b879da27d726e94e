//! kube-migrate-agent: see `kube_migrate::app::agent`.
use clap::Parser;
use kube_migrate::{
    app::agent::{Options, run},
    telemetry, tls,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let options = Options::parse();
    telemetry::init(options.log_format);
    let shutdown = kube_migrate::server::shutdown_on_signals();
    run(options, shutdown).await?;
    Ok(())
}
