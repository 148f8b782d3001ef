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
//! It also implements the API crate's engine trait twice ([`NodeEngine`] over a node's own
//! runtime, [`GatewayEngine`] for a gateway that computes nothing and forwards to a node), and
//! runs a gateway ([`run_gateway`]).
//!
//! This crate is the only place that knows all of them; it must NOT know HTTP or the OpenAI
//! wire format: those stay in `exo-api`, which sees only its engine trait's plain types.

mod api;
mod clients;
mod error;
mod gateway;
mod node;
mod origin;
mod planning;
mod runtime;

pub use api::{GatewayEngine, NodeEngine};
pub use error::{Error, Result};
pub use gateway::{GatewayConfig, run_gateway};
pub use node::{ClusterConfig, Node, PlanState, run, shutdown_signal};
pub use planning::{ActivePlan, model_profile};
