//! The registry's own holdout: the labelled rows it evaluates every
//! submitted model on, so that the promotion gate compares figures the
//! registry computed rather than figures a submitter claims.
//!
//! The rows are those of the registry's data file (`REGISTRY_HOLDOUT_PATH`,
//! by default the file the trainer reads) that the shared holdout rule
//! ([`ml_shared::holdout`]) puts in the validation split for the registry's
//! seed and fraction, which match the trainer's defaults: an honest trainer
//! never fits on them. The file is re-read when its modification time or
//! size changes; a file that cannot be read makes submissions fail with
//! `unavailable` (nothing is registered that could not be checked).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use ml_shared::data::{self, DataError, TARGET};
use ml_shared::evaluation::{self, EvaluationError};
use ml_shared::features::FeatureRegistry;
use ml_shared::holdout::is_holdout;
use ml_shared::messages::Metrics;
use ml_shared::model::ModelArtifact;

/// The labelled holdout rows of one version of the data file.
#[derive(Debug)]
pub struct HoldoutRows {
    /// Entity ids.
    pub entities: Vec<String>,
    /// Raw features, row-major.
    pub raw: Vec<f64>,
    /// Targets.
    pub targets: Vec<f64>,
    /// Raw features per row.
    pub width: usize,
    /// Fingerprint of the file the rows come from.
    pub fingerprint: String,
}

impl HoldoutRows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.entities.len()
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }

    /// The metrics of `artifact` on these rows.
    pub fn evaluate(
        &self,
        artifact: &ModelArtifact,
        registry: &FeatureRegistry,
    ) -> Result<Metrics, EvaluationError> {
        let rows = (0..self.len()).map(|i| {
            (
                self.entities[i].as_str(),
                &self.raw[i * self.width..(i + 1) * self.width],
                self.targets[i],
            )
        });
        evaluation::evaluate(artifact, registry, rows)
    }
}

/// Why the holdout cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HoldoutError {
    /// The data file could not be loaded.
    #[error("the registry's holdout data cannot be read: {0}")]
    Data(#[from] DataError),
    /// The file has no `target` column.
    #[error("the registry's holdout data {0} has no {TARGET:?} column")]
    NoTarget(PathBuf),
    /// The rule put no row in the holdout.
    #[error("the registry's holdout of {0} is empty (too few rows for the fraction)")]
    Empty(PathBuf),
}

/// A file's modification time and size: when either changes, it is re-read.
type Stamp = Option<(SystemTime, u64)>;

/// The holdout, loaded lazily and reloaded when its file changes.
#[derive(Debug)]
pub struct Holdout {
    path: PathBuf,
    seed: u64,
    fraction: f64,
    loaded: Option<(Stamp, Arc<HoldoutRows>)>,
}

impl Holdout {
    /// A holdout of the rows of `path` that the rule puts in the validation
    /// split for `seed` and `fraction`.
    pub fn new(path: PathBuf, seed: u64, fraction: f64) -> Self {
        Self {
            path,
            seed,
            fraction,
            loaded: None,
        }
    }

    /// The data file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current rows (read again when the file changed).
    pub fn rows(&mut self, registry: &FeatureRegistry) -> Result<Arc<HoldoutRows>, HoldoutError> {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if let Some((seen, rows)) = &self.loaded {
            if stamp.is_some() && *seen == stamp {
                return Ok(rows.clone());
            }
        }
        let data = data::load_csv(&self.path, registry.raw_names())?;
        let targets = data
            .targets
            .as_ref()
            .ok_or_else(|| HoldoutError::NoTarget(self.path.clone()))?;
        let width = data.raw_names.len();
        let mut rows = HoldoutRows {
            entities: Vec::new(),
            raw: Vec::new(),
            targets: Vec::new(),
            width,
            fingerprint: data.fingerprint.clone(),
        };
        for (i, (entity, &target)) in data.user_ids.iter().zip(targets).enumerate() {
            if is_holdout(entity, self.fraction, self.seed) {
                rows.entities.push(entity.clone());
                rows.raw.extend_from_slice(data.raw_row(i));
                rows.targets.push(target);
            }
        }
        if rows.is_empty() {
            return Err(HoldoutError::Empty(self.path.clone()));
        }
        tracing::info!(
            path = %self.path.display(),
            rows = rows.len(),
            of = data.len(),
            fingerprint = %rows.fingerprint,
            "holdout loaded"
        );
        let rows = Arc::new(rows);
        self.loaded = Some((stamp, rows.clone()));
        Ok(rows)
    }
}
