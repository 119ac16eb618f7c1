//! The registry's own holdout: the labelled rows it evaluates every
//! submitted model on, so that the promotion gate compares figures the
//! registry computed rather than figures a submitter claims.
//!
//! The rows are those of the registry's data file (`REGISTRY_HOLDOUT_PATH`,
//! by default the file the trainer reads) that the shared holdout rule
//! ([`ml_shared::holdout`]) puts in the validation split for the registry's
//! seed and fraction, which match the trainer's defaults: an honest trainer
//! never fits on them. The file is streamed: only the holdout rows are kept
//! (about a fifth of a file at the default fraction, as numbers and ids, not
//! as text). The file is re-read when its modification time or
//! size changes; a file that cannot be read makes submissions fail with
//! `unavailable` (nothing is registered that could not be checked).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use ml_onnx::Scorer;
use ml_shared::data::{DataError, HashingReader, RowReader, TARGET};
use ml_shared::evaluation::{EvaluationError, Scored};
use ml_shared::features::FeatureRegistry;
use ml_shared::holdout::is_holdout;

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

    /// The features and predictions of a model (native or ONNX) on these
    /// rows: its metrics, and the reference profile of an imported model.
    pub fn score(
        &self,
        scorer: &Scorer,
        registry: &FeatureRegistry,
    ) -> Result<Scored, EvaluationError> {
        let rows = (0..self.len()).map(|i| {
            (
                self.entities[i].as_str(),
                &self.raw[i * self.width..(i + 1) * self.width],
                self.targets[i],
            )
        });
        scorer.score(registry, rows)
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
        let (rows, of) = self.read(registry)?;
        if rows.is_empty() {
            return Err(HoldoutError::Empty(self.path.clone()));
        }
        tracing::info!(
            path = %self.path.display(),
            rows = rows.len(),
            of,
            fingerprint = %rows.fingerprint,
            "holdout loaded"
        );
        let rows = Arc::new(rows);
        self.loaded = Some((stamp, rows.clone()));
        Ok(rows)
    }

    /// Streams the file once, keeping only the holdout rows (memory grows
    /// with them, not with the file) and fingerprinting every byte; returns
    /// them and the number of rows read. A duplicate id among them is an
    /// error with both lines (an id's rows are all in the holdout or none).
    fn read(&self, registry: &FeatureRegistry) -> Result<(HoldoutRows, u64), HoldoutError> {
        let file = std::fs::File::open(&self.path).map_err(|source| DataError::Io {
            path: self.path.clone(),
            source,
        })?;
        let mut reader =
            RowReader::new(&self.path, HashingReader::new(file), registry.raw_names())?;
        if !reader.has_target() {
            return Err(HoldoutError::NoTarget(self.path.clone()));
        }
        let width = registry.raw_names().len();
        let mut rows = HoldoutRows {
            entities: Vec::new(),
            raw: Vec::new(),
            targets: Vec::new(),
            width,
            fingerprint: String::new(),
        };
        let mut lines: HashMap<String, u64> = HashMap::new();
        let (mut raw, mut of) = (vec![0.0; width], 0u64);
        while reader.advance()? {
            of += 1;
            let entity = reader.user_id()?;
            if !is_holdout(entity, self.fraction, self.seed) {
                continue;
            }
            if let Some(first) = lines.insert(entity.to_owned(), reader.line()) {
                let reason = format!("duplicate user_id {entity:?} (first on line {first})");
                return Err(reader.bad_row(reason).into());
            }
            reader.features_into(&mut raw)?;
            rows.raw.extend_from_slice(&raw);
            rows.targets
                .push(reader.target()?.expect("the target column was checked"));
            rows.entities.push(entity.to_owned());
        }
        rows.fingerprint = reader.into_inner().fingerprint().expect("a hashing reader");
        Ok((rows, of))
    }
}
