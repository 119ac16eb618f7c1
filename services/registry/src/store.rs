//! The registry's durable state in one directory.
//!
//! ```text
//! REGISTRY_DIR/
//!   models/model-00000001.bin   one artifact per version (codec envelope, checksummed)
//!   experiments.csv             one line per run (registered or failed), for people and spreadsheets
//!   history.jsonl               one JSON line per alias move: the journal of production and candidate
//!   production.json             {"version":N,"epoch":E,"candidate":C,"previous":[…],"seq":S,"routing":{…}}
//!   registry.json               {"registry_id":"…"}: this directory's identity
//! ```
//!
//! The identity is made once, when the directory is first opened, and goes
//! with every model publication: a predictor that hears another registry id
//! than the one whose model it serves knows the registry's state was reset
//! or replaced (a new, empty directory), and says so loudly.
//!
//! Every file is written with the discipline of [`crate::journal`]: artifacts
//! and the pointer through a temporary file, fsync, rename and a directory
//! fsync; the two logs by appending whole lines with one `write` and an
//! fsync. A registration writes, in order: the artifact, the alias moves to
//! `history.jsonl` (the commit point of a move), `production.json`, and the
//! experiments row; only then does [`Store::register`] return and the service
//! acknowledge.
//!
//! At start-up, leftover temporary files are removed; a torn last line of
//! either log (a crash mid-append) is cut, with a log line; moves in the
//! history that `production.json` does not reflect yet (a crash between the
//! two) are replayed; a stored version with no experiments row gets one; an
//! artifact that fails its checksum is reported and never served, and if it
//! was production the registry moves production to the previous (or newest)
//! servable version and records that move. Version numbers are never
//! reused: the next one is above every number seen in the artifact files,
//! the log and the history, corrupt ones included.
//!
//! A routing table (see [`ml_shared::routing`]) is part of the same state: a
//! change is a history line (`"kind":"route"`, the commit point) and then the
//! pointer, like an alias move, and moves the production epoch. A production
//! move to another version clears the table in the same line
//! (`route_cleared`); a table naming a version that cannot be served is
//! cleared at start-up.
//!
//! A write that fails (disk full, a file-size limit) leaves the earlier state
//! as it was: a partial log line is cut at once, and an artifact whose alias
//! moves could not be committed is removed.
//!
//! A directory written by an older build (format-1 artifacts, the old
//! experiments columns, a `production.json` with only `version` and `epoch`,
//! no history) opens: artifacts are read through [`crate::legacy`], and the
//! log is rewritten once, atomically, with the current columns.
//!
//! The same state can live on NATS JetStream instead ([`Store::open_jetstream`],
//! see [`crate::jetstream`]): the artifacts in an object store, the history
//! and the experiments log in streams, every change a compare-and-set, and
//! [`Store::refresh`] catching up with what other registries committed.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ml_shared::codec::{self, CodecError};
use ml_shared::lifecycle::{
    Alias, AliasMove, FailedRun, GateReport, MoveAction, MoveKind, MoveReply, RouteAction,
    RouteReply,
};
use ml_shared::messages::{
    CorruptVersion, ExperimentRow, Metrics, ModelRelease, ModelSummary, ModelsReply, Page,
    RoutingRelease, RunRecord, Submission, VersionedArtifact,
};
use ml_shared::model::{ModelArtifact, ModelError};
use ml_shared::routing::{RouteError, RouteProblem, RouteTable};
use serde::{Deserialize, Serialize};

use crate::gate::{self, Contender};
use crate::jetstream::{JsError, JsState};
use crate::journal::{self, io_err, IoError, TMP_SUFFIX};
use crate::legacy::{StoredModelV1, StoredModelV2, StoredModelV3};
use crate::recent::RecentIds;

const MODELS_DIR: &str = "models";
const EXPERIMENTS: &str = "experiments.csv";
const HISTORY: &str = "history.jsonl";
const PRODUCTION: &str = "production.json";
const IDENTITY: &str = "registry.json";
/// Most earlier production versions remembered for rollbacks.
pub const ROLLBACK_DEPTH: usize = 100;
/// Longest accepted reason or actor, in bytes.
pub const MAX_TEXT: usize = 1000;

/// The actor recorded for moves made by a trainer's submission.
pub const TRAINER_ACTOR: &str = "trainer";
/// The actor recorded for moves the registry makes itself (gate, recovery).
pub const REGISTRY_ACTOR: &str = "registry";

