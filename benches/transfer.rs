//! Transfer and image-build benchmark, against a real `kube-migrate-agent` process.
//!
//! * **Transfer**: upload a CRI-O-layout archive into the agent over mTLS on loopback — what a
//!   source agent does during `Transferring`; the agent hashes, validates and writes it in
//!   one pass and fsyncs it — against the raw baseline: the same bytes from the same file over
//!   the same kind of mTLS connection into a receiver process that only writes them to a file
//!   (reader and writer threads, 1 MiB buffers) and fsyncs it. Both answer once the data is on
//!   disk. `ratio` = raw time / agent time. Also reported: CPU seconds per GiB of each
//!   receiving process, and the agent's peak RSS (VmHWM, reset before every upload).
//! * **Image build**: turn each received archive into the checkpoint OCI image through the
//!   agent API (the layer is the archive, hard-linked), check that the layer shares the
//!   archive's inode (no copy), and compare with copying + fsyncing the same file.
//!
//! Archives are generated on disk once per size (incompressible pages) and streamed, never
//! held in memory; every received file is deleted right after its measurement.
//!
//!   scripts/bench.sh   (builds the agent, runs this and the admission bench)
//!   cargo build --release -p kube-migrate-agent && cargo bench --bench transfer
//!   KM_BENCH_SIZES_MIB=64,256,1024,4096 KM_BENCH_RUNS=3 cargo bench --bench transfer
//!
//! KM_BENCH_SIZES_MIB (default 64,256,1024); KM_BENCH_IMAGE_MIB: the size whose image build is
//! compared with a copy (default 1024 if listed, else the largest); KM_BENCH_RUNS (default 1)
//! repeats each transfer, alternating which receiver goes first, and keeps the best of each;
//! KM_BENCH_DIR (default /var/tmp) holds archives and both receivers' files (one filesystem);
//! KM_AGENT_BIN overrides the agent binary (default: next to this bench in the target dir).

use std::{
    io::{Read, Write},
    net::TcpListener,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use kube_migrate::{
    agent::{
        api::{ArchiveRef, ImageRequest},
        chunks,
        client::AgentClient,
    },
    certs,
    tls::{CertReloader, agent_client_config, install_crypto_provider, server_config},
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "common/mod.rs"]
mod common;
use common::{cpu_seconds, load_average};

const MIB: f64 = (1 << 20) as f64;
/// Set in the environment of the raw receiver process (this same binary), to its directory.
const RAW_RECEIVER: &str = "KM_BENCH_RAW_RECEIVER";

/// A writer that hashes what goes through it: the archive's digest without reading it back.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Incompressible "memory": a xorshift stream of `left` bytes.
struct Noise(u64, u64);

impl Read for Noise {
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

/// Write a checkpoint archive with `memory_bytes` of pages; returns (digest, size).
fn write_archive(path: &Path, memory_bytes: u64) -> (String, u64) {
    let file = std::fs::File::create(path).unwrap();
    let writer = HashingWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
    };
    let mut tar = tar::Builder::new(writer);
    let mut add = |name: &str, size: u64, body: &mut dyn Read| {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o600);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, body).unwrap();
    };
    let config = br#"{"id":"b","name":"app","rootfsImageName":"registry.local/app:1"}"#;
    add("config.dump", config.len() as u64, &mut &config[..]);
    add("spec.dump", 2, &mut &b"{}"[..]);
    add(
        "checkpoint/pages-1.img",
        memory_bytes,
        &mut Noise(0x9e3779b97f4a7c15, memory_bytes),
    );
    let writer = tar.into_inner().unwrap();
    let digest = format!("sha256:{}", hex::encode(writer.hasher.finalize()));
    writer.inner.into_inner().unwrap().sync_all().unwrap();
    (digest, std::fs::metadata(path).unwrap().len())
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system, exited threads included) used by process `pid` so far.
fn peak_rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmHWM:") as f64 / 1024.0
}

