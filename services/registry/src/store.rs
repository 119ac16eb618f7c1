//! The registry's durable state in one directory.
//!
//! ```text
//! REGISTRY_DIR/
//!   models/model-00000001.bin   one artifact per version (codec envelope, checksummed)
//!   experiments.csv             one line per registered run, for people and spreadsheets
//!   production.json             {"version": N, "epoch": E}
//! ```
//!
//! Every write goes to a temporary file that is fsynced and renamed over the
//! target, then the directory is fsynced; the experiments log is appended
//! with one `write` per line and fsynced. Only then does [`Store::register`]
//! return, and only then does the service acknowledge. At start-up, leftover
//! temporary files are removed, a torn last log line (a crash mid-append) is
//! cut, and an artifact that fails its checksum is reported and never served.
//! Version numbers are never reused: the next one is above every number seen
//! in the artifact files and the log, corrupt ones included. A write that
//! fails (disk full, file-size limit) leaves the earlier state as it was: a
//! partial log line is cut at once and an artifact whose run could not be
//! logged is removed.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ml_shared::codec::{self, CodecError};
use ml_shared::messages::{
    ExperimentRow, ModelRelease, ModelSummary, ModelsReply, RunRecord, Submission,
};
use ml_shared::model::{ModelArtifact, ModelError};
use serde::{Deserialize, Serialize};

const MODELS_DIR: &str = "models";
const EXPERIMENTS: &str = "experiments.csv";
const PRODUCTION: &str = "production.json";
const TMP_SUFFIX: &str = ".tmp";