/// Why the store cannot do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed (disk full, permissions...). Nothing was acknowledged.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The submitted model is unusable.
    #[error("invalid model: {0}")]
    InvalidModel(#[from] ModelError),
    /// The submission or request is inconsistent.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No such version.
    #[error("version {0} does not exist")]
    UnknownVersion(u64),
    /// The version's artifact cannot be read or fails its checksum.
    #[error("version {version} cannot be served: its artifact is corrupt ({reason})")]
    Corrupt {
        /// The version.
        version: u64,
        /// What is wrong with its file.
        reason: String,
    },
    /// The registry cannot check the submission now (its holdout data
    /// cannot be read): nothing is registered; retry once it can.
    #[error("cannot verify the model: {0}")]
    Unverifiable(String),
    /// A rollback with no earlier production version.
    #[error("there is no previous production version to roll back to")]
    NoPrevious,
    /// A routing table refused (nothing applied).
    #[error(transparent)]
    Route(#[from] RouteError),
    /// JetStream refused a write (a lost compare-and-set, no quorum…).
    #[error(transparent)]
    Js(#[from] JsError),
    /// A log file cannot be parsed.
    #[error("log {path}: {reason}")]
    Log {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl StoreError {
    /// Whether the caller's request is at fault (rather than the disk).
    pub fn is_bad_request(&self) -> bool {
        !matches!(
            self,
            StoreError::Io(_)
                | StoreError::Log { .. }
                | StoreError::Unverifiable(_)
                | StoreError::Js(_)
        )
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
    /// The production version when it was registered.
    pub parent: Option<u64>,
}

/// The alias state, replaced atomically in `production.json`. Old files with
/// only `version` and `epoch` read with the other fields empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Pointer {
    /// The production version.
    #[serde(default)]
    version: Option<u64>,
    /// Production changes so far.
    #[serde(default)]
    epoch: u64,
    /// The candidate version.
    #[serde(default)]
    candidate: Option<u64>,
    /// Earlier production versions, oldest first: where rollbacks go.
    #[serde(default)]
    previous: Vec<u64>,
    /// The last history move reflected here.
    #[serde(default)]
    seq: u64,
    /// The routing table in force, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    routing: Option<RouteTable>,
}

impl Pointer {
    fn get(&self, alias: Alias) -> Option<u64> {
        match alias {
            Alias::Production => self.version,
            Alias::Candidate => self.candidate,
        }
    }

    /// Applies one move; replaying the history from an older pointer gives
    /// the same state as applying the moves as they were made.
    fn apply(&mut self, m: &AliasMove) {
        if m.kind == MoveKind::Route {
            self.routing = m.route.clone();
            if let Some(epoch) = m.epoch {
                self.epoch = epoch;
            }
            self.seq = m.seq;
            return;
        }
        if m.route_cleared {
            self.routing = None;
        }
        match m.alias {
            Alias::Candidate => self.candidate = Some(m.to),
            Alias::Production => {
                match m.action {
                    MoveAction::Rollback | MoveAction::Recovery => {
                        if let Some(i) = self.previous.iter().rposition(|&v| v == m.to) {
                            self.previous.truncate(i);
                        }
                    }
                    MoveAction::Register
                    | MoveAction::Gate
                    | MoveAction::Promote
                    | MoveAction::RouteSet
                    | MoveAction::RouteClear => {
                        if let Some(from) = m.from.filter(|&f| f != m.to) {
                            self.previous.push(from);
                            let excess = self.previous.len().saturating_sub(ROLLBACK_DEPTH);
                            self.previous.drain(..excess);
                        }
                    }
                }
                self.version = Some(m.to);
                if let Some(epoch) = m.epoch {
                    self.epoch = epoch;
                }
            }
        }
        self.seq = m.seq;
    }
}

/// A move about to be recorded.
struct Draft<'a> {
    alias: Alias,
    to: u64,
    action: MoveAction,
    actor: &'a str,
    reason: String,
    /// For a routing change: the table after it (`None`: cleared).
    route: Option<Option<RouteTable>>,
}

/// The outcome of a registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// The version assigned.
    pub version: u64,
    /// Whether it became production.
    pub production: bool,
    /// The gate's decision.
    pub gate: GateReport,
}

/// The registry's state, loaded from and written through to its directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    models: BTreeMap<u64, StoredModel>,
    corrupt: BTreeMap<u64, String>,
    pointer: Pointer,
    next_version: u64,
    tolerance: f64,
    id: String,
    /// Failed runs already logged: a repeated report is logged once.
    failed_runs: RecentIds,
    /// The JetStream state, when the store lives there rather than in `dir`.
    js: Option<JsState>,
}

/// The contents of `registry.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    registry_id: String,
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and recovers its state;
    /// the promotion gate uses `tolerance` (see [`crate::gate`]).
    pub fn open(dir: &Path, tolerance: f64) -> Result<Self, StoreError> {
        check_tolerance(tolerance)?;
        let models_dir = dir.join(MODELS_DIR);
        fs::create_dir_all(&models_dir).map_err(io_err("creating", &models_dir))?;
        let mut store = Store {
            dir: dir.to_owned(),
            models: BTreeMap::new(),
            corrupt: BTreeMap::new(),
            pointer: Pointer::default(),
            next_version: 1,
            tolerance,
            id: String::new(),
            failed_runs: RecentIds::default(),
            js: None,
        };
        store.remove_temporaries()?;
        store.id = store.load_identity()?;
        store.load_models()?;
        let rows = store.recover_experiments()?;
        for row in rows.iter().filter(|r| r.status == "failed") {
            store.failed_runs.insert(&row.run_id);
        }
        let history = store.recover_history()?;
        store.pointer = store.load_pointer(&history)?;
        store.next_version = store
            .models
            .keys()
            .chain(store.corrupt.keys())
            .copied()
            .chain(rows.iter().filter_map(|r| r.version))
            .chain(history.iter().map(|m| m.to))
            .chain(store.pointer.version)
            .chain(store.pointer.candidate)
            .chain(store.pointer.previous.iter().copied())
            .max()
            .unwrap_or(0)
            + 1;
        store.recover_production()?;
        store.recover_routing()?;
        store.recover_missing_rows(&rows, &history)?;
        Ok(store)
    }

    /// Opens the store on its JetStream state (see [`crate::jetstream`]) and
    /// catches up with it. It blocks on the runtime `js` was opened on: call
    /// it off the async threads.
    pub fn open_jetstream(js: JsState, tolerance: f64) -> Result<Self, StoreError> {
        check_tolerance(tolerance)?;
        let mut store = Store {
            dir: PathBuf::new(),
            models: BTreeMap::new(),
            corrupt: BTreeMap::new(),
            pointer: Pointer::default(),
            next_version: 1,
            tolerance,
            id: js.id().to_owned(),
            failed_runs: RecentIds::default(),
            js: Some(js),
        };
        store.refresh()?;
        Ok(store)
    }

    /// Catches up with the JetStream state: the commits and experiments
    /// rows written since the last call, by this registry or another, and
    /// the artifacts of the versions they register. Does nothing for a
    /// directory.
    pub fn refresh(&mut self) -> Result<(), StoreError> {
        let Some(js) = self.js.as_mut() else {
            return Ok(());
        };
        let fresh = js.catch_up()?;
        let mut wanted: Vec<u64> = std::mem::take(js.unfetched()).into_iter().collect();
        for m in &fresh {
            let new = !self.models.contains_key(&m.to) && !self.corrupt.contains_key(&m.to);
            if new && m.action == MoveAction::Register {
                wanted.push(m.to);
            }
            self.pointer.apply(m);
            self.next_version = self.next_version.max(m.to + 1);
        }
        for version in wanted {
            if let Err(error) = self.load_version(version) {
                tracing::warn!(version, %error, "artifact not fetched yet; retried at the next request");
                if let Some(js) = self.js.as_mut() {
                    js.unfetched().insert(version);
                }
            }
        }
        Ok(())
    }

    /// Reads a version's artifact into memory, or records why it cannot be
    /// served; `Err` when JetStream did not answer (nothing recorded).
    fn load_version(&mut self, version: u64) -> Result<(), StoreError> {
        match self.read_stored(version)? {
            Ok(model) if model.version == version => {
                self.models.insert(version, model);
            }
            Ok(model) => {
                let reason = format!("the object holds version {}", model.version);
                tracing::error!(version, %reason, "artifact not served");
                self.corrupt.insert(version, reason);
            }
            Err(reason) => {
                tracing::error!(version, %reason, "corrupt artifact, not served");
                self.corrupt.insert(version, reason);
            }
        }
        Ok(())
    }

    /// Reads and verifies a version's stored artifact, from its file or its
    /// object: `Ok(Err(reason))` when it is missing or damaged, `Err` when
    /// JetStream did not answer.
    fn read_stored(&self, version: u64) -> Result<Result<StoredModel, String>, StoreError> {
        match &self.js {
            Some(js) => Ok(js.read_artifact(version)?.and_then(|b| decode_model(&b))),
            None => Ok(read_model(&self.path(&model_file(version)))),
        }
    }

    /// A version number never given out before.
    fn reserve_version(&mut self) -> Result<u64, StoreError> {
        match self.js.as_mut() {
            Some(js) => Ok(js.reserve_version(self.next_version)?),
            None => Ok(self.next_version),
        }
    }

    /// Stores a version's artifact durably: its file, or its immutable object.
    fn write_artifact(&mut self, version: u64, bytes: &[u8]) -> Result<(), StoreError> {
        match self.js.as_mut() {
            Some(js) => Ok(js.put_artifact(version, bytes)?),
            None => Ok(journal::write_atomically(
                &self.path(&model_file(version)),
                bytes,
            )?),
        }
    }

    /// Appends a row to the experiments log.
    fn append_row(&mut self, row: &ExperimentRow) -> Result<(), StoreError> {
        match self.js.as_mut() {
            Some(js) => Ok(js.append_row(row)?),
            None => Ok(journal::append(
                &self.path(EXPERIMENTS),
                Some(&csv_header()),
                &csv_line(row),
            )?),
        }
    }

    /// Commits moves: the history line(s) then the pointer file, or one
    /// compare-and-set commit on the history stream.
    fn persist_moves(&mut self, moves: &[AliasMove], text: &[u8]) -> Result<(), StoreError> {
        if let Some(js) = self.js.as_mut() {
            return Ok(js.commit(moves)?);
        }
        journal::append(&self.path(HISTORY), None, text)?;
        Ok(())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads this directory's identity, making one the first time.
    fn load_identity(&self) -> Result<String, StoreError> {
        let path = self.path(IDENTITY);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Identity>(&bytes)
                .map(|i| i.registry_id)
                .map_err(|e| StoreError::Log {
                    path: path.clone(),
                    reason: format!("unreadable identity: {e}"),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let registry_id = uuid::Uuid::new_v4().to_string();
                let fresh = !self.path(HISTORY).exists();
                let body = serde_json::to_vec(&Identity {
                    registry_id: registry_id.clone(),
                })
                .expect("identity serialises");
                journal::write_atomically(&path, &body)?;
                if fresh {
                    tracing::warn!(%registry_id, dir = %self.dir.display(), "new registry directory: a new registry identity; predictors serving another registry's model will say so");
                } else {
                    tracing::info!(%registry_id, "identity given to an existing registry directory");
                }
                Ok(registry_id)
            }
            Err(e) => Err(io_err("reading", &path)(e).into()),
        }
    }

    /// This directory's identity.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn remove_temporaries(&self) -> Result<(), StoreError> {
        for dir in [self.dir.clone(), self.path(MODELS_DIR)] {
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
        let dir = self.path(MODELS_DIR);
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

    /// Cuts a torn last line, migrates an old header, returns the rows.
    fn recover_experiments(&self) -> Result<Vec<ExperimentRow>, StoreError> {
        let path = self.path(EXPERIMENTS);
        let text = journal::cut_torn_tail(&path)?;
        let rows = parse_log(&path, &text)?;
        let header = csv_header();
        if !text.is_empty() && !text.starts_with(&header) {
            let mut rows = rows;
            for row in &mut rows {
                if row.status.is_empty() {
                    // Before the gate existed, every registered version became production.
                    row.status = "production".into();
                }
            }
            let mut out = header.clone();
            for row in &rows {
                out.extend_from_slice(&csv_line(row));
            }
            journal::write_atomically(&path, &out)?;
            tracing::warn!(
                path = %path.display(),
                rows = rows.len(),
                "experiments log rewritten with the current columns"
            );
            return Ok(rows);
        }
        Ok(rows)
    }

    fn recover_history(&self) -> Result<Vec<AliasMove>, StoreError> {
        let path = self.path(HISTORY);
        let text = journal::cut_torn_tail(&path)?;
        parse_history(&path, &text)
    }

    fn load_pointer(&self, history: &[AliasMove]) -> Result<Pointer, StoreError> {
        let path = self.path(PRODUCTION);
        let mut pointer = match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Pointer>(&bytes) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable production pointer; rebuilding it from the history");
                    Pointer::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Pointer::default(),
            Err(e) => return Err(io_err("reading", &path)(e).into()),
        };
        let last_seq = history.last().map_or(0, |m| m.seq);
        if pointer.seq > last_seq {
            self.restore_lost_moves(history, &pointer)?;
        }
        let behind: Vec<&AliasMove> = history.iter().filter(|m| m.seq > pointer.seq).collect();
        if !behind.is_empty() {
            for m in &behind {
                pointer.apply(m);
            }
            tracing::warn!(
                moves = behind.len(),
                "replayed alias moves the production pointer did not reflect (a crash between the two writes)"
            );
            journal::write_atomically(&path, &pointer_json(&pointer))?;
        }
        Ok(pointer)
    }

    /// Writes back moves that `production.json` reflects but the history
    /// lost (its last line torn or cut after the pointer was written): an
    /// acknowledged move is never forgotten, and sequence numbers go on
    /// from the pointer's. What is known of a lost move is the state it led
    /// to, so it is recorded as a `recovery` move to that state: the last
    /// lost one to production when the epoch moved on, the others to the
    /// candidate (a registration commits a candidate move, then a gate move).
    fn restore_lost_moves(
        &self,
        history: &[AliasMove],
        pointer: &Pointer,
    ) -> Result<(), StoreError> {
        let last_seq = history.last().map_or(0, |m| m.seq);
        let last_epoch = history.iter().rev().find_map(|m| m.epoch).unwrap_or(0);
        let timestamp = ml_shared::time::rfc3339_ms(ml_shared::time::now_ms());
        let mut text = Vec::new();
        for seq in last_seq + 1..=pointer.seq {
            let production = seq == pointer.seq && pointer.epoch > last_epoch;
            let (alias, to) = match (production, pointer.version, pointer.candidate) {
                (true, Some(v), _) => (Alias::Production, v),
                (_, _, Some(c)) => (Alias::Candidate, c),
                (_, Some(v), None) => (Alias::Production, v),
                (_, None, None) => continue,
            };
            // The pointer's routing table goes with its production line, so
            // that a replay of the history alone gives the same state.
            let routed = alias == Alias::Production && pointer.routing.is_some();
            let m = AliasMove {
                seq,
                timestamp: timestamp.clone(),
                alias,
                from: None,
                to,
                epoch: (alias == Alias::Production).then_some(pointer.epoch),
                action: if routed {
                    MoveAction::RouteSet
                } else {
                    MoveAction::Recovery
                },
                actor: REGISTRY_ACTOR.to_owned(),
                reason: format!(
                    "history line {seq} lost in a crash; restored from production.json ({} v{to})",
                    alias.as_str()
                ),
                kind: if routed {
                    MoveKind::Route
                } else {
                    MoveKind::Alias
                },
                route: pointer.routing.clone().filter(|_| routed),
                route_cleared: false,
            };
            tracing::error!(seq, alias = %alias, to, "history line lost in a crash restored from production.json");
            serde_json::to_writer(&mut text, &m).expect("a move serialises");
            text.push(b'\n');
        }
        journal::append(&self.path(HISTORY), None, &text)?;
        Ok(())
    }

    /// Moves production off a version that cannot be served, to the previous
    /// servable production version or else the newest servable one.
    fn recover_production(&mut self) -> Result<(), StoreError> {
        let current = self.pointer.version;
        if current.is_some_and(|v| self.models.contains_key(&v)) {
            return Ok(());
        }
        let fallback = self
            .pointer
            .previous
            .iter()
            .rev()
            .find(|v| self.models.contains_key(v))
            .or_else(|| self.models.keys().next_back())
            .copied();
        let Some(to) = fallback else {
            if let Some(v) = current {
                tracing::error!(
                    version = v,
                    "the production model cannot be served and no other version can"
                );
            }
            return Ok(());
        };
        let reason = match current {
            Some(v) => format!(
                "production v{v} cannot be served ({}); falling back to v{to}",
                self.corrupt
                    .get(&v)
                    .map_or("its artifact is missing", String::as_str)
            ),
            None => format!("no production pointer; serving the newest stored version v{to}"),
        };
        tracing::error!(wanted = ?current, serving = to, %reason, "production recovered");
        self.commit(&[Draft {
            alias: Alias::Production,
            to,
            action: MoveAction::Recovery,
            actor: REGISTRY_ACTOR,
            reason,
            route: None,
        }])?;
        Ok(())
    }

    /// Gives every stored version an experiments row (a crash after the
    /// artifact was written but before its row was).
    fn recover_missing_rows(
        &self,
        rows: &[ExperimentRow],
        history: &[AliasMove],
    ) -> Result<(), StoreError> {
        let logged: std::collections::BTreeSet<u64> =
            rows.iter().filter_map(|r| r.version).collect();
        let mut lines = Vec::new();
        for model in self
            .models
            .values()
            .filter(|m| !logged.contains(&m.version))
        {
            let gated = history.iter().find(|m2| {
                m2.to == model.version
                    && m2.alias == Alias::Production
                    && m2.action == MoveAction::Gate
            });
            let registered = history
                .iter()
                .find(|m2| m2.to == model.version && m2.action == MoveAction::Register);
            let (status, reason) = match (gated, registered) {
                (Some(g), _) => ("production", g.reason.clone()),
                (None, Some(r)) => ("candidate", r.reason.clone()),
                (None, None) => (
                    "registered",
                    "the registry stopped before the promotion gate ran".to_owned(),
                ),
            };
            tracing::warn!(
                version = model.version,
                status,
                "experiments row missing; appending it"
            );
            lines.extend_from_slice(&csv_line(&experiment_row(model, status, &reason)));
        }
        if !lines.is_empty() {
            journal::append(&self.path(EXPERIMENTS), Some(&csv_header()), &lines)?;
        }
        Ok(())
    }

    /// Records `drafts` in the history (the commit point), then in the
    /// pointer file.
    fn commit(&mut self, drafts: &[Draft<'_>]) -> Result<Vec<AliasMove>, StoreError> {
        let mut next = self.pointer.clone();
        let mut moves = Vec::with_capacity(drafts.len());
        let mut text = Vec::new();
        let timestamp = ml_shared::time::rfc3339_ms(ml_shared::time::now_ms());
        for d in drafts {
            let production = d.alias == Alias::Production;
            let m = AliasMove {
                seq: next.seq + 1,
                timestamp: timestamp.clone(),
                alias: d.alias,
                from: next.get(d.alias),
                to: d.to,
                epoch: production.then_some(next.epoch + 1),
                action: d.action,
                actor: d.actor.to_owned(),
                reason: d.reason.clone(),
                kind: if d.route.is_some() {
                    MoveKind::Route
                } else {
                    MoveKind::Alias
                },
                route: d.route.clone().flatten(),
                // Production moving to another version ends the table's life.
                route_cleared: d.route.is_none()
                    && production
                    && next.routing.is_some()
                    && next.version != Some(d.to),
            };
            next.apply(&m);
            serde_json::to_writer(&mut text, &m).expect("a move serialises");
            text.push(b'\n');
            moves.push(m);
        }
        self.persist_moves(&moves, &text)?;
        // Committed: a crash from here on is replayed from the history.
        self.pointer = next;
        if self.js.is_none() {
            journal::write_atomically(&self.path(PRODUCTION), &pointer_json(&self.pointer))?;
        }
        for m in &moves {
            tracing::info!(
                alias = %m.alias, from = ?m.from, to = m.to, epoch = ?m.epoch,
                action = m.action.as_str(), actor = %m.actor, reason = %m.reason,
                route = ?m.route, route_cleared = m.route_cleared,
                "alias moved"
            );
        }
        Ok(moves)
    }

    /// The production model's gate view, if it is servable.
    fn production_contender(&self) -> Option<Contender<'_>> {
        let m = self.models.get(&self.pointer.version?)?;
        Some(Contender {
            version: m.version,
            kind: m.artifact.kind,
            metrics: &m.run.metrics,
        })
    }

    /// Stores a submission durably, makes it the `candidate`, runs the
    /// promotion gate (moving `production` if it passes), logs the run, and
    /// returns the outcome. On error nothing is acknowledged, and a version
    /// number whose artifact reached the disk is never given out again.
    ///
    /// `evaluate` gives a model's metrics on the registry's own holdout: the
    /// figures the gate compares (the candidate's, and production's again on
    /// the same rows) and the ones stored, whatever the submission claims.
    pub fn register(
        &mut self,
        submission: Submission,
        evaluate: &mut dyn FnMut(&ModelArtifact) -> Result<Metrics, StoreError>,
    ) -> Result<Registered, StoreError> {
        let Submission { mut run, artifact } = submission;
        let metric = check_submission(&run, &artifact)?;
        run.metrics = verified_metrics(&run, &artifact, metric, evaluate)?;
        let production_now = self.production_now(evaluate);
        let version = self.reserve_version()?;
        let model = StoredModel {
            version,
            created_ms: ml_shared::time::now_ms(),
            parent: self.production_contender().map(|p| p.version),
            run,
            artifact,
        };
        let file = model_file(version);
        self.write_artifact(version, &codec::encode(&model))?;
        self.next_version = version + 1;

        let contender = Contender {
            version,
            kind: model.artifact.kind,
            metrics: &model.run.metrics,
        };
        let production = production_now
            .as_ref()
            .map(|(version, kind, metrics)| Contender {
                version: *version,
                kind: *kind,
                metrics,
            });
        let report = gate::decide(contender, production, self.tolerance);
        let status = if report.promoted {
            "production"
        } else {
            "candidate"
        };
        let row = experiment_row(&model, status, &report.reason);
        let drafts = registration_drafts(version, &model.run.run_id, &report);
        self.models.insert(version, model);
        self.commit_registration(version, &file, &drafts)?;
        self.append_row(&row)?;
        Ok(Registered {
            version,
            production: report.promoted,
            gate: report,
        })
    }

    /// The production model's metrics on the current holdout, for the gate
    /// (its stored metrics when it cannot be evaluated there).
    fn production_now(
        &self,
        evaluate: &mut dyn FnMut(&ModelArtifact) -> Result<Metrics, StoreError>,
    ) -> Option<(u64, ml_shared::model::ModelKind, Metrics)> {
        let p = self.production_contender()?;
        let artifact = &self.models[&p.version].artifact;
        match evaluate(artifact) {
            Ok(m) => Some((p.version, p.kind, m)),
            Err(error) => {
                tracing::warn!(version = p.version, %error, "production cannot be evaluated on the current holdout; the gate uses its stored metrics");
                Some((p.version, p.kind, *p.metrics))
            }
        }
    }

    /// Commits a new version's alias moves; when they are not committed
    /// (the history append failed), the version is forgotten and its file
    /// removed: unacknowledged and unrecorded, a restart must not list it.
    fn commit_registration(
        &mut self,
        version: u64,
        file: &str,
        drafts: &[Draft<'_>],
    ) -> Result<(), StoreError> {
        let committed_before = self.pointer.seq;
        let Err(e) = self.commit(drafts) else {
            return Ok(());
        };
        if self.pointer.seq == committed_before {
            self.models.remove(&version);
            if let Some(js) = self.js.as_mut() {
                js.remove_artifact(version);
                return Err(e);
            }
            let path = self.path(file);
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %error, "cannot remove an uncommitted artifact");
            }
        }
        Err(e)
    }

    /// Logs a run that produced no model (`status=failed`), once: a run id
    /// logged recently is acknowledged again without a second line.
    pub fn record_failure(&mut self, run: &FailedRun) -> Result<(), StoreError> {
        check_text("run_id", &run.run_id)?;
        if self.failure_logged(&run.run_id) {
            return Ok(());
        }
        check_text("reason", &run.reason)?;
        check_text("data_path", &run.data_path)?;
        check_text("params.model", &run.params.model)?;
        if let Some(fingerprint) = &run.data_fingerprint {
            check_text("data_fingerprint", fingerprint)?;
        }
        let row = ExperimentRow {
            timestamp: ml_shared::time::rfc3339_ms(ml_shared::time::now_ms()),
            version: None,
            run_id: run.run_id.clone(),
            status: "failed".into(),
            model: run.params.model.clone(),
            seed: run.params.seed,
            validation_fraction: run.params.validation_fraction,
            rmse: None,
            mae: None,
            r2: None,
            accuracy: None,
            log_loss: None,
            roc_auc: None,
            rows_train: None,
            rows_validation: None,
            data_fingerprint: run.data_fingerprint.clone().unwrap_or_default(),
            features: String::new(),
            duration_ms: run.duration_ms,
            artifact: String::new(),
            parent: self.pointer.version,
            reason: run.reason.clone(),
        };
        self.append_row(&row)?;
        self.failed_runs.insert(&run.run_id);
        Ok(())
    }

    /// Whether a failed run was logged already: recently by this registry,
    /// or in the JetStream log by any.
    fn failure_logged(&self, run_id: &str) -> bool {
        self.failed_runs.contains(run_id)
            || self.js.as_ref().is_some_and(|js| {
                js.rows()
                    .iter()
                    .rev()
                    .any(|r| r.status == "failed" && r.run_id == run_id)
            })
    }

    /// Re-reads a version's artifact and checks it against memory, so that a
    /// file damaged since start-up is caught before it is served again.
    fn verify_on_disk(&mut self, version: u64) -> Result<(), StoreError> {
        if let Some(reason) = self.corrupt.get(&version) {
            return Err(StoreError::Corrupt {
                version,
                reason: reason.clone(),
            });
        }
        let Some(held) = self.models.get(&version) else {
            return Err(StoreError::UnknownVersion(version));
        };
        let reason = match self.read_stored(version)? {
            Ok(on_disk) if &on_disk == held => return Ok(()),
            Ok(_) => "the file no longer holds the registered model".to_owned(),
            Err(reason) => reason,
        };
        tracing::error!(version, %reason, "corrupt artifact found; it will not be served");
        self.models.remove(&version);
        self.corrupt.insert(version, reason.clone());
        Err(StoreError::Corrupt { version, reason })
    }

    /// Makes `version` production (a person's decision: no gate).
    pub fn promote(
        &mut self,
        version: u64,
        reason: &str,
        actor: &str,
    ) -> Result<MoveReply, StoreError> {
        check_text("reason", reason)?;
        check_text("actor", actor)?;
        self.verify_on_disk(version)?;
        if self.pointer.version == Some(version) {
            return Ok(MoveReply {
                alias: Alias::Production,
                from: Some(version),
                to: version,
                epoch: self.pointer.epoch,
                moved: false,
                route_cleared: false,
            });
        }
        self.move_production(version, MoveAction::Promote, reason, actor)
    }

    /// Moves production back to the version it replaced.
    pub fn rollback(&mut self, reason: &str, actor: &str) -> Result<MoveReply, StoreError> {
        check_text("reason", reason)?;
        check_text("actor", actor)?;
        let to = *self.pointer.previous.last().ok_or(StoreError::NoPrevious)?;
        self.verify_on_disk(to)?;
        self.move_production(to, MoveAction::Rollback, reason, actor)
    }

    fn move_production(
        &mut self,
        to: u64,
        action: MoveAction,
        reason: &str,
        actor: &str,
    ) -> Result<MoveReply, StoreError> {
        let moves = self.commit(&[Draft {
            alias: Alias::Production,
            to,
            action,
            actor,
            reason: reason.to_owned(),
            route: None,
        }])?;
        let m = &moves[0];
        Ok(MoveReply {
            alias: Alias::Production,
            from: m.from,
            to,
            epoch: self.pointer.epoch,
            moved: true,
            route_cleared: m.route_cleared,
        })
    }

    /// One page of the alias history (oldest first) and the number of moves.
    pub fn history_page(&self, page: Page) -> Result<(Vec<AliasMove>, usize), StoreError> {
        let mut moves = self.history(None)?;
        let total = moves.len();
        let range = page.range(total).map_err(StoreError::Invalid)?;
        moves.truncate(range.end);
        moves.drain(..range.start);
        Ok((moves, total))
    }

    /// The alias history, oldest first; the last `limit` moves when given.
    pub fn history(&self, limit: Option<usize>) -> Result<Vec<AliasMove>, StoreError> {
        let mut moves = match &self.js {
            Some(js) => js.moves().to_vec(),
            None => {
                let path = self.path(HISTORY);
                let text = match fs::read(&path) {
                    Ok(t) => t,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                    Err(e) => return Err(io_err("reading", &path)(e).into()),
                };
                parse_history(&path, &text)?
            }
        };
        if let Some(n) = limit {
            moves.drain(..moves.len().saturating_sub(n));
        }
        Ok(moves)
    }

    /// The production model, with the routing table in force and its
    /// models, ready to publish.
    pub fn production_release(&self) -> Option<ModelRelease> {
        let version = self.pointer.version?;
        let model = self.models.get(&version)?;
        let routing = self.pointer.routing.as_ref().map(|table| {
            Box::new(RoutingRelease {
                table: table.clone(),
                models: table
                    .versions()
                    .filter_map(|v| {
                        let m = self.models.get(&v)?;
                        Some(VersionedArtifact {
                            version: v,
                            artifact: m.artifact.clone(),
                        })
                    })
                    .collect(),
            })
        });
        Some(ModelRelease {
            version,
            epoch: self.pointer.epoch,
            registry_id: self.id.clone(),
            artifact: model.artifact.clone(),
            routing,
        })
    }

    /// The routing table in force, production and the epoch.
    pub fn route_state(&self, changed: bool) -> RouteReply {
        RouteReply {
            production: self.pointer.version,
            table: self.pointer.routing.clone(),
            epoch: self.pointer.epoch,
            changed,
        }
    }

    /// Reads, sets or clears the routing table. A change is checked whole
    /// (every version servable, none the production version), committed to
    /// the history with `actor` and `reason`, and moves the production
    /// epoch; a refused one changes nothing.
    pub fn route(
        &mut self,
        action: RouteAction,
        reason: Option<&str>,
        actor: &str,
    ) -> Result<RouteReply, StoreError> {
        let (table, default_reason) = match action {
            RouteAction::Read => return Ok(self.route_state(false)),
            RouteAction::Clear if self.pointer.routing.is_none() => {
                return Ok(self.route_state(false))
            }
            RouteAction::Clear => (None, "routing table cleared"),
            RouteAction::Set(table) => (Some(table), "routing table set"),
        };
        let reason = reason.unwrap_or(default_reason);
        for (what, text) in [("reason", reason), ("actor", actor)] {
            check_text(what, text)
                .map_err(|e| RouteError::new(RouteProblem::BadText, e.to_string()))?;
        }
        let Some(production) = self.pointer.version else {
            return Err(RouteError::new(
                RouteProblem::NoProduction,
                "there is no production model to split traffic with",
            )
            .into());
        };
        if let Some(t) = &table {
            self.check_servable(t, production)?;
            if self.pointer.routing.as_ref() == Some(t) {
                return Ok(self.route_state(false));
            }
        }
        let action = if table.is_some() {
            MoveAction::RouteSet
        } else {
            MoveAction::RouteClear
        };
        self.commit(&[Draft {
            alias: Alias::Production,
            to: production,
            action,
            actor,
            reason: reason.to_owned(),
            route: Some(table),
        }])?;
        Ok(self.route_state(true))
    }

    /// Every version of `table` is stored, servable (its file verified
    /// again) and not `production`.
    fn check_servable(&mut self, table: &RouteTable, production: u64) -> Result<(), StoreError> {
        for version in table.versions() {
            if version == production {
                return Err(RouteError::new(
                    RouteProblem::IsProduction,
                    format!("v{version} is the production version; it takes the rest of the traffic already"),
                )
                .into());
            }
            match self.verify_on_disk(version) {
                Ok(()) => {}
                Err(StoreError::UnknownVersion(v)) => {
                    return Err(RouteError::new(
                        RouteProblem::UnknownVersion,
                        format!("v{v} is not in the registry"),
                    )
                    .into())
                }
                Err(StoreError::Corrupt { version, reason }) => {
                    return Err(RouteError::new(
                        RouteProblem::CorruptVersion,
                        format!("v{version} cannot be served: its artifact is corrupt ({reason})"),
                    )
                    .into())
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Clears a routing table that names a version this registry cannot
    /// serve (found at start-up), recorded in the history.
    fn recover_routing(&mut self) -> Result<(), StoreError> {
        let Some(table) = &self.pointer.routing else {
            return Ok(());
        };
        let bad = table
            .versions()
            .find(|v| !self.models.contains_key(v) || self.pointer.version == Some(*v));
        let (Some(bad), Some(production)) = (bad, self.pointer.version) else {
            return Ok(());
        };
        let reason = format!("the routing table names v{bad}, which cannot be served; cleared");
        tracing::error!(version = bad, %reason, "routing table recovered");
        self.commit(&[Draft {
            alias: Alias::Production,
            to: production,
            action: MoveAction::RouteClear,
            actor: REGISTRY_ACTOR,
            reason,
            route: Some(None),
        }])?;
        Ok(())
    }

    /// Moves the production epoch past `seen`, an epoch of this registry
    /// that a predictor serves but this directory does not reach (restored
    /// from an older copy): production is published again under a newer
    /// epoch, so every predictor takes what this registry holds, and the
    /// history records it. Nothing happens (`false`) when the epoch is
    /// already past `seen` or there is no production model.
    pub fn fast_forward(
        &mut self,
        seen: u64,
        version_seen: Option<u64>,
    ) -> Result<bool, StoreError> {
        let Some(to) = self.pointer.version.filter(|_| seen >= self.pointer.epoch) else {
            return Ok(false);
        };
        let kept = self.pointer.epoch;
        self.pointer.epoch = seen;
        let reason = format!(
            "a predictor serves epoch {seen} (v{}) of this registry, which holds epoch {kept}: the registry's directory is older than what was served; production v{to} published again past it",
            version_seen.map_or("?".to_owned(), |v| v.to_string())
        );
        let outcome = self.commit(&[Draft {
            alias: Alias::Production,
            to,
            action: MoveAction::Recovery,
            actor: REGISTRY_ACTOR,
            reason,
            route: None,
        }]);
        if outcome.is_err() && self.pointer.epoch == seen {
            self.pointer.epoch = kept;
        }
        outcome.map(|_| true)
    }

    /// The production epoch (0 when there is no production model).
    pub fn production_epoch(&self) -> u64 {
        self.pointer.epoch
    }

    /// The version an alias names, if it is servable.
    pub fn alias(&self, alias: Alias) -> Option<u64> {
        self.pointer
            .get(alias)
            .filter(|v| self.models.contains_key(v))
    }

    /// One page of the servable versions (oldest first), with the aliases,
    /// the number of versions and every corrupt one (at most
    /// [`Page::MAX_LIMIT`] of those, the newest).
    pub fn models_page(&self, page: Page) -> Result<ModelsReply, StoreError> {
        let range = page.range(self.models.len()).map_err(StoreError::Invalid)?;
        let mut reply = self.models();
        reply.total = reply.models.len();
        reply.models.truncate(range.end);
        reply.models.drain(..range.start);
        let corrupt = reply.corrupt.len();
        reply
            .corrupt
            .drain(..corrupt.saturating_sub(Page::MAX_LIMIT));
        Ok(reply)
    }

    /// Every servable version, oldest first, with the aliases.
    pub fn models(&self) -> ModelsReply {
        let production = self.alias(Alias::Production);
        let aliases: BTreeMap<String, u64> = Alias::ALL
            .iter()
            .filter_map(|&a| self.alias(a).map(|v| (a.as_str().to_owned(), v)))
            .collect();
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
                    aliases: aliases
                        .iter()
                        .filter(|(_, &v)| v == m.version)
                        .map(|(a, _)| a.clone())
                        .collect(),
                    parent: m.parent,
                    metrics: m.run.metrics,
                    feature_names: m.artifact.feature_names.clone(),
                    data_fingerprint: m.run.data_fingerprint.clone(),
                    run_id: m.run.run_id.clone(),
                    artifact: model_file(m.version),
                })
                .collect(),
            total: self.models.len(),
            aliases,
            corrupt: self
                .corrupt
                .iter()
                .map(|(&version, reason)| CorruptVersion {
                    version,
                    reason: reason.clone(),
                })
                .collect(),
        }
    }

    /// Versions whose files could not be read, with the reason.
    pub fn corrupt(&self) -> &BTreeMap<u64, String> {
        &self.corrupt
    }

    /// One page of the experiments log (oldest first) and the number of runs.
    pub fn runs_page(&self, page: Page) -> Result<(Vec<ExperimentRow>, usize), StoreError> {
        let mut runs = self.runs()?;
        let total = runs.len();
        let range = page.range(total).map_err(StoreError::Invalid)?;
        runs.truncate(range.end);
        runs.drain(..range.start);
        Ok((runs, total))
    }

    /// The experiments log, oldest first.
    pub fn runs(&self) -> Result<Vec<ExperimentRow>, StoreError> {
        if let Some(js) = &self.js {
            return Ok(js.rows().to_vec());
        }
        let path = self.path(EXPERIMENTS);
        match fs::read(&path) {
            Ok(text) => parse_log(&path, &text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err("reading", &path)(e).into()),
        }
    }
}

/// A submission's own consistency: a valid artifact, the run's features
/// those of the model, plain texts, finite claimed metrics in range
/// including the gate's metric (returned).
fn check_submission(run: &RunRecord, artifact: &ModelArtifact) -> Result<&'static str, StoreError> {
    artifact.validate()?;
    if run.feature_names != artifact.feature_names {
        return Err(StoreError::Invalid(
            "the run's feature names differ from the model's".into(),
        ));
    }
    for (what, text) in [
        ("run_id", &run.run_id),
        ("data_path", &run.data_path),
        ("data_fingerprint", &run.data_fingerprint),
        ("params.model", &run.params.model),
    ] {
        check_text(what, text)?;
    }
    let (metric, _) = gate::gate_metric(artifact.kind);
    if !run.metrics.all_finite() || run.metrics.get(metric).is_none() {
        return Err(StoreError::Invalid(format!(
            "a {} model needs finite metrics including {metric}: {:?}",
            artifact.kind.as_str(),
            run.metrics
        )));
    }
    if let Some(problem) = run.metrics.range_error() {
        return Err(StoreError::Invalid(format!("claimed metrics: {problem}")));
    }
    Ok(metric)
}

