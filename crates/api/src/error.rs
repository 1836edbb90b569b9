//! The API's one error shape: `{"code": ..., "message": ..., "details": ...}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pairvisor_agent::AgentError;
use pairvisor_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

/// An error as the API returns it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code (`not_found`, `operation_not_allowed`, ...).
    pub code: String,
    /// What was wrong and what is allowed, for people.
    pub message: String,
    /// Extra structured information, when there is any.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Body.
    pub body: ErrorBody,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                code: code.into(),
                message: message.into(),
                details: None,
            },
            retry_after: None,
        }
    }

    /// 400 with code `invalid_input`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }
}

/// Kept in the response's extensions so that the audit layer can record why
/// a request failed.
#[derive(Debug, Clone)]
pub struct ErrorInfo(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let info = ErrorInfo(format!("{}: {}", self.body.code, self.body.message));
        let mut r = (self.status, axum::Json(self.body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(s),
            );
        }
        r.extensions_mut().insert(info);
        r
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        let status = match &e {
            AgentError::NotFound { .. } => StatusCode::NOT_FOUND,
            AgentError::AlreadyExists { .. }
            | AgentError::NotAllowed(_)
            | AgentError::Conflict(_) => StatusCode::CONFLICT,
            AgentError::Name(_) | AgentError::Invalid(_) => StatusCode::BAD_REQUEST,
            AgentError::Admission(_) => StatusCode::UNPROCESSABLE_ENTITY,
            // The unit database could not take the change (no quorum).
            AgentError::Store(StoreError::Unit(_) | StoreError::Conflict(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AgentError::Store(_) | AgentError::Hypervisor(_) | AgentError::Io { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let details = match &e {
            AgentError::NotAllowed(n) => Some(serde_json::json!({
                "state": n.state,
                "allowed_operations": pairvisor_model::vm::allowed_operations(n.state)
                    .iter().map(|o| o.as_str()).collect::<Vec<_>>(),
            })),
            AgentError::Admission(
                pairvisor_model::admission::AdmissionError::InsufficientMemory {
                    needed_mib,
                    free_mib,
                    holders,
                },
            ) => Some(serde_json::json!({
                "needed_mib": needed_mib,
                "free_mib": free_mib,
                "missing_mib": needed_mib.saturating_sub(*free_mib),
                "holders": holders,
            })),
            _ => None,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("request failed: {e}");
        }
        let mut err = ApiError::new(status, e.code(), e.to_string());
        err.body.details = details;
        err
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        AgentError::from(e).into()
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
