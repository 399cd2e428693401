//! Errors of the engine, each with the HTTP status class it maps to.

/// What went wrong, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The named thing does not exist (HTTP 404).
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    /// The request conflicts with the current state (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed or missing something (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// The daemon is shutting down (HTTP 503).
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// Stored data failed a check, or I/O failed (HTTP 500).
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        EngineError::NotFound {
            what,
            id: id.into(),
        }
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        EngineError::Internal(e.to_string())
    }
    /// HTTP status code for this error.
    pub fn status_code(&self) -> u16 {
        match self {
            EngineError::NotFound { .. } => 404,
            EngineError::Conflict(_) => 409,
            EngineError::BadRequest(_) => 400,
            EngineError::ShuttingDown => 503,
            EngineError::Internal(_) => 500,
        }
    }
}

impl From<sled::Error> for EngineError {
    fn from(e: sled::Error) -> Self {
        EngineError::Internal(format!("catalog: {e}"))
    }
}

impl From<chainvault_qcow::Error> for EngineError {
    fn from(e: chainvault_qcow::Error) -> Self {
        EngineError::Internal(e.to_string())
    }
}

pub type EngineResult<T> = Result<T, EngineError>;
