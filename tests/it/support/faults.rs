//! A real publisher with faults that a test injects: the test's [`Faults`]
//! decide, per message or batch, whether to answer in the real
//! publisher's place.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hookbridge::config::PublisherConfig;
use hookbridge::publish::{self, EncodeError, Encoded, Outgoing, Published, Publisher};

/// What a test injects. `None` lets the real publisher answer.
pub trait Faults: Send + Sync + 'static {
    fn encode(&self, _message: &Outgoing) -> Option<Result<Encoded, EncodeError>> {
        None
    }

    fn publish<'a>(&'a self, _batch: &'a [Encoded]) -> Option<BoxFuture<'a, Vec<Published>>> {
        None
    }
}

/// The publisher of `config`, with `faults` in front of it.
pub struct Faulty<F> {
    inner: Arc<dyn Publisher>,
    pub faults: F,
}

/// Builds the publisher of `config` and puts `faults` in front of it.
pub async fn wrap<F: Faults>(config: &PublisherConfig, faults: F) -> Arc<Faulty<F>> {
    let inner = Arc::from(
        publish::build(config, 1024 * 1024)
            .await
            .expect("publisher builds"),
    );
    Arc::new(Faulty { inner, faults })
}

impl<F: Faults> Publisher for Faulty<F> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn encode(&self, message: &Outgoing) -> Result<Encoded, EncodeError> {
        match self.faults.encode(message) {
            Some(answer) => answer,
            None => self.inner.encode(message),
        }
    }

    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Published>> {
        match self.faults.publish(batch) {
            Some(answer) => answer,
            None => self.inner.publish(batch),
        }
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        self.inner.flush(timeout)
    }
}
