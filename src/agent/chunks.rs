//! Recycled 1 MiB buffers for streaming archives in and out of the agent. Fresh memory for
//! every chunk costs a page fault and a zeroed page per 4 KiB, more than the copy it would
//! save; a small pool per transfer keeps the memory warm and bounded.

use std::{
    io::{self, Read},
    ops::Deref,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::Stream;
use tokio::sync::mpsc;

/// Size of a chunk: one read, write, wakeup or hash update per MiB.
pub const CHUNK: usize = 1 << 20;
/// Chunks read ahead when streaming a file out.
const READ_AHEAD: usize = 4;

/// Buffers returned by dropped [`Chunk`]s, with whatever length they had.
#[derive(Default)]
pub struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    /// A recycled buffer (any length, capacity [`CHUNK`]) or a new empty one.
    pub fn take(&self) -> Vec<u8> {
        let recycled = self.0.lock().expect("chunk pool poisoned").pop();
        recycled.unwrap_or_else(|| Vec::with_capacity(CHUNK))
    }
}

/// A filled buffer that goes back to its pool when the last reader drops it.
pub struct Chunk {
    buf: Vec<u8>,
    pool: Arc<Pool>,
}

impl Chunk {
    pub fn new(buf: Vec<u8>, pool: &Arc<Pool>) -> Self {
        Self {
            buf,
            pool: Arc::clone(pool),
        }
    }
}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let Ok(mut pool) = self.pool.0.lock() {
            pool.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Stream `file` in chunks read on a blocking thread into recycled buffers: one copy out of
/// the page cache, constant memory. Reading stops when the stream is dropped.
pub fn file_stream(file: std::fs::File) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    reader_stream(file, Pace::default())
}

/// How fast [`reader_stream`] may go, and the count of what it read.
#[derive(Debug, Clone, Default)]
pub struct Pace {
    /// At most this many bytes per second on average (none: as fast as it goes).
    pub bytes_per_second: Option<u64>,
    pub sent: Arc<AtomicU64>,
}

/// A reader that counts what was read through it (a push's progress, before compression).
pub struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R> Counted<R> {
    pub fn new(inner: R, read: Arc<AtomicU64>) -> Self {
        Self { inner, read }
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// [`file_stream`] of any reader (a compressing one, for example), paced: a chunk waits on the
/// reading thread until the bytes before it are due.
pub fn reader_stream(
    mut file: impl Read + Send + 'static,
    pace: Pace,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let pool = Arc::new(Pool::default());
        let started = Instant::now();
        loop {
            let mut buf = pool.take();
            // Only a new buffer is zeroed here; a recycled one keeps its length.
            buf.resize(CHUNK, 0);
            let item = match file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    let before = pace.sent.fetch_add(n as u64, Ordering::Relaxed);
                    if let Some(rate) = pace.bytes_per_second.filter(|r| *r > 0) {
                        let due = started + Duration::from_secs_f64(before as f64 / rate as f64);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    }
                    Ok(Bytes::from_owner(Chunk::new(buf, &pool)))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;

    use super::*;

    #[tokio::test]
    async fn a_file_streams_back_byte_for_byte_through_recycled_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..3 * CHUNK + 12_345).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let chunks: Vec<Bytes> = file_stream(std::fs::File::open(&path).unwrap())
            .try_collect()
            .await
            .unwrap();
        assert!(chunks.iter().all(|c| c.len() <= CHUNK));
        assert_eq!(chunks.concat(), bytes);
        std::fs::write(&path, b"").unwrap();
        let empty: Vec<Bytes> = file_stream(std::fs::File::open(&path).unwrap())
            .try_collect()
            .await
            .unwrap();
        assert!(empty.is_empty());
    }

    #[tokio::test]
    async fn a_paced_stream_keeps_to_its_rate_and_counts_what_went_through() {
        let pace = Pace {
            bytes_per_second: Some(8 * CHUNK as u64),
            ..Default::default()
        };
        let started = Instant::now();
        let out: Vec<Bytes> = reader_stream(std::io::repeat(7).take(4 * CHUNK as u64), pace.clone())
            .try_collect()
            .await
            .unwrap();
        // The 4th MiB may start once 3 MiB went at 8 MiB/s.
        assert!(
            started.elapsed() >= Duration::from_millis(375),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(out.concat().len(), 4 * CHUNK);
        assert_eq!(pace.sent.load(Ordering::Relaxed), 4 * CHUNK as u64);
    }
}
