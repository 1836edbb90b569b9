//! The agent's errors. Each says what was wrong and, where it helps, what to
//! do instead; the API maps the variants to HTTP statuses.

use pairvisor_model::admission::AdmissionError;
use pairvisor_model::names::NameError;
use pairvisor_model::vm::NotAllowed;
use pairvisor_store::StoreError;
use thiserror::Error;

/// Why an agent operation failed.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The named object does not exist.
    #[error("{kind} '{name}' does not exist")]
    NotFound {
        /// "VM", "volume", "VCD", "storage group".
        kind: &'static str,
        /// The name given.
        name: String,
    },
    /// An object of that name exists already.
    #[error("{kind} '{name}' already exists; choose another name")]
    AlreadyExists {
        /// The kind of object.
        kind: &'static str,
        /// The name given.
        name: String,
    },
    /// A name is not valid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Input that is invalid for another reason.
    #[error("{0}")]
    Invalid(String),
    /// The VM's state does not allow the operation (SPEC V4).
    #[error(transparent)]
    NotAllowed(#[from] NotAllowed),
    /// An admission rule refused the request (SPEC V2, V3, S5).
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// The request conflicts with how objects are related (e.g. deleting an
    /// attached volume).
    #[error("{0}")]
    Conflict(String),
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// QEMU refused or failed.
    #[error("hypervisor: {0}")]
    Hypervisor(String),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// A short machine-readable code for the API's error body.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::NotFound { .. } => "not_found",
            AgentError::AlreadyExists { .. } => "already_exists",
            AgentError::Name(_) => "invalid_name",
            AgentError::Invalid(_) => "invalid_input",
            AgentError::NotAllowed(_) => "operation_not_allowed",
            AgentError::Admission(_) => "admission_refused",
            AgentError::Conflict(_) => "conflict",
            AgentError::Store(_) => "store_error",
            AgentError::Hypervisor(_) => "hypervisor_error",
            AgentError::Io { .. } => "io_error",
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }
}

/// Shorthand for results of agent operations.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;