/// Reset the peak RSS of `pid` to its current RSS (Linux ≥ 4.0), so each operation gets its
/// own peak. Where that is not allowed, peaks are since the agent started (said once).
fn reset_peak_rss(pid: u32) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
        WARNED.call_once(|| println!("cannot reset the agent's VmHWM ({e}): peaks are since it started"));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed when the bench ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The raw receiver (runs in its own process, like the agent): for each mTLS connection,
/// read an 8-byte length and that many bytes into a new file `dir/raw-<n>`, fsync, answer
/// the length. The connection thread decrypts into 1 MiB buffers; a writer thread writes
/// them. The bench removes the files between measurements.
fn raw_receiver(dir: &Path) {
    let certs_dir = dir.join("certs");
    let reloader = CertReloader::new(certs_dir.join("agent.crt"), certs_dir.join("agent.key")).unwrap();
    let config = Arc::new(server_config(reloader, Some(&certs_dir.join("ca.crt"))).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    for (n, tcp) in listener.incoming().enumerate() {
        let tcp = tcp.unwrap();
        tcp.set_nodelay(true).unwrap();
        let connection = rustls::ServerConnection::new(Arc::clone(&config)).unwrap();
        let mut tls = rustls::StreamOwned::new(connection, tcp);
        let mut len = [0u8; 8];
        tls.read_exact(&mut len).unwrap();
        let mut left = u64::from_be_bytes(len);
        let path = dir.join(format!("raw-{n}"));
        let file = std::fs::File::create(&path).unwrap();
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let writer = std::thread::spawn(move || {
            let mut file = file;
            for buf in full_rx {
                file.write_all(&buf).unwrap();
                let _ = empty_tx.send(buf);
            }
            file.sync_all().unwrap();
        });
        while left > 0 {
            let mut buf = empty_rx.try_recv().unwrap_or_else(|_| vec![0; 1 << 20]);
            let want = buf.len().min(left as usize);
            buf.resize(want, 0);
            tls.read_exact(&mut buf).unwrap();
            left -= want as u64;
            full_tx.send(buf).unwrap();
        }
        drop(full_tx);
        writer.join().unwrap();
        tls.write_all(&len).unwrap();
        tls.flush().unwrap();
        tls.conn.send_close_notify();
        let _ = tls.flush();
    }
}

/// Best (smallest) figures of each receiver over `runs` runs: seconds, and CPU seconds of the
/// sending (this) and the receiving process.
struct Measured {
    raw: f64,
    agent: f64,
    raw_cpu: f64,
    agent_cpu: f64,
    raw_send_cpu: f64,
    agent_send_cpu: f64,
    agent_peak_mib: f64,
    image: f64,
    image_peak_mib: f64,
    layer_is_archive: bool,
}

fn main() {
    if let Ok(dir) = std::env::var(RAW_RECEIVER) {
        install_crypto_provider();
        raw_receiver(Path::new(&dir));
        return;
    }
    install_crypto_provider();
    let env_u64s = |name: &str, default: &str| -> Vec<u64> {
        std::env::var(name)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: {s:?} is not a number"))
            })
            .collect()
    };
    let sizes = env_u64s("KM_BENCH_SIZES_MIB", "64,256,1024");
    let runs = env_u64s("KM_BENCH_RUNS", "1")[0].max(1);
    let largest = *sizes.iter().max().expect("KM_BENCH_SIZES_MIB lists no size");
    let image_mib = env_u64s("KM_BENCH_IMAGE_MIB", if sizes.contains(&1024) { "1024" } else { "0" })[0];
    let image_mib = if image_mib == 0 { largest } else { image_mib };
    assert!(
        sizes.contains(&image_mib),
        "KM_BENCH_IMAGE_MIB ({image_mib}) must be one of KM_BENCH_SIZES_MIB"
    );

    let agent_bin = std::env::var_os("KM_AGENT_BIN").map(PathBuf::from).unwrap_or_else(|| {
        // target/<profile>/deps/transfer-<hash> → target/<profile>/kube-migrate-agent
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().join("kube-migrate-agent")
    });
    assert!(
        agent_bin.exists(),
        "{} is missing: cargo build --release -p kube-migrate-agent (same target directory)",
        agent_bin.display()
    );
    let base = std::env::var("KM_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::tempdir_in(&base).unwrap();
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
    let state_dir = dir.path().join("state");
    let api = free_port();
    let child = Command::new(&agent_bin)
        .args(["--node-name", "bench", "--listen", &format!("127.0.0.1:{api}")])
        .args(["--registry-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--kubelet-url", "https://127.0.0.1:1", "--kubelet-insecure-tls"])
        .arg("--token-file")
        .arg(dir.path().join("token"))
        .arg("--state-dir")
        .arg(&state_dir)
        // No API server here: the shared certificate, and no checkpoint (none is benched).
        .args(["--standalone", "--identity", "files"])
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
    let agent_pid = child.id();
    let _agent = Process(child);
    let mut raw_child = Command::new(std::env::current_exe().unwrap())
        .env(RAW_RECEIVER, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(raw_child.stdout.take().unwrap()),
        &mut port,
    )
    .unwrap();
    let raw_port: u16 = port.trim().parse().expect("raw receiver port");
    let raw_pid = raw_child.id();
    let _raw = Process(raw_child);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let agent_url = format!("https://127.0.0.1:{api}");
    runtime.block_on(async move {
        let mut up = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", api)).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "the agent did not start listening on 127.0.0.1:{api}");
        // Two callers, as in a migration: an agent sends the archive, the controller builds
        // the image and deletes (the agent authorises each by its certificate).
        let identity = CertReloader::new(certs_dir.join("webhook.crt"), certs_dir.join("webhook.key")).unwrap();
        let tls = agent_client_config(&certs_dir.join("ca.crt"), identity, "kube-migrate-agent").unwrap();
        let client = AgentClient::new(tls.clone(), Duration::from_secs(3600));
        let peer = CertReloader::new(certs_dir.join("agent.crt"), certs_dir.join("agent.key")).unwrap();
        let sender = AgentClient::new(
            agent_client_config(&certs_dir.join("ca.crt"), peer, "kube-migrate-agent").unwrap(),
            Duration::from_secs(3600),
        );
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        println!(
            "agent idle: RSS {:.1} MiB; {} run(s) per size; files in {}; load average {}",
            status_kib(agent_pid, "VmRSS:") as f64 / 1024.0,
            runs,
            dir.path().display(),
            load_average()
        );
        println!(
            "{:>9} {:>10} {:>12} {:>6} {:>21} {:>21} {:>11} {:>12} {:>11} {:>7}",
            "archive",
            "raw MiB/s",
            "agent MiB/s",
            "ratio",
            "raw CPU s/GiB snd+rcv",
            "agent CPU s/GiB s+r",
            "agent peak",
            "image build",
            "image peak",
            "no copy"
        );

        let mut table = Vec::new();
        let mut copy_fsync = None;
        for (i, &mib) in sizes.iter().enumerate() {
            let archive = dir.path().join(format!("archive-{mib}.tar"));
            let (digest, size) = write_archive(&archive, mib << 20);
            let reference = ArchiveRef {
                container: "app".into(),
                digest,
                size_bytes: size,
            };
            let mut m = Measured {
                raw: f64::MAX,
                agent: f64::MAX,
                raw_cpu: f64::MAX,
                agent_cpu: f64::MAX,
                raw_send_cpu: f64::MAX,
                agent_send_cpu: f64::MAX,
                agent_peak_mib: 0.0,
                image: f64::MAX,
                image_peak_mib: 0.0,
                layer_is_archive: true,
            };
            for run in 0..runs {
                // Alternate which receiver goes first. Each one's files are deleted right after
                // its measurement, so both write into memory the other just freed (on VMs the
                // first touch of fresh guest memory costs more than the copy itself).
                for agent_turn in if run % 2 == 0 { [false, true] } else { [true, false] } {
                    if agent_turn {
                        let id = format!("bench-{i}-{run}");
                        let a = agent_run((&sender, &client), &agent_url, agent_pid, &state_dir, &id, &archive, &reference).await;
                        m.agent = m.agent.min(a.seconds);
                        m.agent_cpu = m.agent_cpu.min(a.cpu);
                        m.agent_send_cpu = m.agent_send_cpu.min(a.send_cpu);
                        m.agent_peak_mib = m.agent_peak_mib.max(a.peak_mib);
                        m.image = m.image.min(a.image_seconds);
                        m.image_peak_mib = m.image_peak_mib.max(a.image_peak_mib);
                        m.layer_is_archive &= a.layer_is_archive;
                    } else {
                        let (cpu, send_cpu) = (cpu_seconds(raw_pid), cpu_seconds(std::process::id()));
                        m.raw = m.raw.min(raw_upload(&connector, raw_port, &archive, size).await);
                        m.raw_cpu = m.raw_cpu.min(cpu_seconds(raw_pid) - cpu);
                        m.raw_send_cpu = m.raw_send_cpu.min(cpu_seconds(std::process::id()) - send_cpu);
                        for entry in std::fs::read_dir(dir.path()).unwrap() {
                            let path = entry.unwrap().path();
                            if path.file_name().unwrap().to_string_lossy().starts_with("raw-") {
                                std::fs::remove_file(path).unwrap();
                            }
                        }
                    }
                }
            }
            let mb = size as f64 / MIB;
            let gib = mb / 1024.0;
            println!(
                "{:>5} MiB {:>10.1} {:>12.1} {:>6.2} {:>21} {:>21} {:>7.1} MiB {:>9.1} ms {:>7.1} MiB {:>7}",
                mib,
                mb / m.raw,
                mb / m.agent,
                m.raw / m.agent,
                format!("{:.2} + {:.2}", m.raw_send_cpu / gib, m.raw_cpu / gib),
                format!("{:.2} + {:.2}", m.agent_send_cpu / gib, m.agent_cpu / gib),
                m.agent_peak_mib,
                m.image * 1e3,
                m.image_peak_mib,
                if m.layer_is_archive { "yes" } else { "NO" }
            );
            assert!(m.layer_is_archive, "the image layer of {mib} MiB is not the archive's inode");
            if mib == image_mib {
                copy_fsync = Some((mib, copy_and_fsync(&archive, &dir.path().join("copy.tar"))));
            }
            std::fs::remove_file(&archive).unwrap();
            table.push((mib, m));
        }

        println!(
            "\n| archive | raw TLS → file + fsync | agent upload | ratio | CPU s/GiB raw: send + receive | CPU s/GiB agent: send + receive | agent peak RSS | image build | image peak RSS |"
        );
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (mib, m) in &table {
            let mb = *mib as f64;
            let gib = mb / 1024.0;
            println!(
                "| {} | {:.0} MiB/s | {:.0} MiB/s | {:.2} | {:.2} + {:.2} | {:.2} + {:.2} | {:.1} MiB | {:.1} ms | {:.1} MiB |",
                if *mib >= 1024 && mib % 1024 == 0 { format!("{} GiB", mib / 1024) } else { format!("{mib} MiB") },
                mb / m.raw,
                mb / m.agent,
                m.raw / m.agent,
                m.raw_send_cpu / gib,
                m.raw_cpu / gib,
                m.agent_send_cpu / gib,
                m.agent_cpu / gib,
                m.agent_peak_mib,
                m.image * 1e3,
                m.image_peak_mib
            );
        }
        println!("\nload average at the end: {}", load_average());
        if let Some((mib, seconds)) = copy_fsync {
            let image = table.iter().find(|(m, _)| *m == mib).map(|(_, m)| m.image).unwrap();
            println!(
                "\nimage build of {mib} MiB: {:.1} ms (layer hard-linked, no copy) vs copy + fsync of the same file: {:.0} ms ({:.0} MiB/s): {:.0}x faster",
                image * 1e3,
                seconds * 1e3,
                mib as f64 / seconds,
                seconds / image
            );
        }
    });
}

