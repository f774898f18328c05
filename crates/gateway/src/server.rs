//! The router ([`app`]) and the server loop with graceful shutdown ([`serve`]).
//!
//! Every response passes the `track` middleware, which counts it by route and status. Unknown
//! routes and wrong methods get 404/405 bodies in the dialect of the path
//! ([`crate::error::Dialect::of_path`]); bodies over the limit get 413. The routes: OpenAI's
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/v1/models`), Anthropic's
//! (`/v1/messages`) and Ollama's (`/api/chat`, `/api/generate`, `/api/tags`, `/api/show`).
//! The OpenAI routes also answer without the `/v1` prefix (`/chat/completions`, `/models`, as
//! llama-server does), since clients are often configured with a bare base URL. With an API
//! key configured, [`crate::auth`] checks it first.

use crate::api::{chat, completions, messages, models, ollama, responses};
use crate::backend::Backend;
use crate::config::GatewayConfig;
use crate::error::{ApiError, Dialect};
use crate::metrics::RequestLabels;
use crate::state::AppState;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::future::{Future, IntoFuture};
use std::io;
use std::sync::Arc;
use tower_http::trace::TraceLayer;

/// The gateway's routes over `state`; serve it with [`serve`], or call it directly in tests
/// (`app(state).oneshot(request)`).
pub fn app(state: AppState) -> Router {
    let limit = state.config().max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat::handler))
        .route("/v1/completions", post(completions::handler))
        .route("/v1/messages", post(messages::handler))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/responses", post(responses::handler))
        .route("/responses", post(responses::handler))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/v1/models", get(models::list))
        .route("/v1/account", get(crate::accounts::account))
        .route("/v1/models/{id}", get(models::retrieve))
        .route("/chat/completions", post(chat::handler))
        .route("/completions", post(completions::handler))
        .route("/models", get(models::list))
        .route("/models/{id}", get(models::retrieve))
        .route("/health", get(models::health))
        .route("/metrics", get(metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_key,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(crate::cors::layer(&state.config().cors_origins))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics().render(state.backend().as_ref());
    let mut res = text.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    res
}

async fn unknown_route(method: Method, uri: Uri) -> Response {
    ApiError::UnknownRoute {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
    .response_in(Dialect::of_path(uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
    .response_in(Dialect::of_path(uri.path()))
}

/// Counts every response by route (bounded: matched routes or `unmatched`) and status.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let res = next.run(req).await;
    state
        .metrics()
        .requests
        .get_or_create(&RequestLabels {
            route,
            status: res.status().as_u16(),
        })
        .inc();
    res
}

/// Serves the gateway for `backend` on `listener` until `shutdown` completes, then stops
/// accepting, lets in-flight requests finish for up to `config.shutdown_grace`, cancels the
/// generations still running and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: Arc<dyn Backend>,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let state = AppState::new(backend, config);
    serve_state(listener, state, shutdown).await
}

/// [`serve`] with a state built by the caller (to keep a handle on it).
pub async fn serve_state(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let grace = state.config().shutdown_grace;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        })
        .into_future();
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r,
        () = shutdown => {}
    }
    tracing::info!("shutting down: waiting up to {grace:?} for in-flight requests");
    let _ = stop_tx.send(true);
    match tokio::time::timeout(grace, &mut server).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("grace period over: cancelling the requests still running");
            state.cancel_all();
            // Cancelled generations end at their next token; give their responses a moment
            // to close before the connections are dropped with the runtime.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), &mut server).await;
            Ok(())
        }
    }
}
