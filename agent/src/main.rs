//! kube-migrate-agent: see `kube_migrate::app::agent`.
use clap::Parser;
use kube_migrate::{
    app::agent::{AwaitRestore, Options, UnpackVolume, run},
    telemetry, tls,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The restore init container of replacements runs this same binary (one image to pin).
    if std::env::args().nth(1).as_deref() == Some(AwaitRestore::COMMAND) {
        let wait = AwaitRestore::parse_from(std::env::args().skip(1));
        std::process::exit(if wait.run() { 0 } else { 1 });
    }
    if std::env::args().nth(1).as_deref() == Some(UnpackVolume::COMMAND) {
        let unpack = UnpackVolume::parse_from(std::env::args().skip(1));
        if let Err(e) = unpack.run() {
            eprintln!("{e}");
            std::process::exit(1);
        }
        return Ok(());
    }
    tls::install_crypto_provider();
    let options = Options::parse();
    telemetry::init(options.log_format);
    let shutdown = kube_migrate::server::shutdown_on_signals();
    run(options, shutdown).await?;
    Ok(())
}