/// Why the store cannot do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed (disk full, permissions...). Nothing was acknowledged.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The submitted model is unusable.
    #[error("invalid model: {0}")]
    InvalidModel(#[from] ModelError),
    /// The submission is inconsistent.
    #[error("invalid submission: {0}")]
    InvalidSubmission(String),
    /// The experiments log cannot be parsed.
    #[error("experiments log {path}: {reason}")]
    Log {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// What is stored in an artifact file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredModel {
    /// Its version.
    pub version: u64,
    /// When it was registered, ms since the Unix epoch.
    pub created_ms: u64,
    /// The run that produced it.
    pub run: RunRecord,
    /// The model.
    pub artifact: ModelArtifact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Production {
    version: u64,
    epoch: u64,
}

/// The registry's state, loaded from and written through to its directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    models: BTreeMap<u64, StoredModel>,
    corrupt: BTreeMap<u64, String>,
    production: Option<Production>,
    next_version: u64,
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and recovers its state.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let models_dir = dir.join(MODELS_DIR);
        fs::create_dir_all(&models_dir).map_err(io_err("creating", &models_dir))?;
        let mut store = Store {
            dir: dir.to_owned(),
            models: BTreeMap::new(),
            corrupt: BTreeMap::new(),
            production: None,
            next_version: 1,
        };
        store.remove_temporaries()?;
        store.load_models()?;
        let logged = store.recover_log()?;
        store.next_version = store
            .models
            .keys()
            .chain(store.corrupt.keys())
            .copied()
            .chain(logged)
            .max()
            .unwrap_or(0)
            + 1;
        store.production = store.load_production()?;
        Ok(store)
    }

    fn remove_temporaries(&self) -> Result<(), StoreError> {
        for dir in [self.dir.clone(), self.dir.join(MODELS_DIR)] {
            for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
                let path = entry.map_err(io_err("listing", &dir))?.path();
                if path.to_string_lossy().ends_with(TMP_SUFFIX) {
                    tracing::warn!(path = %path.display(), "removing an unfinished write");
                    fs::remove_file(&path).map_err(io_err("removing", &path))?;
                }
            }
        }
        Ok(())
    }

    fn load_models(&mut self) -> Result<(), StoreError> {
        let dir = self.dir.join(MODELS_DIR);
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let path = entry.map_err(io_err("listing", &dir))?.path();
            let Some(version) = version_of(&path) else {
                continue;
            };
            match read_model(&path) {
                Ok(model) if model.version == version => {
                    self.models.insert(version, model);
                }
                Ok(model) => {
                    let reason = format!("file holds version {}", model.version);
                    tracing::error!(path = %path.display(), %reason, "artifact not served");
                    self.corrupt.insert(version, reason);
                }
                Err(reason) => {
                    tracing::error!(path = %path.display(), %reason, "corrupt artifact, not served");
                    self.corrupt.insert(version, reason);
                }
            }
        }
        Ok(())
    }

    /// Cuts a torn last line from the experiments log and returns the
    /// versions it records.
    fn recover_log(&self) -> Result<Vec<u64>, StoreError> {
        let path = self.dir.join(EXPERIMENTS);
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .map_err(io_err("reading", &path))?;
        if !text.is_empty() && !text.ends_with(b"\n") {
            let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            tracing::warn!(
                path = %path.display(),
                cut_bytes = text.len() - keep,
                "experiments log ends with a torn line (a crash mid-write); cutting it"
            );
            file.set_len(keep as u64)
                .map_err(io_err("truncating", &path))?;
            file.sync_all().map_err(io_err("syncing", &path))?;
            text.truncate(keep);
        }
        Ok(parse_log(&path, &text)?.iter().map(|r| r.version).collect())
    }

    fn load_production(&self) -> Result<Option<Production>, StoreError> {
        let path = self.dir.join(PRODUCTION);
        let saved = match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Production>(&bytes) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable production pointer");
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        match saved {
            Some(p) if self.models.contains_key(&p.version) => Ok(Some(p)),
            other => {
                // The pointer is missing or names a model that cannot be served:
                // fall back to the newest servable model, under a new epoch.
                let epoch = other.map_or(0, |p| p.epoch) + 1;
                let fallback = self
                    .models
                    .keys()
                    .next_back()
                    .map(|&version| Production { version, epoch });
                if let (Some(old), Some(new)) = (other, fallback) {
                    tracing::error!(
                        wanted = old.version,
                        serving = new.version,
                        "production model cannot be served; falling back to the newest good one"
                    );
                }
                Ok(fallback)
            }
        }
    }

    /// Stores a submission durably, makes it the production model, and
    /// returns its version. On error nothing is acknowledged, and a version
    /// number whose artifact reached the disk is never given out again.
    pub fn register(&mut self, submission: Submission) -> Result<u64, StoreError> {
        let Submission { run, artifact } = submission;
        artifact.validate()?;
        if run.feature_names != artifact.feature_names {
            return Err(StoreError::InvalidSubmission(
                "the run's feature names differ from the model's".into(),
            ));
        }
        let version = self.next_version;
        let model = StoredModel {
            version,
            created_ms: ml_shared::time::now_ms(),
            run,
            artifact,
        };
        let file = model_file(version);
        let path = self.dir.join(&file);
        write_atomically(&path, &codec::encode(&model))?;
        self.next_version = version + 1;
        if let Err(e) = self.append_log(&experiment_row(&model, &file)) {
            // Unacknowledged and unlogged: do not let a restart list it.
            if let Err(error) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %error, "cannot remove an unregistered artifact");
            }
            return Err(e);
        }
        let production = Production {
            version,
            epoch: self.production.map_or(0, |p| p.epoch) + 1,
        };
        write_atomically(
            &self.dir.join(PRODUCTION),
            &serde_json::to_vec(&production).expect("serialisable"),
        )?;
        self.production = Some(production);
        self.models.insert(version, model);
        Ok(version)
    }

    fn append_log(&self, row: &ExperimentRow) -> Result<(), StoreError> {
        let path = self.dir.join(EXPERIMENTS);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        let before = file
            .seek(SeekFrom::End(0))
            .map_err(io_err("seeking", &path))?;
        let empty = before == 0;
        let mut line = csv::WriterBuilder::new()
            .has_headers(empty)
            .from_writer(Vec::new());
        line.serialize(row).expect("a flat row serialises");
        let line = line.into_inner().expect("writing to memory");
        let written = file
            .write_all(&line)
            .map_err(io_err("appending to", &path))
            .and_then(|()| file.sync_data().map_err(io_err("syncing", &path)));
        if written.is_err() {
            // A partial line (disk full, file-size limit) would glue itself
            // to the next one: cut it now rather than at the next start.
            if let Err(error) = file.set_len(before).and_then(|()| file.sync_data()) {
                tracing::warn!(path = %path.display(), %error, "cannot cut a partial log line; it is cut at the next start");
            }
        }
        written
    }

    /// The production model, ready to publish.
    pub fn production_release(&self) -> Option<ModelRelease> {
        let p = self.production?;
        let model = self.models.get(&p.version)?;
        Some(ModelRelease {
            version: p.version,
            epoch: p.epoch,
            artifact: model.artifact.clone(),
        })
    }

    /// The production epoch (0 when there is no production model).
    pub fn production_epoch(&self) -> u64 {
        self.production.map_or(0, |p| p.epoch)
    }

    /// Every servable version, oldest first.
    pub fn models(&self) -> ModelsReply {
        let production = self.production.map(|p| p.version);
        ModelsReply {
            production,
            models: self
                .models
                .values()
                .map(|m| ModelSummary {
                    version: m.version,
                    created_at: ml_shared::time::rfc3339_ms(m.created_ms),
                    kind: m.artifact.kind.as_str().into(),
                    production: production == Some(m.version),
                    metrics: m.run.metrics,
                    feature_names: m.artifact.feature_names.clone(),
                    data_fingerprint: m.run.data_fingerprint.clone(),
                    run_id: m.run.run_id.clone(),
                    artifact: model_file(m.version),
                })
                .collect(),
        }
    }

    /// Versions whose files could not be read, with the reason.
    pub fn corrupt(&self) -> &BTreeMap<u64, String> {
        &self.corrupt
    }

    /// The experiments log, oldest first.
    pub fn runs(&self) -> Result<Vec<ExperimentRow>, StoreError> {
        let path = self.dir.join(EXPERIMENTS);
        match fs::read(&path) {
            Ok(text) => parse_log(&path, &text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }
}

fn model_file(version: u64) -> String {
    format!("{MODELS_DIR}/model-{version:08}.bin")
}

fn version_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("model-")?
        .strip_suffix(".bin")?
        .parse()
        .ok()
}