/// One upload into the agent, then the image build of that archive.
struct AgentRun {
    seconds: f64,
    cpu: f64,
    send_cpu: f64,
    peak_mib: f64,
    image_seconds: f64,
    image_peak_mib: f64,
    layer_is_archive: bool,
}

/// Upload `archive` into the agent as migration `id` (as another agent: `sender`), build its
/// image, check that the layer is the received file itself, then delete the migration (as the
/// controller: `client`).
async fn agent_run(
    (sender, client): (&AgentClient, &AgentClient),
    url: &str,
    pid: u32,
    state_dir: &Path,
    id: &str,
    archive: &Path,
    reference: &ArchiveRef,
) -> AgentRun {
    // The controller tells the target what to expect (not timed: one small request before a
    // push, as in a migration).
    let expect = kube_migrate::agent::api::ExpectRequest {
        source_node: "bench-source".into(),
        archives: vec![reference.clone()],
        volumes: Vec::new(),
        prepull: false,
    };
    client.expect(url, id, &expect).await.unwrap();
    reset_peak_rss(pid);
    let (cpu, send_cpu) = (cpu_seconds(pid), cpu_seconds(std::process::id()));
    let start = Instant::now();
    let file = tokio::fs::File::open(archive).await.unwrap();
    let received = sender
        .upload(
            url,
            id,
            kube_migrate::agent::api::Kind::Archive,
            reference,
            file,
            Default::default(),
        )
        .await
        .unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let (cpu, send_cpu) = (cpu_seconds(pid) - cpu, cpu_seconds(std::process::id()) - send_cpu);
    let peak_mib = peak_rss_mib(pid);
    assert_eq!(
        (received.digest.as_str(), received.size_bytes),
        (reference.digest.as_str(), reference.size_bytes)
    );

    reset_peak_rss(pid);
    let start = Instant::now();
    let request = ImageRequest {
        namespace: "bench".into(),
        pod: "app".into(),
        archives: vec![reference.clone()],
        pull_digest: None,
        prepull: false,
    };
    let images = client.build_image(url, id, &request).await.unwrap();
    let image_seconds = start.elapsed().as_secs_f64();
    let image_peak_mib = peak_rss_mib(pid);
    assert_eq!(images.images.len(), 1);
    let migration = state_dir.join("migrations").join(id);
    let file = std::fs::metadata(migration.join("archives/app.tar")).unwrap();
    let hex = reference.digest.trim_start_matches("sha256:");
    let layer = std::fs::metadata(migration.join("image/blobs/sha256").join(hex)).unwrap();
    let layer_is_archive = layer.ino() == file.ino() && layer.len() == reference.size_bytes;
    client.delete(url, id).await.unwrap();
    AgentRun {
        seconds,
        cpu,
        send_cpu,
        peak_mib,
        image_seconds,
        image_peak_mib,
        layer_is_archive,
    }
}

