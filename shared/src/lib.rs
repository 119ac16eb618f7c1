//! Everything that crosses a process boundary in the ML platform.
//!
//! The four services (`trainer`, `registry`, `predictor`, `monitor`) and the
//! `mlctl` client share this crate so that they agree, by construction, on
//! subject names ([`subjects`]), message shapes ([`messages`]), the binary
//! model-artifact codec ([`codec`]), and — most importantly — on how features
//! are computed ([`features`]): training and serving call the same code.

pub mod codec;
pub mod data;
pub mod evaluation;
pub mod features;
pub mod feedback;
pub mod gen;
pub mod holdout;
pub mod lifecycle;
pub mod messages;
pub mod model;
pub mod nats;
pub mod production;
pub mod profile;
pub mod routing;
pub mod settings;
pub mod shutdown;
pub mod subjects;
pub mod telemetry;
pub mod time;
