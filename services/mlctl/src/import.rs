//! `mlctl import`: an ONNX model file into the registry.
//!
//! The file is checked here first with the engine the services run
//! (`ml-onnx`: operators, input width, outputs, size), for a quick and clear
//! error; then it goes with its lineage (digest, actor, time, declared
//! features, reason) to `ml.registry.import`, where the registry checks it
//! again, evaluates it on its own holdout and registers it like any version.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ml_onnx::{onnx_kind, Limits, OnnxModel};
use ml_shared::messages::{ErrorCode, ErrorReply, ImportRequest, SubmitReply};
use ml_shared::model::{ModelKind, OnnxGraph};
use ml_shared::settings::NatsSettings;

/// What a model computes, as declared on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeclaredKind {
    /// One value per row.
    Regressor,
    /// A binary classifier (probability of class 1, label).
    Classifier,
}

impl DeclaredKind {
    fn model_kind(self) -> ModelKind {
        match self {
            DeclaredKind::Regressor => ModelKind::OnnxRegressor,
            DeclaredKind::Classifier => ModelKind::OnnxClassifier,
        }
    }
}

/// `mlctl import` arguments.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The ONNX file (scikit-learn exported with skl2onnx).
    pub file: PathBuf,
    /// The model's input features, in input order: raw or derived features
    /// of the feature store (`feature_1,feature_2`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub features: Vec<String>,
    /// What the model computes (default: what its outputs say).
    #[arg(long, value_enum)]
    pub kind: Option<DeclaredKind>,
    /// Why, recorded with the version.
    #[arg(long, default_value = "imported")]
    pub reason: String,
    /// Who, recorded with the version.
    #[arg(long, env = "USER", default_value = "unknown")]
    pub actor: String,
    /// The largest model file accepted (keep it equal to the services').
    #[arg(long, env = "ONNX_MAX_BYTES", default_value_t = ml_shared::model::DEFAULT_MAX_ONNX_BYTES)]
    pub max_bytes: usize,
}

/// Checks the file locally (before connecting), then imports it; prints
/// the registry's reply.
pub async fn run(nats: &NatsSettings, args: ImportArgs) -> anyhow::Result<ExitCode> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let features: Vec<String> = args
        .features
        .iter()
        .map(|f| f.trim().to_owned())
        .filter(|f| !f.is_empty())
        .collect();
    if let Err(message) = check(&bytes, features.len(), args.kind, args.max_bytes) {
        let error = ErrorReply::new(
            ErrorCode::BadRequest,
            format!("{}: {message}", args.file.display()),
        );
        return Ok(crate::print_error(&error));
    }
    let file_name = args.file.file_name().map_or_else(
        || args.file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let request = ImportRequest {
        graph: OnnxGraph::new(bytes),
        kind: args.kind.map(DeclaredKind::model_kind),
        feature_names: features,
        file_name,
        actor: args.actor,
        reason: args.reason,
        read_ms: ml_shared::time::now_ms(),
    };
    let body = ml_shared::codec::encode(&request);
    let client = crate::connect(nats).await?;
    let subject = nats.subjects().registry_import;
    let reply = crate::request_json(&client, &subject, body, "registry").await?;
    client.drain().await.ok();
    Ok(crate::print_reply::<SubmitReply>(reply))
}

/// The engine's verdict on the file, and the declared kind against the
/// model's outputs.
fn check(
    bytes: &[u8],
    features: usize,
    kind: Option<DeclaredKind>,
    max_bytes: usize,
) -> Result<(), String> {
    let limits = Limits {
        max_bytes,
        feature_count: features,
    };
    let model = OnnxModel::load(bytes, &limits).map_err(|e| e.to_string())?;
    let found = onnx_kind(model.kind());
    match kind.map(DeclaredKind::model_kind) {
        Some(declared) if declared != found => Err(format!(
            "the model is declared {} but its outputs are a {}'s",
            declared.as_str(),
            found.as_str()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_foreign_files_are_refused_locally() {
        assert_eq!(
            check(&[], 2, None, 1024).unwrap_err(),
            "the model file is empty (0 bytes)"
        );
        assert!(check(b"not onnx", 2, None, 1024)
            .unwrap_err()
            .starts_with("not a valid ONNX model"));
    }
}
