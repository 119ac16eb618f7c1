//! End-to-end tests: the platform's services on a private `nats-server`,
//! talked to over NATS exactly as users do. One test binary, one module per
//! area, so the workspace builds it once.

mod access;
mod bad_input;
mod bounded;
mod common;
mod faults;
mod feedback;
mod gateway;
mod js_state;
mod load;
mod model_registry;
mod monitor_bounds;
mod monitoring;
mod onnx;
mod onnx_ops;
mod pipeline;
mod processes;
mod rollouts;
mod swaps;
mod trainer_scale;
mod trust;
