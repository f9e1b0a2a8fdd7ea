//! The embedded default: JSON lines to a file or stdout. Needs no broker, so
//! a fresh checkout runs at once; "acknowledged" means written (and synced
//! when `fsync = true`).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{EncodeError, Encoded, Outgoing, PublishError, Publisher};
use crate::config::FileConfig;

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

fn write_batch(sink: &mut Sink, batch: &[Encoded]) -> std::io::Result<()> {
    fn lines(out: impl Write, batch: &[Encoded]) -> std::io::Result<()> {
        let mut out = BufWriter::with_capacity(64 * 1024, out);
        for m in batch {
            out.write_all(&m.payload)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    }
    match sink {
        Sink::Stdout => lines(std::io::stdout().lock(), batch),
        Sink::File { file, fsync } => {
            lines(&*file, batch)?;
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

    fn encode(&self, o: &Outgoing) -> Result<Encoded, EncodeError> {
        Ok(Encoded {
            seq: o.seq,
            destination: String::new(),
            key: o.event.task_id.clone(),
            id: o.event.event_id.clone(),
            headers: Vec::new(),
            payload: o.payload.clone(),
        })
    }

    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Result<(), PublishError>>> {
        let sink = self.sink.clone();
        let owned = batch.to_vec();
        async move {
            let n = owned.len();
            let result = tokio::task::spawn_blocking(move || {
                let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
                write_batch(&mut sink, &owned)
            })
            .await;
            // A write error (disk full, closed pipe) may heal: retry later.
            let outcome = match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(PublishError::Transient(format!("write failed: {e}"))),
                Err(e) => Err(PublishError::Transient(format!("writer task failed: {e}"))),
            };
            vec![outcome; n]
        }
        .boxed()
    }

    fn flush(&self, _timeout: Duration) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
}
