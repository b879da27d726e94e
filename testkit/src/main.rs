//! test-kubelet: see `kube_migrate_testkit::app`.
use clap::Parser;
use kube_migrate::{telemetry, tls};
use kube_migrate_testkit::app::{Options, run};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let options = Options::parse();
    telemetry::init(options.log_format);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        signal.cancel();
    });
    run(options, shutdown).await?;
    Ok(())
}
