//! kube-migrate-certs: make (or renew) the CA and the webhook and agent certificates.
use clap::Parser;
use kube_migrate::certs::{Request, issue};

#[derive(Parser)]
#[command(name = "kube-migrate-certs", about = "Create the kube-migrate CA and certificates")]
struct Options {
    /// Output directory (the CA in it is reused when present).
    #[arg(long, default_value = "certs/out")]
    out: std::path::PathBuf,
    #[arg(long, default_value = "kube-migrate")]
    namespace: String,
    #[arg(long, default_value = "kube-migrate-webhook")]
    webhook_service: String,
    #[arg(long, default_value = "kube-migrate-agent")]
    agent_name: String,
    /// Extra subject alternative names (DNS names or IPs), repeatable.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Validity of the leaf certificates.
    #[arg(long, default_value_t = 365)]
    days: i64,
}

fn main() -> anyhow::Result<()> {
    let o = Options::parse();
    let request = Request {
        namespace: o.namespace,
        webhook_service: o.webhook_service,
        agent_name: o.agent_name,
        extra_sans: o.sans,
        days: o.days,
    };
    issue(&o.out, &request)?;
    println!(
        "wrote ca.crt, webhook.crt/key, agent.crt/key and agent-issuer.crt/key to {}",
        o.out.display()
    );
    Ok(())
}