/// Reads and verifies one artifact file.
pub fn read_model(path: &Path) -> Result<StoredModel, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    let model: StoredModel = codec::decode(&bytes).map_err(|e: CodecError| e.to_string())?;
    model.artifact.validate().map_err(|e| e.to_string())?;
    Ok(model)
}

fn experiment_row(model: &StoredModel, file: &str) -> ExperimentRow {
    let run = &model.run;
    ExperimentRow {
        timestamp: ml_shared::time::rfc3339_ms(model.created_ms),
        version: model.version,
        run_id: run.run_id.clone(),
        model: run.params.model.clone(),
        seed: run.params.seed,
        validation_fraction: run.params.validation_fraction,
        rmse: run.metrics.rmse,
        mae: run.metrics.mae,
        r2: run.metrics.r2,
        rows_train: run.rows_train,
        rows_validation: run.rows_validation,
        data_fingerprint: run.data_fingerprint.clone(),
        features: run.feature_names.join(";"),
        duration_ms: run.duration_ms,
        artifact: file.to_owned(),
    }
}

fn parse_log(path: &Path, text: &[u8]) -> Result<Vec<ExperimentRow>, StoreError> {
    csv::Reader::from_reader(text)
        .deserialize()
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Log {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the
/// new one: temporary file, fsync, rename, fsync of the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = PathBuf::from(format!("{}{TMP_SUFFIX}", path.display()));
    let result = (|| {
        let mut file = File::create(&tmp).map_err(io_err("creating", &tmp))?;
        file.write_all(bytes).map_err(io_err("writing", &tmp))?;
        file.sync_all().map_err(io_err("syncing", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("renaming", &tmp))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_shared::messages::{Metrics, TrainParams};
    use ml_shared::model::ModelKind;

    fn submission(intercept: f64) -> Submission {
        let names: Vec<String> = vec!["feature_1".into(), "feature_3".into()];
        Submission {
            run: RunRecord {
                run_id: format!("run-{intercept}"),
                started_ms: 0,
                duration_ms: 3,
                params: TrainParams {
                    model: "linear".into(),
                    seed: 1,
                    validation_fraction: 0.2,
                },
                metrics: Metrics {
                    rmse: 0.1,
                    mae: 0.08,
                    r2: 0.99,
                },
                rows_train: 8,
                rows_validation: 2,
                data_path: "d.csv".into(),
                data_fingerprint: "sha256:00".into(),
                feature_names: names.clone(),
            },
            artifact: ModelArtifact {
                kind: ModelKind::Linear,
                feature_names: names,
                coefficients: vec![1.0, 2.0],
                intercept,
            },
        }
    }

    #[test]
    fn versions_survive_a_restart_and_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.register(submission(1.0)).unwrap(), 1);
        assert_eq!(store.register(submission(2.0)).unwrap(), 2);
        drop(store);

        let mut store = Store::open(dir.path()).unwrap();
        let release = store.production_release().unwrap();
        assert_eq!((release.version, release.epoch), (2, 2));
        assert_eq!(release.artifact.intercept, 2.0);
        assert_eq!(store.runs().unwrap().len(), 2);
        assert_eq!(store.register(submission(3.0)).unwrap(), 3);
    }

    #[test]
    fn a_torn_log_line_is_cut_and_a_corrupt_artifact_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.register(submission(1.0)).unwrap();
        store.register(submission(2.0)).unwrap();
        drop(store);
        let log = dir.path().join(EXPERIMENTS);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"2026-01-01T00:00:00Z,3,run-x,lin").unwrap();
        let artifact = dir.path().join(model_file(2));
        let mut bytes = fs::read(&artifact).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&artifact, bytes).unwrap();

        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.runs().unwrap().len(), 2);
        assert!(fs::read(&log).unwrap().ends_with(b"\n"));
        assert!(store.corrupt().contains_key(&2));
        assert_eq!(store.production_release().unwrap().version, 1);
        assert_eq!(
            store.register(submission(3.0)).unwrap(),
            3,
            "2 is not reused"
        );
    }

    #[test]
    fn invalid_models_are_refused_and_consume_no_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut bad = submission(1.0);
        bad.artifact.coefficients[0] = f64::NAN;
        assert!(matches!(
            store.register(bad),
            Err(StoreError::InvalidModel(_))
        ));
        assert_eq!(store.register(submission(1.0)).unwrap(), 1);
    }
}