/// Send `archive` to the raw receiver and wait for its answer (sent after its fsync).
async fn raw_upload(connector: &tokio_rustls::TlsConnector, port: u16, archive: &Path, size: u64) -> f64 {
    let start = Instant::now();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut tls = connector
        .connect("kube-migrate-agent".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(&size.to_be_bytes()).await.unwrap();
    // Read as the agent client reads an upload body (1 MiB recycled chunks).
    let mut chunks = std::pin::pin!(chunks::file_stream(std::fs::File::open(archive).unwrap()));
    let mut sent = 0;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.unwrap();
        tls.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
    }
    tls.flush().await.unwrap();
    assert_eq!(sent, size);
    let mut answer = [0u8; 8];
    tls.read_exact(&mut answer).await.unwrap();
    assert_eq!(u64::from_be_bytes(answer), size, "raw receiver answer");
    start.elapsed().as_secs_f64()
}

/// What a full copy of the layer would cost: copy `from` to `to` and fsync it.
fn copy_and_fsync(from: &Path, to: &Path) -> f64 {
    let start = Instant::now();
    std::fs::copy(from, to).unwrap();
    std::fs::File::open(to).unwrap().sync_all().unwrap();
    let seconds = start.elapsed().as_secs_f64();
    std::fs::remove_file(to).unwrap();
    seconds
}
