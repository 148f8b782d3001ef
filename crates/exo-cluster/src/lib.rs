//! The node runtime: what `exo-node serve` runs. It composes the other crates:
//!
//! - membership (`exo-topology`) says who is in the cluster and what each node offers;
//! - every node turns the same snapshot into the same plan (`exo-partition`, pipeline stages,
//!   with a plan epoch that is a hash of the plan itself) and loads **only its own layers**
//!   (`exo-shard`), which one stage worker per plan computes on;
//! - a request travels a ring: its origin (the node it came in at) sends its steps to the
//!   first stage, each stage sends its activations to the next, and the last stage sends the
//!   sampled token straight back to the origin; stages in this process are reached through
//!   their worker's queue, others over the shard service (`exo-transport`);
//! - the origin templates and tokenizes once, runs the request as a state machine that owns
//!   its journal, and turns tokens into text with one detokenizer (`exo-model`).
//!
//! It also implements the API crate's engine trait twice ([`NodeEngine`] over a node,
//! [`GatewayEngine`] for a gateway that computes nothing and forwards to a node), and runs a
//! gateway ([`run_gateway`]).
//!
//! This crate is the only library that knows all of them; it must NOT know HTTP or the OpenAI
//! wire format (those stay in `exo-api`, reached through its engine trait and `exo-core`'s
//! plain types), protobuf (the transport converts at its edge), or model math (the shard).
//!
//! Modules, each using only those listed before it: `tasks`, `clients`, `plan`, `inbox`,
//! `stage` (worker, link, the holder), `origin` (route, request), `service`, `views`, `live`,
//! `node`, `engine`, `gateway`.

mod clients;
mod engine;
mod error;
mod fetch;
mod gateway;
mod grammar;
mod inbox;
mod live;
mod node;
mod origin;
mod plan;
mod service;
mod stage;
mod tasks;
mod views;

pub use engine::NodeEngine;
pub use error::{Error, Result};
pub use exo_partition::Strategy;
pub use exo_store::Store;
pub use gateway::{GatewayConfig, GatewayEngine, run_gateway};
pub use node::{ClusterConfig, Node, run, shutdown_signal};
pub use plan::{ActivePlan, PlanState, model_profile};
pub use stage::StageStats;
