//! Transfer benchmark: archive uploads into a real `kube-migrate-agent` process over mTLS on
//! loopback (digest check, safety validation and fsync included), against a raw copy of the
//! same bytes over the same kind of TLS connection; and the agent's peak RSS.
//!
//!   cargo build --release -p kube-migrate-agent && cargo bench --bench transfer
//!   KM_BENCH_SIZES_MIB=64 cargo bench --bench transfer      (short, as CI would run it)

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use kube_migrate::{
    agent::{api::ArchiveRef, archive, client::AgentClient},
    certs,
    tls::{CertReloader, agent_client_config, client_config, install_crypto_provider, server_config},
};
use tokio::io::AsyncWriteExt;

fn write_archive(path: &Path, memory_bytes: u64) {
    let file = std::fs::File::create(path).unwrap();
    let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, file));
    let mut add = |name: &str, size: u64, body: &mut dyn std::io::Read| {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o600);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, body).unwrap();
    };
    let config = br#"{"id":"b","name":"app","rootfsImageName":"registry.local/app:1"}"#;
    add("config.dump", config.len() as u64, &mut &config[..]);
    add("spec.dump", 2, &mut &b"{}"[..]);
    // Incompressible "memory": a xorshift stream.
    struct Noise(u64, u64);
    impl std::io::Read for Noise {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.1 as usize);
            for chunk in buf[..n].chunks_mut(8) {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
            }
            self.1 -= n as u64;
            Ok(n)
        }
    }
    add(
        "checkpoint/pages-1.img",
        memory_bytes,
        &mut Noise(0x9e3779b97f4a7c15, memory_bytes),
    );
    tar.into_inner().unwrap().into_inner().unwrap().sync_all().unwrap();
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Agent(Child);
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    install_crypto_provider();
    let sizes: Vec<u64> = std::env::var("KM_BENCH_SIZES_MIB")
        .unwrap_or_else(|_| "64,256,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let agent_bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/kube-migrate-agent");
    assert!(
        agent_bin.exists(),
        "build it first: cargo build --release -p kube-migrate-agent"
    );
    let dir = tempfile::tempdir_in(std::env::var("KM_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    let certs_dir = dir.path().join("certs");
    certs::issue(
        &certs_dir,
        &certs::Request {
            extra_sans: vec!["127.0.0.1".into()],
            days: 1,
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::write(dir.path().join("token"), "unused").unwrap();
    let (api, admin) = (free_port(), free_port());
    let child = Command::new(&agent_bin)
        .args([
            "--node-name",
            "bench",
            "--listen",
            &format!("127.0.0.1:{api}"),
            "--registry-listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .args([
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--kubelet-url",
            "https://127.0.0.1:1",
            "--kubelet-insecure-tls",
        ])
        .arg("--token-file")
        .arg(dir.path().join("token"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--tls-cert")
        .arg(certs_dir.join("agent.crt"))
        .arg("--tls-key")
        .arg(certs_dir.join("agent.key"))
        .arg("--ca")
        .arg(certs_dir.join("ca.crt"))
        .args(["--log-format", "plain"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _agent = Agent(child);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", api)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("agent idle: peak RSS {:.1} MiB", vm_hwm_kib(pid) as f64 / 1024.0);
        let identity = CertReloader::new(certs_dir.join("webhook.crt"), certs_dir.join("webhook.key")).unwrap();
        let client = AgentClient::new(agent_client_config(&certs_dir.join("ca.crt"), identity, "kube-migrate-agent").unwrap(), Duration::from_secs(3600));

        // Raw baseline: the same bytes over one TLS connection into a sink.
        let raw_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let raw_addr = raw_listener.local_addr().unwrap();
        let server_certs = CertReloader::new(certs_dir.join("agent.crt"), certs_dir.join("agent.key")).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(server_certs, None).unwrap()));
        tokio::spawn(async move {
            loop {
                let (tcp, _) = raw_listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let tls = acceptor.accept(tcp).await.unwrap();
                    let mut reader = tokio::io::BufReader::with_capacity(256 * 1024, tls);
                    tokio::io::copy_buf(&mut reader, &mut tokio::io::sink()).await.unwrap();
                });
            }
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&certs_dir.join("ca.crt"), None).unwrap()));

        for (i, mib) in sizes.iter().enumerate() {
            let path = dir.path().join(format!("archive-{mib}.tar"));
            write_archive(&path, mib << 20);
            let (digest, size) = archive::digest_file(&path).unwrap();

            let start = Instant::now();
            let mut tls = connector.connect("127.0.0.1".try_into().unwrap(), tokio::net::TcpStream::connect(raw_addr).await.unwrap()).await.unwrap();
            // Same chunking as the agent's upload body (256 KiB).
            let mut file = tokio::io::BufReader::with_capacity(256 * 1024, tokio::fs::File::open(&path).await.unwrap());
            tokio::io::copy_buf(&mut file, &mut tls).await.unwrap();
            tls.shutdown().await.unwrap();
            let raw = start.elapsed().as_secs_f64();

            let reference = ArchiveRef { container: "app".into(), digest, size_bytes: size };
            let start = Instant::now();
            let file = tokio::fs::File::open(&path).await.unwrap();
            client.upload(&format!("https://127.0.0.1:{api}"), &format!("bench-{i}"), &reference, file).await.unwrap();
            let agent = start.elapsed().as_secs_f64();
            let mb = size as f64 / (1 << 20) as f64;
            println!(
                "{mib:>5} MiB  raw TLS {:>7.1} MiB/s  agent upload (verify+validate+fsync) {:>7.1} MiB/s  ratio {:.2}  agent peak RSS {:.1} MiB",
                mb / raw,
                mb / agent,
                raw / agent,
                vm_hwm_kib(pid) as f64 / 1024.0
            );
            std::fs::remove_file(&path).unwrap();
        }
    });
}