/// The model's metrics on the registry's holdout, which replace the claimed
/// ones; a non-finite gate metric refuses the model.
fn verified_metrics(
    run: &RunRecord,
    artifact: &ModelArtifact,
    metric: &str,
    evaluate: &mut dyn FnMut(&ModelArtifact) -> Result<Metrics, StoreError>,
) -> Result<Metrics, StoreError> {
    let verified = evaluate(artifact)?;
    if verified.get(metric).is_none_or(|v| !v.is_finite()) {
        return Err(StoreError::Invalid(format!(
            "the model's {metric} on the registry's holdout is not a number: {verified:?}"
        )));
    }
    tracing::info!(
        run_id = %run.run_id,
        %metric,
        claimed = ?run.metrics.get(metric),
        verified = ?verified.get(metric),
        "submission evaluated on the registry's holdout"
    );
    Ok(verified)
}

/// A new version's alias moves: candidate, and production when the gate
/// promotes it.
fn registration_drafts(version: u64, run_id: &str, report: &GateReport) -> Vec<Draft<'static>> {
    let mut drafts = vec![Draft {
        alias: Alias::Candidate,
        to: version,
        action: MoveAction::Register,
        actor: TRAINER_ACTOR,
        reason: format!("run {run_id}; gate: {}", report.reason),
        route: None,
    }];
    if report.promoted {
        drafts.push(Draft {
            alias: Alias::Production,
            to: version,
            action: MoveAction::Gate,
            actor: REGISTRY_ACTOR,
            reason: report.reason.clone(),
            route: None,
        });
    }
    drafts
}

