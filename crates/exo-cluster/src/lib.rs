//! The node runtime: what `exo-node serve` runs. It composes the other crates:
//!
//! - membership (`exo-topology`) says who is in the cluster and what each node offers;
//! - every node turns the same snapshot into the same plan (`exo-partition`, pipeline stages,
//!   with a plan epoch that is a hash of the plan itself) and loads **only its own layers**
//!   (`exo-shard`);
//! - the shard service (`exo-transport`) carries each request's activations from stage to
//!   stage, and the sampled token back;
//! - the node that receives a request (through [`Node::generate`], the gRPC `Generate` call or
//!   the HTTP API) tokenizes it, drives the stages, and streams text back.
//!
//! This crate is the only place that knows all of them; it must NOT know HTTP or the OpenAI
//! wire format (the API crate reaches it through its engine trait, implemented in the binary).

mod error;
mod node;
mod origin;
mod planning;
mod runtime;

pub use error::{Error, Result};
pub use node::{ClusterConfig, Node, PlanState, run};
pub use planning::{ActivePlan, model_profile};
