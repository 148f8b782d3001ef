//! Errors of the shard service, on both ends of a call.

/// What kind of failure a call met; the gRPC status code it travels as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Code {
    /// The frame or request is malformed (shape, dtype, sizes, missing fields).
    InvalidArgument,
    /// The call lacked the cluster's credential, or carried another cluster's.
    Unauthenticated,
    /// The node holds another plan epoch or no shard yet.
    FailedPrecondition,
    /// The model or request is not known here.
    NotFound,
    /// Too large, or too many requests at once.
    ResourceExhausted,
    /// The node or a later stage cannot be reached or went away.
    Unavailable,
    /// The call took too long.
    DeadlineExceeded,
    /// The caller went away.
    Cancelled,
    /// A failure inside the node.
    Internal,
}

impl Code {
    pub(crate) fn to_tonic(self) -> tonic::Code {
        match self {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::Unauthenticated => tonic::Code::Unauthenticated,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::NotFound => tonic::Code::NotFound,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Code::Cancelled => tonic::Code::Cancelled,
            Code::Internal => tonic::Code::Internal,
        }
    }

    pub(crate) fn from_tonic(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Code::InvalidArgument,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => Code::Unauthenticated,
            tonic::Code::FailedPrecondition | tonic::Code::Aborted => Code::FailedPrecondition,
            tonic::Code::NotFound => Code::NotFound,
            tonic::Code::ResourceExhausted => Code::ResourceExhausted,
            tonic::Code::Unavailable => Code::Unavailable,
            tonic::Code::DeadlineExceeded => Code::DeadlineExceeded,
            tonic::Code::Cancelled => Code::Cancelled,
            _ => Code::Internal,
        }
    }
}

/// An error of the shard service.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The node at `endpoint` could not be reached.
    #[error("cannot reach the node at {endpoint}: {message}")]
    Connect {
        /// The endpoint dialled.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// The node at `endpoint` is not of this cluster, or refused this process as not of its
    /// cluster: their TLS handshake failed on the certificates.
    #[error("the node at {endpoint} is not of this cluster: {message}")]
    Unauthenticated {
        /// The endpoint dialled.
        endpoint: String,
        /// What was refused, and why.
        message: String,
    },
    /// The node at `endpoint` answered with an error (or the connection to it failed mid-call).
    #[error("node at {endpoint}: {message}")]
    Remote {
        /// The endpoint called.
        endpoint: String,
        /// The kind of failure.
        code: Code,
        /// The node's message.
        message: String,
    },
    /// A failure to report to the caller of this node's service (raised by handlers and by
    /// frame validation).
    #[error("{message}")]
    Service {
        /// The kind of failure.
        code: Code,
        /// What went wrong, for the caller.
        message: String,
    },
}

impl Error {
    /// An error with this code and message, for a handler to return to its caller.
    pub fn service(code: Code, message: impl Into<String>) -> Self {
        Error::Service {
            code,
            message: message.into(),
        }
    }

    /// A malformed request or frame.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::service(Code::InvalidArgument, message)
    }

    /// The kind of failure.
    pub fn code(&self) -> Code {
        match self {
            Error::Connect { .. } => Code::Unavailable,
            Error::Unauthenticated { .. } => Code::Unauthenticated,
            Error::Remote { code, .. } | Error::Service { code, .. } => *code,
        }
    }

    pub(crate) fn remote(endpoint: &str, status: &tonic::Status) -> Self {
        let code = Code::from_tonic(status.code());
        // Failures of the connection itself (not errors the node reported) come with tonic's
        // own wording; say what they mean.
        let reported = status.metadata().get(REPORTED).is_some();
        let lost = !reported
            && matches!(
                status.code(),
                tonic::Code::Unknown
                    | tonic::Code::Unavailable
                    | tonic::Code::Internal
                    | tonic::Code::Cancelled
            )
            && (status.message().is_empty()
                || status.message().contains("h2 protocol error")
                || status.message().contains("transport error")
                || status.message().contains("connection"));
        let code = if lost { Code::Unavailable } else { code };
        let message = if lost {
            format!(
                "the connection was lost (did the node stop?): {}",
                status.message()
            )
        } else if status.message().is_empty() {
            format!("{:?}", status.code())
        } else {
            status.message().to_owned()
        };
        Error::Remote {
            endpoint: endpoint.to_owned(),
            code,
            message,
        }
    }

    pub(crate) fn into_status(self) -> tonic::Status {
        let mut status = tonic::Status::new(self.code().to_tonic(), self.to_string());
        status
            .metadata_mut()
            .insert(REPORTED, tonic::metadata::MetadataValue::from_static("1"));
        status
    }
}

/// Marks statuses a node reported itself, as opposed to failures of the connection.
const REPORTED: &str = "x-exo-reported";

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
