//! Archives still arriving, readable as they arrive: the runtime's pull of a checkpoint image
//! downloads its layer while the source is still sending it, instead of after (the download
//! and the transfer each move the whole memory; overlapped, the freeze pays for one).
//!
//! Nothing unverified gets into the runtime: the last byte is held back until the receiver has
//! checked the archive's digest and structure, so the runtime's download cannot complete
//! before; a refused archive ends the stream with an error and the runtime discards what it
//! had. (The runtime checks the digest itself too.)

use std::{
    collections::HashMap,
    io,
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;

use super::chunks::CHUNK;

/// How far an incoming archive is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// `written` bytes are in `path` (the part file).
    Receiving { path: PathBuf, written: u64 },
    /// Verified, complete, at `path`.
    Done { path: PathBuf },
    /// Refused or interrupted: what was read of it is worthless.
    Failed,
}

/// An incoming archive's expected size and progress.
type Arriving = (u64, watch::Receiver<Progress>);

/// Incoming archives by digest.
#[derive(Clone, Default)]
pub struct Incoming(Arc<Mutex<HashMap<String, Arriving>>>);

impl Incoming {
    /// Announce that `digest` (`size` bytes) is being received into `part`.
    pub fn begin(&self, digest: &str, size: u64, part: PathBuf) -> Feed {
        let (tx, rx) = watch::channel(Progress::Receiving { path: part, written: 0 });
        self.0
            .lock()
            .expect("incoming map poisoned")
            .insert(digest.to_string(), (size, rx));
        Feed {
            tx,
            incoming: self.clone(),
            digest: digest.to_string(),
        }
    }

    /// The expected size and a stream of `digest`, if it is arriving or arrived here.
    pub fn read(&self, digest: &str) -> Option<(u64, impl Stream<Item = io::Result<Bytes>> + use<>)> {
        let (size, rx) = self.0.lock().expect("incoming map poisoned").get(digest).cloned()?;
        Some((size, stream(rx, size)))
    }

    /// `digest` is served from the image layout now.
    pub fn forget(&self, digest: &str) {
        self.0.lock().expect("incoming map poisoned").remove(digest);
    }
}

/// The receiver's side of one incoming archive. Dropped before [`Feed::done`]: failed.
pub struct Feed {
    tx: watch::Sender<Progress>,
    incoming: Incoming,
    digest: String,
}

impl Feed {
    /// `written` bytes are in the part file.
    pub fn written(&self, written: u64) {
        self.tx.send_modify(|p| {
            if let Progress::Receiving { written: w, .. } = p {
                *w = written;
            }
        });
    }

    /// Verified and renamed to `path`.
    pub fn done(&self, path: PathBuf) {
        self.tx.send_replace(Progress::Done { path });
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        let failed = !matches!(*self.tx.borrow(), Progress::Done { .. });
        if failed {
            self.tx.send_replace(Progress::Failed);
            self.incoming.forget(&self.digest);
        }
    }
}

/// How many of `size` bytes may be handed out at `progress`: all once done, else what is
/// written but never the last byte.
pub fn readable(progress: &Progress, size: u64) -> Option<u64> {
    match progress {
        Progress::Receiving { written, .. } => Some((*written).min(size.saturating_sub(1))),
        Progress::Done { .. } => Some(size),
        Progress::Failed => None,
    }
}

struct Reader {
    rx: watch::Receiver<Progress>,
    size: u64,
    offset: u64,
    file: Option<Arc<std::fs::File>>,
}

