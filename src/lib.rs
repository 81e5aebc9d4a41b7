//! azure-openai-proxy: OpenAI-style calls in, Azure OpenAI (or OpenAI-compatible)
//! deployments out. See ARCHITECTURE.md for the map of modules and a request's path.

pub mod admin;
pub mod alerts;
pub mod api;
pub mod auth;
pub mod body;
pub mod capacity;
pub mod config;
pub mod error;
pub mod instances;
pub mod logging;
pub mod metrics;
pub mod ratelimit;
pub mod router;
pub mod server;
pub mod stats;
pub mod stream;
#[cfg(test)]
mod testutil;
pub mod transport;
pub mod upstream;

pub use server::Proxy;
