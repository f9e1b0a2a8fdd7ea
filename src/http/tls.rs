//! Native TLS for the public listener (rustls, ring). The certificate sits
//! behind a resolver that can be swapped while serving: a reload changes
//! what new handshakes get, open connections are left alone. A reload that
//! fails (a half-written file, a key that does not match) keeps the current
//! certificate, logs why and counts it (`hookbridge_tls_reload_failures_total`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::outbox::Stats;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("unusable TLS key or certificate: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The acceptor and what it needs to reload its certificate.
pub struct Tls {
    acceptor: TlsAcceptor,
    resolver: Arc<Resolver>,
    config: TlsConfig,
    /// Modification times of (cert, key) at the last load.
    loaded: (Option<SystemTime>, Option<SystemTime>),
    /// Where a failed reload is counted ([`Tls::counting_in`]).
    stats: Option<Arc<Stats>>,
}

#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|current| current.clone())
    }
}

impl Tls {
    /// Loads the certificate and key; fails (naming the file) when either
    /// cannot be used.
    pub fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        let loaded = modified(config);
        let key = certified_key(&config.cert, &config.key)?;
        let resolver = Arc::new(Resolver(RwLock::new(key)));
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            resolver,
            config: config.clone(),
            loaded,
            stats: None,
        })
    }

    /// Counts failed reloads in `stats` (their metrics).
    pub fn counting_in(mut self, stats: Arc<Stats>) -> Self {
        self.stats = Some(stats);
        self
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    pub fn check_every(&self) -> Duration {
        Duration::from_millis(self.config.reload_check_ms)
    }

    /// Reloads when a file's modification time changed since the last load.
    pub async fn reload_if_changed(&mut self) {
        let config = self.config.clone();
        let now = match tokio::task::spawn_blocking(move || modified(&config)).await {
            Ok(now) => now,
            Err(e) => {
                self.failed(&format!("looking at the files failed: {e}"));
                return;
            }
        };
        if now != self.loaded {
            self.reload().await;
        }
    }

    /// Re-reads both files and swaps the certificate in if they are usable.
    pub async fn reload(&mut self) {
        let config = self.config.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            (modified(&config), certified_key(&config.cert, &config.key))
        })
        .await;
        let (times, key) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => return self.failed(&format!("reading the files failed: {e}")),
        };
        self.loaded = times;
        match key {
            Ok(key) => match self.resolver.0.write() {
                Ok(mut current) => {
                    *current = key;
                    tracing::info!(cert = %self.config.cert.display(), "TLS certificate reloaded");
                }
                Err(_) => self.failed("the certificate's lock is poisoned"),
            },
            Err(e) => self.failed(&e.to_string()),
        }
    }

    /// A reload failed: the current certificate stays; logged and counted.
    fn failed(&self, why: &str) {
        tracing::error!(error = %why, cert = %self.config.cert.display(), "TLS reload failed; keeping the current certificate");
        if let Some(stats) = &self.stats {
            stats.metrics.tls_reload_failed();
        }
    }
}

fn modified(config: &TlsConfig) -> (Option<SystemTime>, Option<SystemTime>) {
    let time = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    (time(&config.cert), time(&config.key))
}

fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |path: &Path, e: &dyn std::fmt::Display| TlsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(cert, &e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| read(key, &e))?;
    let provider = default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)?;
    Ok(Arc::new(certified))
}