fn check_tolerance(tolerance: f64) -> Result<(), StoreError> {
    if tolerance.is_finite() && tolerance >= 0.0 {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "promotion tolerance {tolerance} is not a number ≥ 0"
        )))
    }
}

fn check_text(what: &str, text: &str) -> Result<(), StoreError> {
    if text.trim().is_empty() {
        return Err(StoreError::Invalid(format!("{what} must not be empty")));
    }
    if text.len() > MAX_TEXT {
        return Err(StoreError::Invalid(format!(
            "{what} is longer than {MAX_TEXT} bytes"
        )));
    }
    Ok(())
}

fn pointer_json(p: &Pointer) -> Vec<u8> {
    serde_json::to_vec(p).expect("the pointer serialises")
}

/// The artifact file of a version, relative to the registry directory.
pub fn model_file(version: u64) -> String {
    format!("{MODELS_DIR}/model-{version:08}.bin")
}

fn version_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("model-")?
        .strip_suffix(".bin")?
        .parse()
        .ok()
}

/// Reads and verifies one artifact file (any codec format since the first).
pub fn read_model(path: &Path) -> Result<StoredModel, String> {
    decode_model(&fs::read(path).map_err(|e| e.to_string())?)
}

/// Decodes and verifies one stored artifact (any codec format since the first).
pub fn decode_model(bytes: &[u8]) -> Result<StoredModel, String> {
    let model: StoredModel = codec::decode_or_legacy(bytes, |old| match old.version() {
        1 => old.decode::<StoredModelV1>().map(Into::into),
        2 => old.decode::<StoredModelV2>().map(Into::into),
        3 => old.decode::<StoredModelV3>().map(Into::into),
        v => Err(CodecError::UnsupportedVersion(v)),
    })
    .map_err(|e: CodecError| e.to_string())?;
    model.artifact.validate().map_err(|e| e.to_string())?;
    Ok(model)
}

