//! What the proxy tells its operators (DESIGN §9–§10): statistics over rotating
//! windows, the Prometheus exposition, the log (console and rotated file, written by a
//! background thread) and alerts to a webhook.

pub mod alerts;
pub mod client_stats;
pub mod logging;
pub mod metrics;
pub mod stats;
