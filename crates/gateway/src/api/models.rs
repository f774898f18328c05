//! `GET /v1/models`, `GET /v1/models/{id}` and `GET /health`.

use crate::backend::ModelEntry;
use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

fn model_object(m: &ModelEntry) -> Value {
    json!({
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": "plexus",
        "context_length": m.context,
        "identity": m.identity,
    })
}

pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state.models().iter().map(model_object).collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state
        .find_model(&id)
        .map(|mut m| {
            m.id = state.served_name(&m.id).to_owned();
            Json(model_object(&m))
        })
        .ok_or(ApiError::ModelNotFound(id))
}

/// 200 `{"status":"ok"}` while the backend lists a model, else 503.
pub async fn health(State(state): State<AppState>) -> Response {
    if state.backend().models().is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": "no model is being served"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}
