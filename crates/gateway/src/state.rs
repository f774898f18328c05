//! [`AppState`]: what every handler shares (backend, config, admission, metrics, the shutdown
//! flag). Cheap to clone.

use crate::accounts::Accounts;
use crate::backend::{Backend, ModelEntry};
use crate::config::GatewayConfig;
use crate::limits::Limits;
use crate::metrics::Metrics;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The shared state of one gateway.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    config: GatewayConfig,
    limits: Limits,
    metrics: Metrics,
    cancelled: AtomicBool,
    accounts: Option<Arc<Accounts>>,
    grammars: crate::grammar::Grammars,
}

impl AppState {
    pub fn new(backend: Arc<dyn Backend>, config: GatewayConfig) -> Self {
        Self::with_accounts(backend, config, None)
    }

    /// A gateway that charges requests to API keys' accounts on a ledger (`None`: free).
    pub fn with_accounts(
        backend: Arc<dyn Backend>,
        config: GatewayConfig,
        accounts: Option<Arc<Accounts>>,
    ) -> Self {
        let metrics = Metrics::new();
        let limits = Limits::new(
            config.max_concurrent,
            config.max_queue,
            config.retry_after,
            metrics.queue_depth.clone(),
            metrics.in_flight.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                backend,
                config,
                limits,
                metrics,
                cancelled: AtomicBool::new(false),
                accounts,
                grammars: Default::default(),
            }),
        }
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// The backend's models under their served names (`--alias`).
    pub fn models(&self) -> Vec<ModelEntry> {
        let mut models = self.inner.backend.models();
        for m in &mut models {
            m.id = self.served_name(&m.id).to_owned();
        }
        models
    }

    /// The name the model `id` is served under.
    pub fn served_name<'a>(&'a self, id: &'a str) -> &'a str {
        self.inner
            .config
            .aliases
            .iter()
            .find(|(of, _)| of == id)
            .map_or(id, |(_, alias)| alias.as_str())
    }

    /// The backend's model a request names, by its served name or its own id (the entry keeps
    /// the backend's id).
    pub fn find_model(&self, name: &str) -> Option<ModelEntry> {
        self.inner
            .backend
            .models()
            .into_iter()
            .find(|m| m.id == name || self.served_name(&m.id) == name)
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    /// The ledger requests are charged to, if any.
    pub fn accounts(&self) -> Option<&Arc<Accounts>> {
        self.inner.accounts.as_ref()
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Grammar engines per model (structured outputs, tool calls).
    pub(crate) fn grammars(&self) -> &crate::grammar::Grammars {
        &self.inner.grammars
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Stops every running generation at its next piece of text (shutdown after the grace
    /// period). Their clients get a 503 or an error event.
    pub fn cancel_all(&self) {
        self.inner.cancelled.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::Acquire)
    }
}