fn experiment_row(model: &StoredModel, status: &str, reason: &str) -> ExperimentRow {
    let run = &model.run;
    let m = &run.metrics;
    ExperimentRow {
        timestamp: ml_shared::time::rfc3339_ms(model.created_ms),
        version: Some(model.version),
        run_id: run.run_id.clone(),
        status: status.to_owned(),
        model: run.params.model.clone(),
        seed: run.params.seed,
        validation_fraction: run.params.validation_fraction,
        rmse: m.rmse,
        mae: m.mae,
        r2: m.r2,
        accuracy: m.accuracy,
        log_loss: m.log_loss,
        roc_auc: m.roc_auc,
        rows_train: Some(run.rows_train),
        rows_validation: Some(run.rows_validation),
        data_fingerprint: run.data_fingerprint.clone(),
        features: run.feature_names.join(";"),
        duration_ms: run.duration_ms,
        artifact: model_file(model.version),
        parent: model.parent,
        reason: reason.to_owned(),
    }
}

/// The CSV header line of the experiments log.
fn csv_header() -> Vec<u8> {
    let sample = ExperimentRow::default();
    let mut w = csv::WriterBuilder::new().from_writer(Vec::new());
    w.serialize(&sample).expect("a flat row serialises");
    let text = w.into_inner().expect("writing to memory");
    let end = text
        .iter()
        .position(|&b| b == b'\n')
        .expect("a header line")
        + 1;
    text[..end].to_vec()
}

/// One CSV line (quoted as needed, newline-terminated) for a row.
fn csv_line(row: &ExperimentRow) -> Vec<u8> {
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new());
    w.serialize(row).expect("a flat row serialises");
    w.into_inner().expect("writing to memory")
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

fn parse_history(path: &Path, text: &[u8]) -> Result<Vec<AliasMove>, StoreError> {
    let mut moves: Vec<AliasMove> = Vec::new();
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad = |reason: String| StoreError::Log {
            path: path.to_owned(),
            reason: format!("line {}: {reason}", i + 1),
        };
        let m: AliasMove = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
        let expected = moves.last().map_or(1, |p| p.seq + 1);
        if m.seq != expected {
            return Err(bad(format!("seq {} where {expected} was expected", m.seq)));
        }
        moves.push(m);
    }
    Ok(moves)
}

#[cfg(test)]
mod tests;
