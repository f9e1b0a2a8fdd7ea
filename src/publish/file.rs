//! The embedded default: JSON lines to a file or stdout. Needs no broker, so
//! a fresh checkout runs at once; "acknowledged" means written (and synced
//! when `fsync = true`).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::config::FileConfig;
use super::{EncodeError, Encoded, Outgoing, PublishError, Published, Publisher, Receipt};
use crate::sync::lock;

enum Sink {
    Stdout,
    File { file: File, fsync: bool },
}

pub struct FilePublisher {
    sink: Arc<Mutex<Sink>>,
}

impl FilePublisher {
    pub fn open(config: &FileConfig) -> anyhow::Result<Self> {
        let sink = if config.path == "-" {
            Sink::Stdout
        } else {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&config.path)
                .map_err(|e| {
                    anyhow::anyhow!("cannot open publisher.path {:?}: {e}", config.path)
                })?;
            Sink::File {
                file,
                fsync: config.fsync,
            }
        };
        Ok(Self {
            sink: Arc::new(Mutex::new(sink)),
        })
    }
}

/// One event as one line of the file: its JSON and a newline. Total: a payload holding a
/// line break of its own (which would make two lines of one event) is an [`EncodeError`].
pub fn encode(o: &Outgoing) -> Result<Vec<u8>, EncodeError> {
    if o.payload.contains(&b'\n') {
        return Err(EncodeError::NotOneLine);
    }
    let mut line = Vec::with_capacity(o.payload.len() + 1);
    line.extend_from_slice(&o.payload);
    line.push(b'\n');
    Ok(line)
}

fn write_batch(sink: &mut Sink, lines: &[bytes::Bytes]) -> std::io::Result<()> {
    fn write_lines(out: impl Write, lines: &[bytes::Bytes]) -> std::io::Result<()> {
        let mut out = BufWriter::with_capacity(64 * 1024, out);
        for line in lines {
            out.write_all(line)?;
        }
        out.flush()
    }
    match sink {
        Sink::Stdout => write_lines(std::io::stdout().lock(), lines),
        Sink::File { file, fsync } => {
            write_lines(&*file, lines)?;
            if *fsync {
                file.sync_data()?;
            }
            Ok(())
        }
    }
}

impl Publisher for FilePublisher {
    fn name(&self) -> &'static str {
        "file"
    }

    /// The payload of the result is the whole line, newline included.
    fn encode(&self, o: &Outgoing) -> Result<Encoded, EncodeError> {
        Ok(Encoded::of(o, String::new(), Vec::new(), encode(o)?.into()))
    }

    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Published>> {
        let sink = self.sink.clone();
        let lines: Vec<bytes::Bytes> = batch.iter().map(|m| m.payload.clone()).collect();
        async move {
            let result = tokio::task::spawn_blocking(move || {
                let mut sink = lock(&sink);
                write_batch(&mut sink, &lines)
            })
            .await;
            // A write error (disk full, closed pipe) may heal: retry later.
            let outcome = match result {
                Ok(Ok(())) => Ok(Receipt::default()),
                Ok(Err(e)) => Err(PublishError::Transient(format!("write failed: {e}"))),
                Err(e) => Err(PublishError::Transient(format!("writer task failed: {e}"))),
            };
            vec![outcome; batch.len()]
        }
        .boxed()
    }

    fn flush(&self, _timeout: Duration) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
}
