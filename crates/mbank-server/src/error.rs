//! Error answers: every failure becomes a JSON [`ErrorBody`] with the status and kind of
//! `docs/api.md`. Internal errors are logged in full and answered with a message that
//! names what failed, never with a panic.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mbank_access::AccessError;
use mbank_catalog::CatalogError;
use mbank_core::ChunkId;
use mbank_remote::wire::ErrorBody;
use mbank_store::StoreError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: Box<ErrorBody>,
    /// Seconds for a `Retry-After` header (`429`, `503`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: Box::new(ErrorBody {
                kind: kind.into(),
                message: message.into(),
                ..Default::default()
            }),
            retry_after: None,
        }
    }

    /// The same answer, telling the client to retry after `secs` seconds.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            AccessError::Unauthorized.to_string(),
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// The answer for a machine the user may not see: the same as for one that does
    /// not exist.
    pub fn no_machine(machine: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "machine_not_found",
            CatalogError::MachineNotFound(machine.to_string()).to_string(),
        );
        e.body.machine = Some(machine.to_string());
        e
    }

    /// The answer for a chunk the user may not read: the same as for a missing one.
    pub fn no_chunk(id: &ChunkId) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "chunk_not_found",
            StoreError::Missing(*id).to_string(),
        );
        e.body.chunk = Some(*id);
        e
    }
}

/// The kind of an error answer (docs/api.md), kept in the response's extensions for the
/// metrics and the request log.
#[derive(Clone, Debug)]
pub struct ErrorKind(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        let kind = ErrorKind(self.body.kind.clone());
        let mut r = (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r.extensions_mut().insert(kind);
        r
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        let msg = e.to_string();
        match e {
            CatalogError::MachineNotFound(m) => ApiError::no_machine(&m),
            CatalogError::VersionNotFound { machine, prefix } => {
                let mut a = ApiError::new(StatusCode::NOT_FOUND, "version_not_found", msg);
                a.body.machine = Some(machine);
                a.body.prefix = Some(prefix);
                a
            }
            CatalogError::NoHead(machine) => {
                let mut a = ApiError::new(StatusCode::NOT_FOUND, "no_head", msg);
                a.body.machine = Some(machine);
                a
            }
            CatalogError::AmbiguousVersion {
                machine,
                prefix,
                count,
            } => {
                let mut a = ApiError::new(StatusCode::CONFLICT, "ambiguous_version", msg);
                a.body.machine = Some(machine);
                a.body.prefix = Some(prefix);
                a.body.count = Some(count);
                a
            }
            CatalogError::LeaseHeld { machine, held } => {
                let mut a = ApiError::new(StatusCode::CONFLICT, "lease_held", msg);
                a.body.machine = Some(machine);
                a.body.lease = Some(*held);
                a
            }
            CatalogError::HeadMoved {
                machine,
                expected,
                head,
            } => {
                let mut a = ApiError::new(StatusCode::CONFLICT, "head_moved", msg);
                a.body.machine = Some(machine);
                a.body.head = head;
                a.body.expected_head = expected;
                a
            }
            CatalogError::InSession { machine, held } => {
                let mut a = ApiError::new(StatusCode::CONFLICT, "in_session", msg);
                a.body.machine = Some(machine);
                a.body.lease = Some(*held);
                a
            }
            CatalogError::MachineExists(machine) => {
                let mut a = ApiError::new(StatusCode::CONFLICT, "machine_exists", msg);
                a.body.machine = Some(machine);
                a
            }
            CatalogError::EmptyPolicy(_)
            | CatalogError::BadLabel(_)
            | CatalogError::BadRename(_) => ApiError::bad_request(msg),
            e if e.is_retryable() => ApiError::unavailable(format!("the catalog is busy: {e}")),
            e => {
                tracing::error!(error = %e, "catalog error");
                ApiError::internal(format!("the bank's catalog failed: {e}"))
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Missing(id) => ApiError::no_chunk(&id),
            StoreError::NoSpace { .. } => {
                tracing::error!(error = %e, "store full");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "no_space",
                    format!("{e}; the bank's administrator must free space"),
                )
            }
            e if e.is_retryable() => ApiError::unavailable(format!("the chunk store is busy: {e}")),
            e => {
                tracing::error!(error = %e, "store error");
                ApiError::internal(format!("the bank's chunk store failed: {e}"))
            }
        }
    }
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::Unauthorized => ApiError::unauthorized(),
            AccessError::TokenExpired(_) | AccessError::TokenRevoked(_) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
            }
            AccessError::QuotaExceeded {
                ref user,
                used,
                quota,
                need,
            } => {
                let mut a = ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "quota_exceeded",
                    e.to_string(),
                );
                a.body.user = Some(user.clone());
                a.body.used = Some(used);
                a.body.quota = Some(quota);
                a.body.need = Some(need);
                a
            }
            e if e.is_retryable() => {
                ApiError::unavailable(format!("the access database is busy: {e}"))
            }
            e => {
                tracing::error!(error = %e, "access database error");
                ApiError::internal(format!("the bank's access database failed: {e}"))
            }
        }
    }
}

impl From<mbank_bank::BankError> for ApiError {
    fn from(e: mbank_bank::BankError) -> Self {
        match e {
            mbank_bank::BankError::Catalog(c) => c.into(),
            mbank_bank::BankError::Store(s) => s.into(),
            e => {
                tracing::error!(error = %e, "bank error");
                ApiError::internal(e.to_string())
            }
        }
    }
}
