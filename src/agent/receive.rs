//! Receiving an archive upload in one pass. The body is teed: it is gathered into 1 MiB
//! chunks that go both to a validator thread, which hashes them and parses the tar structure,
//! and to a writer thread, which writes them; one fsync at the end. Decryption, hashing and
//! writing run side by side, and nothing is read back from disk.
//!
//! Each body frame is copied into a recycled chunk and dropped at once, so that hyper reuses
//! its read buffer: keeping hyper's frames in the queues instead would make it read every
//! frame into fresh memory, whose page faults cost more than the copy.
//!
//! A zstd-compressed upload (`content-encoding: zstd`) is decompressed on a thread of its own
//! before the tee; what is hashed, validated, counted against the expected size and kept is
//! the archive as checkpointed.

use std::{
    fs::File,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::body::Body;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::{
    archive::{ArchiveError, ArchiveInfo, Validator},
    chunks::{CHUNK, Chunk, Pool},
    incoming::Feed,
};

/// Chunks queued for each thread: an upload holds at most ~2 × QUEUE + 3 chunks (~15 MiB).
const QUEUE: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("upload interrupted: {0}")]
    Interrupted(String),
    #[error("writing {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("the upload is larger than the {expected} bytes expected")]
    TooLarge { expected: u64 },
}

impl ReceiveError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReceiveError::Interrupted(_) => "upload_interrupted",
            ReceiveError::Io { .. } => "io",
            ReceiveError::Archive(e) => e.metric_label(),
            ReceiveError::TooLarge { .. } => "upload_too_large",
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ReceiveError + '_ {
    move |source| ReceiveError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Stream `body` into `part`, keeping it (fsynced) only when its digest is `expected` and
/// `validator` finds it complete and safe (a checkpoint archive, or a plain tree for an
/// emptyDir's contents), never more than `max_bytes`; `compressed`: the body is zstd. On any
/// error `part` is removed.
/// `feed`, if any, is told how much of `part` is written as it grows.
pub async fn receive(
    body: Body,
    part: &Path,
    expected: &str,
    (validator, max_bytes, compressed): (Validator, u64, bool),
    feed: Option<Arc<Feed>>,
) -> Result<ArchiveInfo, ReceiveError> {
    let body = if compressed { zstd_decoded(body) } else { body };
    let result = receive_checked(body, part, expected, (validator, max_bytes), feed).await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(part).await;
    }
    result
}

async fn receive_checked(
    mut body: Body,
    part: &Path,
    expected: &str,
    (validator, max_bytes): (Validator, u64),
    feed: Option<Arc<Feed>>,
) -> Result<ArchiveInfo, ReceiveError> {
    let (to_validator, validator_rx) = mpsc::channel::<Arc<Chunk>>(QUEUE);
    let (to_writer, writer_rx) = mpsc::channel::<Arc<Chunk>>(QUEUE);
    let invalid = Arc::new(AtomicBool::new(false));
    let validator = tokio::task::spawn_blocking({
        let invalid = Arc::clone(&invalid);
        move || validate_chunks(validator, validator_rx, &invalid)
    });
    let path = part.to_owned();
    let writer = tokio::task::spawn_blocking(move || write_chunks(&path, writer_rx, &invalid, feed.as_deref()));
    let pool = Arc::new(Pool::default());
    let mut current = pool.take();
    current.clear();
    let mut interrupted = None;
    let mut writer_gone = false;
    let mut total = 0u64;
    loop {
        let frame = match body.frame().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                interrupted = Some(e.to_string());
                break;
            }
            None => break,
        };
        let Ok(data) = frame.into_data() else { continue }; // trailers
        total += data.len() as u64;
        if total > max_bytes {
            drop((to_validator, to_writer));
            let _ = (writer.await, validator.await);
            return Err(ReceiveError::TooLarge { expected: max_bytes });
        }
        let mut rest = &data[..];
        while !rest.is_empty() {
            let n = (CHUNK - current.len()).min(rest.len());
            current.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if current.len() == CHUNK {
                let mut next = pool.take();
                next.clear();
                let full = std::mem::replace(&mut current, next);
                writer_gone = !send(&to_validator, &to_writer, full, &pool).await;
                if writer_gone {
                    break;
                }
            }
        }
        if writer_gone {
            break; // the writer stopped on an I/O error, which is the answer
        }
    }
    if interrupted.is_none() && !writer_gone && !current.is_empty() {
        send(&to_validator, &to_writer, current, &pool).await;
    }
    drop((to_validator, to_writer));
    let joined = |e: tokio::task::JoinError| io_err(part)(io::Error::other(e));
    let written = writer.await.map_err(joined)?;
    let validator = validator.await.map_err(joined)?;
    if let Some(why) = interrupted {
        return Err(ReceiveError::Interrupted(why));
    }
    let file = written?;
    let (actual, verdict) = validator.finish();
    // A digest mismatch (corruption on the way) takes precedence over what the corrupted
    // bytes look like.
    if actual != expected {
        return Err(ArchiveError::Digest {
            expected: expected.to_string(),
            actual,
        }
        .into());
    }
    let info = verdict?;
    // One fsync for the whole archive, once it is known to be worth keeping.
    tokio::task::spawn_blocking(move || file.sync_all())
        .await
        .map_err(joined)?
        .map_err(io_err(part))?;
    Ok(info)
}