fn stream(rx: watch::Receiver<Progress>, size: u64) -> impl Stream<Item = io::Result<Bytes>> {
    let reader = Reader {
        rx,
        size,
        offset: 0,
        file: None,
    };
    futures::stream::unfold(Some(reader), |reader| async move {
        let mut r = reader?;
        if r.offset >= r.size {
            return None;
        }
        loop {
            let progress = r.rx.borrow_and_update().clone();
            let Some(allowed) = readable(&progress, r.size) else {
                let e = io::Error::other("the archive was refused or interrupted while it was read");
                return Some((Err(e), None));
            };
            if allowed > r.offset {
                let path = match &progress {
                    Progress::Receiving { path, .. } | Progress::Done { path } => path.clone(),
                    Progress::Failed => unreachable!("no bytes are readable once failed"),
                };
                // Opened once: the part file keeps its inode through the rename.
                let file = match &r.file {
                    Some(f) => Arc::clone(f),
                    None => match std::fs::File::open(&path) {
                        Ok(f) => Arc::clone(r.file.insert(Arc::new(f))),
                        Err(e) => return Some((Err(e), None)),
                    },
                };
                let (offset, len) = (r.offset, (allowed - r.offset).min(CHUNK as u64) as usize);
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, offset).map(|()| Bytes::from(buf))
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
                return match read {
                    Ok(bytes) => {
                        r.offset += bytes.len() as u64;
                        Some((Ok(bytes), Some(r)))
                    }
                    Err(e) => Some((Err(e), None)),
                };
            }
            if r.rx.changed().await.is_err() && readable(&r.rx.borrow(), r.size).is_none_or(|a| a <= r.offset) {
                let e = io::Error::other("the receiver of the archive went away");
                return Some((Err(e), None));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use std::io::Write;

    use super::*;

    #[test]
    fn the_last_byte_waits_for_the_verdict() {
        let receiving = |written| Progress::Receiving {
            path: "/p".into(),
            written,
        };
        assert_eq!(readable(&receiving(0), 10), Some(0));
        assert_eq!(readable(&receiving(4), 10), Some(4));
        assert_eq!(readable(&receiving(10), 10), Some(9), "all written, not yet verified");
        assert_eq!(readable(&Progress::Done { path: "/p".into() }, 10), Some(10));
        assert_eq!(readable(&Progress::Failed, 10), None);
    }

    #[tokio::test]
    async fn a_reader_follows_the_writer_and_gets_every_byte_once_verified() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("a.part");
        let bytes: Vec<u8> = (0..(3 * CHUNK + 5)).map(|i| (i % 251) as u8).collect();
        let incoming = Incoming::default();
        let feed = incoming.begin("sha256:aa", bytes.len() as u64, part.clone());
        let (size, stream) = incoming.read("sha256:aa").unwrap();
        assert_eq!(size, bytes.len() as u64);
        let reader = tokio::spawn(async move {
            let parts: Vec<io::Result<Bytes>> = stream.collect().await;
            parts
                .into_iter()
                .collect::<io::Result<Vec<Bytes>>>()
                .map(|v| v.concat())
        });
        let mut file = std::fs::File::create(&part).unwrap();
        for piece in bytes.chunks(CHUNK / 2) {
            file.write_all(piece).unwrap();
            feed.written(file.metadata().unwrap().len());
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "the last byte was handed out before the verdict");
        let done = dir.path().join("a.tar");
        std::fs::rename(&part, &done).unwrap();
        feed.done(done);
        assert_eq!(reader.await.unwrap().unwrap(), bytes);
        assert!(incoming.read("sha256:aa").is_some(), "kept until the layout has it");
        incoming.forget("sha256:aa");
        assert!(incoming.read("sha256:aa").is_none());
    }

    #[tokio::test]
    async fn a_refused_archive_ends_the_stream_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("b.part");
        std::fs::write(&part, vec![7u8; 1000]).unwrap();
        let incoming = Incoming::default();
        let feed = incoming.begin("sha256:bb", 2000, part);
        feed.written(1000);
        let (_, stream) = incoming.read("sha256:bb").unwrap();
        let reader = tokio::spawn(stream.collect::<Vec<_>>());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(feed); // the receiver refused it
        let parts = reader.await.unwrap();
        assert_eq!(
            parts
                .iter()
                .filter_map(|p| p.as_ref().ok())
                .map(Bytes::len)
                .sum::<usize>(),
            1000
        );
        assert!(
            parts.last().unwrap().is_err(),
            "the stream must end in an error, not short"
        );
        assert!(
            incoming.read("sha256:bb").is_none(),
            "a failed archive is not offered again"
        );
    }
}
