//! The cluster credential: a secret derived from the cluster key, sent as a bearer token on
//! every call and checked by every server before anything else runs.

use std::fmt;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The secret every call between the nodes of one cluster carries.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential([u8; 32]);

impl Credential {
    /// The purpose string to derive a credential from the cluster key with (the cluster key's
    /// `derive`), so that every node derives the same one.
    pub const PURPOSE: &'static str = "exo.shard.v1 credential";

    /// Wraps a derived secret.
    pub fn new(secret: [u8; 32]) -> Self {
        Credential(secret)
    }

    fn header(&self) -> String {
        let mut text = String::with_capacity(7 + 64);
        text.push_str("Bearer ");
        for b in self.0 {
            text.push_str(&format!("{b:02x}"));
        }
        text
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(..)")
    }
}

/// Adds the credential to outgoing calls.
#[derive(Clone, Debug)]
pub(crate) struct AddCredential {
    value: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl AddCredential {
    pub(crate) fn new(credential: Option<&Credential>) -> Self {
        AddCredential {
            value: credential.and_then(|c| c.header().parse().ok()),
        }
    }
}

impl Interceptor for AddCredential {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.value {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Refuses calls that do not carry the credential.
#[derive(Clone, Debug)]
pub(crate) struct CheckCredential {
    expected: Vec<u8>,
}

impl CheckCredential {
    pub(crate) fn new(credential: &Credential) -> Self {
        CheckCredential {
            expected: credential.header().into_bytes(),
        }
    }
}

impl Interceptor for CheckCredential {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(given) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "missing cluster credential (is the caller a node of this cluster?)",
            ));
        };
        let given = given.as_bytes();
        // Compare in constant time so the secret cannot be guessed byte by byte.
        let same = given.len() == self.expected.len()
            && given
                .iter()
                .zip(&self.expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "wrong cluster credential (the caller uses another cluster key)",
            ))
        }
    }
}