/// The decompressed stream of a zstd `body`, decoded on a blocking thread into 1 MiB chunks.
/// A broken or truncated stream ends the body with an error (or short, which the digest
/// catches).
fn zstd_decoded(mut body: Body) -> Body {
    let (to_decoder, mut compressed) = mpsc::channel::<io::Result<bytes::Bytes>>(QUEUE);
    let (to_receiver, decoded) = mpsc::channel::<io::Result<bytes::Bytes>>(QUEUE);
    tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let item = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => Ok(data),
                    Err(_) => continue, // trailers
                },
                Err(e) => Err(io::Error::other(e.to_string())),
            };
            let failed = item.is_err();
            if to_decoder.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    tokio::task::spawn_blocking(move || {
        let sink = ChunkSink {
            tx: to_receiver.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        let decoded = zstd::stream::write::Decoder::new(sink).and_then(|mut decoder| {
            while let Some(item) = compressed.blocking_recv() {
                decoder.write_all(&item?)?;
            }
            decoder.flush()?;
            decoder.into_inner().flush()
        });
        if let Err(e) = decoded {
            let _ = to_receiver.blocking_send(Err(io::Error::new(e.kind(), format!("zstd: {e}"))));
        }
    });
    Body::from_stream(futures::stream::unfold(decoded, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// Gathers decompressed bytes into chunks for [`zstd_decoded`].
struct ChunkSink {
    tx: mpsc::Sender<io::Result<bytes::Bytes>>,
    buf: Vec<u8>,
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = (CHUNK - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    /// Sends what is gathered (nothing when empty).
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(bytes::Bytes::from(full)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the receiver stopped"))
    }
}

/// Hand a chunk to both threads; false when the writer has stopped.
async fn send(
    to_validator: &mpsc::Sender<Arc<Chunk>>,
    to_writer: &mpsc::Sender<Arc<Chunk>>,
    buf: Vec<u8>,
    pool: &Arc<Pool>,
) -> bool {
    let chunk = Arc::new(Chunk::new(buf, pool));
    let _ = to_validator.send(Arc::clone(&chunk)).await; // the validator never stops early
    to_writer.send(chunk).await.is_ok()
}

/// The validator thread: hash and parse every chunk; flag the first problem for the writer.
fn validate_chunks(mut validator: Validator, mut rx: mpsc::Receiver<Arc<Chunk>>, invalid: &AtomicBool) -> Validator {
    while let Some(chunk) = rx.blocking_recv() {
        validator.update(&chunk);
        if !validator.is_ok() {
            invalid.store(true, Ordering::Relaxed);
        }
    }
    validator
}

/// The writer thread. Once the archive is known to be invalid it only drains (the validator
/// still needs every byte for the digest).
fn write_chunks(
    path: &Path,
    mut rx: mpsc::Receiver<Arc<Chunk>>,
    invalid: &AtomicBool,
    feed: Option<&Feed>,
) -> Result<File, ReceiveError> {
    let mut file = super::private::create(path).map_err(io_err(path))?;
    let mut written = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        if !invalid.load(Ordering::Relaxed) {
            file.write_all(&chunk).map_err(io_err(path))?;
            written += chunk.len() as u64;
            if let Some(feed) = feed {
                feed.written(written);
            }
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use sha2::{Digest, Sha256};

    use super::*;

    /// A checkpoint archive with `pages` bytes of memory; `name` is the pages file's path,
    /// written raw so that hostile names are possible.
    fn archive(pages: usize, name: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, body: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o600);
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, body).unwrap();
        };
        add("config.dump", br#"{"name":"app","rootfsImageName":"img:1"}"#);
        add("spec.dump", b"{}");
        let memory: Vec<u8> = (0..pages).map(|i| (i % 251) as u8).collect();
        add(name, &memory);
        b.into_inner().unwrap()
    }

    /// An uncompressed upload with no size limit.
    fn plain() -> (Validator, u64, bool) {
        (Validator::new(), u64::MAX, false)
    }

    fn digest(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    /// `bytes` as a request body of `frame`-sized frames, failing after `fail_after` frames.
    fn body(bytes: &[u8], frame: usize, fail_after: Option<usize>) -> Body {
        let mut frames: Vec<io::Result<Bytes>> = bytes.chunks(frame).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        if let Some(n) = fail_after {
            frames.truncate(n);
            frames.push(Err(io::Error::other("connection reset")));
        }
        Body::from_stream(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_good_upload_is_written_byte_for_byte_in_any_framing() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = archive(3 << 20, "checkpoint/pages-1.img");
        for frame in [1000, 64 << 10, 5 << 20] {
            let part = dir.path().join(format!("app-{frame}.part"));
            let info = receive(body(&bytes, frame, None), &part, &digest(&bytes), plain(), None)
                .await
                .unwrap();
            assert_eq!(info.digest, digest(&bytes));
            assert_eq!(info.size, bytes.len() as u64);
            assert_eq!(info.config.rootfs_image_name, "img:1");
            assert!(std::fs::read(&part).unwrap() == bytes, "frames of {frame}");
        }
    }

    #[tokio::test]
    async fn refused_uploads_leave_no_part_file() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("app.part");
        let good = archive(100_000, "checkpoint/pages-1.img");

        let wrong = format!("sha256:{}", "0".repeat(64));
        let err = receive(body(&good, 4096, None), &part, &wrong, plain(), None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReceiveError::Archive(ArchiveError::Digest { .. })),
            "{err}"
        );
        assert!(!part.exists());

        // Digest right, content unsafe: refused for what it is.
        let hostile = archive(100_000, "../../etc/cron.d/x");
        let err = receive(body(&hostile, 4096, None), &part, &digest(&hostile), plain(), None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ReceiveError::Archive(ArchiveError::Unsafe {
                    why: "'..' component",
                    ..
                })
            ),
            "{err}"
        );
        assert_eq!(err.metric_label(), "archive_unsafe");
        assert!(!part.exists());

        // A corrupt archive whose corruption happened before hashing (digest matches).
        let mut corrupt = good.clone();
        corrupt[1024 + 10] ^= 0xff; // the name of the spec.dump header
        let err = receive(body(&corrupt, 4096, None), &part, &digest(&corrupt), plain(), None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReceiveError::Archive(ArchiveError::Corrupt { .. })),
            "{err}"
        );
        assert!(!part.exists());

        let err = receive(body(&good, 4096, Some(3)), &part, &digest(&good), plain(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, ReceiveError::Interrupted(_)), "{err}");
        assert_eq!(err.metric_label(), "upload_interrupted");
        assert!(!part.exists());
    }

    #[tokio::test]
    async fn a_compressed_upload_is_kept_as_checkpointed_and_no_larger_than_expected() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("app.part");
        let bytes = archive(3 << 20, "checkpoint/pages-1.img");
        let size = bytes.len() as u64;
        let packed = zstd::encode_all(&bytes[..], 3).unwrap();
        assert!(packed.len() < bytes.len() / 10, "the memory pattern compresses");
        let info = receive(
            body(&packed, 64 << 10, None),
            &part,
            &digest(&bytes),
            (Validator::new(), size, true),
            None,
        )
        .await
        .unwrap();
        assert_eq!((info.digest, info.size), (digest(&bytes), size));
        assert!(std::fs::read(&part).unwrap() == bytes);

        // One byte more than expected, plain or expanding from a small compressed stream.
        for (upload, compressed) in [(bytes.clone(), false), (packed.clone(), true)] {
            let err = receive(
                body(&upload, 4096, None),
                &part,
                &digest(&bytes),
                (Validator::new(), size - 1, compressed),
                None,
            )
            .await
            .unwrap_err();
            assert!(
                matches!(err, ReceiveError::TooLarge { expected } if expected == size - 1),
                "{err}"
            );
            assert!(!part.exists());
        }
        // Not zstd at all.
        let err = receive(
            body(&bytes, 4096, None),
            &part,
            &digest(&bytes),
            (Validator::new(), size, true),
            None,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, ReceiveError::Interrupted(why) if why.contains("zstd")),
            "{err}"
        );
        assert!(!part.exists());
    }
}
