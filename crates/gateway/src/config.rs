//! [`GatewayConfig`]: the limits and timings of one gateway, with documented defaults.

use std::time::Duration;

/// How a gateway admits and runs requests. Build with [`GatewayConfig::new`] (the defaults) and
/// the `with_*` setters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Generations running at once (the local engine batches them). Default 32.
    pub max_concurrent: usize,
    /// Requests waiting for a free generation slot; one more gets 429 at once. Default 64.
    pub max_queue: usize,
    /// Largest request body in bytes; a larger one gets 413. Default 1 MiB.
    pub max_body_bytes: usize,
    /// The `Retry-After` a 429 carries. Default 1 s.
    pub retry_after: Duration,
    /// How long shutdown waits for in-flight requests before cancelling them. Default 10 s.
    pub shutdown_grace: Duration,
    /// Text pieces buffered between a generation and its HTTP response; when the client reads
    /// slower, pieces are merged rather than stalling the engine. Default 64.
    pub stream_buffer: usize,
    /// How long a finished generation waits for a stalled client to take its last events
    /// before giving up on it. Default 30 s.
    pub stall_timeout: Duration,
    /// When set, every route but `/health` needs this key ([`crate::auth`]). Default none.
    pub api_key: Option<String>,
    /// Browser origins allowed besides this machine's own ([`crate::cors`]; `*`: any).
    pub cors_origins: Vec<String>,
    /// Served names (llama-server's `--alias`): (model id, the name clients see instead).
    /// Requests may use either name. Default none.
    pub aliases: Vec<(String, String)>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 32,
            max_queue: 64,
            max_body_bytes: 1 << 20,
            retry_after: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
            stream_buffer: 64,
            stall_timeout: Duration::from_secs(30),
            api_key: None,
            cors_origins: Vec::new(),
            aliases: Vec::new(),
        }
    }
}

impl GatewayConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Generations running at once (at least 1).
    pub fn with_max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n.max(1);
        self
    }

    /// Requests that may wait for a slot (0: none wait, a busy gateway answers 429 at once).
    pub fn with_max_queue(mut self, n: usize) -> Self {
        self.max_queue = n;
        self
    }

    /// Largest request body in bytes.
    pub fn with_max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }

    pub fn with_retry_after(mut self, d: Duration) -> Self {
        self.retry_after = d;
        self
    }

    pub fn with_shutdown_grace(mut self, d: Duration) -> Self {
        self.shutdown_grace = d;
        self
    }

    /// Pieces buffered per response (at least 2: the start event and one piece).
    pub fn with_stream_buffer(mut self, n: usize) -> Self {
        self.stream_buffer = n.max(2);
        self
    }

    pub fn with_stall_timeout(mut self, d: Duration) -> Self {
        self.stall_timeout = d;
        self
    }

    /// Allows browser pages from `origins` too (`*`: any origin).
    pub fn with_cors_origins(mut self, origins: Vec<String>) -> Self {
        self.cors_origins = origins;
        self
    }

    /// Serves the model `id` as `alias` (listed under that name, answered with it).
    pub fn with_alias(mut self, id: impl Into<String>, alias: impl Into<String>) -> Self {
        self.aliases.push((id.into(), alias.into()));
        self
    }

    /// Requires `key` on every route but `/health` (an empty key is no key).
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key.filter(|k| !k.is_empty());
        self
    }
}
