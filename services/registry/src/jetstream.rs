//! The registry's state on NATS JetStream (`REGISTRY_STATE=jetstream`), so
//! that any number of registry processes serve the same state and a
//! JetStream cluster keeps it through the loss of a node.
//!
//! ```text
//! KV bucket  ml_registry           identity  this state's registry id (made once, `create`)
//!                                  counter   the last version number given out (CAS `update`)
//! object     ml_registry_models    model-00000001.bin …  one immutable object per version
//! stream     ML_REGISTRY_HISTORY   ml_registry.history   one message per commit: the alias moves
//! stream     ML_REGISTRY_RUNS      ml_registry.runs      one message per experiments row
//! ```
//!
//! Every change is a compare-and-set, so two writers can never both win:
//! - a version number is reserved by updating `counter` on the revision read
//!   (a lost race reads again), so none is ever given out twice;
//! - its artifact goes to an object named after the version, refused if one
//!   exists (an object store `put` would replace it); the client checks the
//!   object's SHA-256 digest on every read, and the codec its checksum;
//! - a commit (the alias moves of one request) is published to the history
//!   stream with `Nats-Expected-Last-Subject-Sequence` set to the last commit
//!   this registry has applied: if another registry committed since, the
//!   server refuses it and the request gets a retryable `conflict` error.
//!
//! The aliases, the epoch, the rollback stack and the routing table are the
//! fold of the history (as `production.json` is in a directory); each
//! registry catches up with both streams before it answers a request.
//!
//! When JetStream cannot answer (no quorum, no responders, a timeout), a
//! write fails after the context timeout with a `no_quorum` error that says
//! so; reads are answered from what the registry holds.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream, Context};
use bytes::Bytes;
use ml_shared::lifecycle::AliasMove;
use ml_shared::messages::ExperimentRow;
use tokio::io::AsyncReadExt;
use tokio::runtime::Handle;

/// The KV bucket (identity, version counter).
pub const BUCKET: &str = "ml_registry";
/// The object store bucket of the artifacts.
pub const OBJECTS: &str = "ml_registry_models";
/// The history stream and its subject.
pub const HISTORY_STREAM: &str = "ML_REGISTRY_HISTORY";
/// The subject of [`HISTORY_STREAM`].
pub const HISTORY_SUBJECT: &str = "ml_registry.history";
/// The experiments stream.
pub const RUNS_STREAM: &str = "ML_REGISTRY_RUNS";
/// The subject of [`RUNS_STREAM`].
pub const RUNS_SUBJECT: &str = "ml_registry.runs";

const IDENTITY_KEY: &str = "identity";
const COUNTER_KEY: &str = "counter";
/// Most attempts at reserving a version number against other writers.
const COUNTER_ATTEMPTS: usize = 64;

/// What JetStream said no to.
#[derive(Debug, thiserror::Error)]
pub enum JsError {
    /// Another registry changed the state first; nothing was applied. Retry.
    #[error("conflict: {0}; another registry changed the state first; nothing was applied, retry")]
    Conflict(String),
    /// JetStream did not answer: no quorum (a cluster that lost its
    /// majority), no responders or a timeout. A write may or may not have
    /// been applied; nothing was acknowledged.
    #[error("no JetStream quorum (no answer from the JetStream API): {0}")]
    NoQuorum(String),
    /// Any other failure (configuration, a refused overwrite…).
    #[error("JetStream: {0}")]
    Other(String),
}

impl JsError {
    /// A failure: [`JsError::NoQuorum`] when it says JetStream did not
    /// answer, else [`JsError::Other`], with `what` was being done.
    fn from_failure(what: &str, error: impl std::fmt::Display) -> Self {
        let text = format!("{what}: {error}");
        let lower = text.to_ascii_lowercase();
        let silent = [
            "timed out",
            "timeout",
            "no responders",
            "temporarily unavailable",
            "not currently available",
            "no suitable peers",
            "broken pipe",
        ];
        if silent.iter().any(|s| lower.contains(s)) {
            JsError::NoQuorum(text)
        } else {
            JsError::Other(text)
        }
    }
}

/// How the JetStream state is laid out and reached.
#[derive(Debug, Clone, Copy)]
pub struct JsSettings {
    /// Replicas of every bucket and stream (1 on one server, 3 on a cluster).
    pub replicas: usize,
    /// How long a JetStream request may wait for its answer.
    pub timeout: Duration,
}

/// The registry's handles on its JetStream state, and what it has applied.
pub struct JsState {
    rt: Handle,
    js: Context,
    kv: kv::Store,
    objects: object_store::ObjectStore,
    history: stream::Stream,
    runs: stream::Stream,
    /// The stream sequence of the last history commit applied.
    history_seq: u64,
    /// The stream sequence of the last experiments row read.
    runs_seq: u64,
    /// Every alias move, oldest first.
    moves: Vec<AliasMove>,
    /// Every experiments row, oldest first.
    rows: Vec<ExperimentRow>,
    /// See [`JsState::unfetched`].
    unfetched: std::collections::BTreeSet<u64>,
    id: String,
}

impl std::fmt::Debug for JsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsState")
            .field("id", &self.id)
            .field("history_seq", &self.history_seq)
            .field("runs_seq", &self.runs_seq)
            .field("moves", &self.moves.len())
            .field("rows", &self.rows.len())
            .finish_non_exhaustive()
    }
}

impl JsState {
    /// Creates (or opens) the buckets and streams with `settings`, and
    /// reads (or makes) the registry identity.
    pub async fn open(client: async_nats::Client, settings: JsSettings) -> Result<Self, JsError> {
        let js = jetstream::ContextBuilder::new()
            .timeout(settings.timeout)
            .build(client);
        let r = settings.replicas;
        let kv = open_kv(&js, r).await?;
        let objects = open_objects(&js, r).await?;
        let history = open_stream(&js, HISTORY_STREAM, HISTORY_SUBJECT, r).await?;
        let runs = open_stream(&js, RUNS_STREAM, RUNS_SUBJECT, r).await?;
        let id = identity(&kv).await?;
        Ok(Self {
            rt: Handle::current(),
            js,
            kv,
            objects,
            history,
            runs,
            history_seq: 0,
            runs_seq: 0,
            moves: Vec::new(),
            rows: Vec::new(),
            unfetched: Default::default(),
            id,
        })
    }

    /// The registry identity of this state.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every alias move applied, oldest first.
    pub fn moves(&self) -> &[AliasMove] {
        &self.moves
    }

    /// Versions registered in the history whose artifact could not be
    /// fetched yet (JetStream did not answer): fetched at the next catch-up.
    pub fn unfetched(&mut self) -> &mut std::collections::BTreeSet<u64> {
        &mut self.unfetched
    }

    /// Every experiments row read, oldest first.
    pub fn rows(&self) -> &[ExperimentRow] {
        &self.rows
    }

    /// Reads the commits and rows written since the last call (by any
    /// registry): returns the new moves, to be applied in order.
    pub fn catch_up(&mut self) -> Result<Vec<AliasMove>, JsError> {
        let rt = self.rt.clone();
        rt.block_on(async {
            let batches = read_after(&mut self.history, self.history_seq).await?;
            let mut fresh = Vec::new();
            for (seq, payload) in batches {
                let moves: Vec<AliasMove> = serde_json::from_slice(&payload).map_err(|e| {
                    JsError::Other(format!("history message {seq} is not a list of moves: {e}"))
                })?;
                self.history_seq = seq;
                fresh.extend(moves);
            }
            for (seq, payload) in read_after(&mut self.runs, self.runs_seq).await? {
                let row: ExperimentRow = serde_json::from_slice(&payload).map_err(|e| {
                    JsError::Other(format!("experiments message {seq} is not a row: {e}"))
                })?;
                self.runs_seq = seq;
                self.rows.push(row);
            }
            self.moves.extend(fresh.iter().cloned());
            Ok(fresh)
        })
    }

    /// Commits `moves` if no other commit came after the last one applied
    /// ([`JsError::Conflict`] otherwise).
    pub fn commit(&mut self, moves: &[AliasMove]) -> Result<(), JsError> {
        let payload = serde_json::to_vec(moves).expect("moves serialise");
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .expected_last_subject_sequence(self.history_seq);
        let js = self.js.clone();
        let seq = self.rt.block_on(async {
            let ack = js
                .send_publish(HISTORY_SUBJECT, publish)
                .await
                .map_err(|e| JsError::from_failure("publishing a commit", e))?;
            ack.await.map(|a| a.sequence).map_err(|e| {
                if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence {
                    JsError::Conflict(format!(
                        "the history moved past commit {}",
                        self.history_seq
                    ))
                } else {
                    JsError::from_failure("committing alias moves", e)
                }
            })
        })?;
        self.history_seq = seq;
        self.moves.extend(moves.iter().cloned());
        Ok(())
    }

    /// Appends an experiments row (read back by the next [`catch_up`](Self::catch_up)).
    pub fn append_row(&mut self, row: &ExperimentRow) -> Result<(), JsError> {
        let payload = serde_json::to_vec(row).expect("a row serialises");
        let js = self.js.clone();
        self.rt.block_on(async {
            js.publish(RUNS_SUBJECT, payload.into())
                .await
                .map_err(|e| JsError::from_failure("appending an experiments row", e))?
                .await
                .map_err(|e| JsError::from_failure("appending an experiments row", e))
        })?;
        Ok(())
    }

    /// Reserves the next version number: `counter` moved up by one with a
    /// compare-and-set on its revision, at least to `floor`.
    pub fn reserve_version(&mut self, floor: u64) -> Result<u64, JsError> {
        let kv = self.kv.clone();
        self.rt.block_on(async move {
            for _ in 0..COUNTER_ATTEMPTS {
                let entry = kv
                    .entry(COUNTER_KEY)
                    .await
                    .map_err(|e| JsError::from_failure("reading the version counter", e))?;
                let (last, revision) = match &entry {
                    Some(e) => (parse_counter(&e.value)?, Some(e.revision)),
                    None => (0, None),
                };
                let next = last.max(floor.saturating_sub(1)) + 1;
                let value = Bytes::from(next.to_string());
                let won = match revision {
                    Some(rev) => match kv.update(COUNTER_KEY, value, rev).await {
                        Ok(_) => true,
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                        Err(e) => {
                            return Err(JsError::from_failure("moving the version counter", e))
                        }
                    },
                    None => match kv.create(COUNTER_KEY, value).await {
                        Ok(_) => true,
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                        Err(e) => {
                            return Err(JsError::from_failure("making the version counter", e))
                        }
                    },
                };
                if won {
                    return Ok(next);
                }
            }
            Err(JsError::Conflict(format!(
                "the version counter moved {COUNTER_ATTEMPTS} times under this registry"
            )))
        })
    }

    /// Stores a version's artifact under its immutable name; refused when
    /// an object of that name exists.
    pub fn put_artifact(&mut self, version: u64, bytes: &[u8]) -> Result<(), JsError> {
        let name = object_name(version);
        let objects = self.objects.clone();
        self.rt.block_on(async move {
            match objects.info(&name).await {
                Ok(_) => {
                    return Err(JsError::Other(format!(
                        "object {name} exists; artifacts are never overwritten"
                    )))
                }
                Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {}
                Err(e) => return Err(JsError::from_failure("checking for an artifact", e)),
            }
            let mut reader = bytes;
            objects
                .put(name.as_str(), &mut reader)
                .await
                .map_err(|e| JsError::from_failure("storing an artifact", e))?;
            Ok(())
        })
    }

    /// Removes an artifact whose version was not committed (best effort).
    pub fn remove_artifact(&mut self, version: u64) {
        let name = object_name(version);
        let objects = self.objects.clone();
        if let Err(error) = self.rt.block_on(objects.delete(&name)) {
            tracing::warn!(object = %name, %error, "cannot remove an uncommitted artifact");
        }
    }

    /// Reads a version's artifact; the client checks its SHA-256 digest.
    /// `Ok(Err(reason))`: the object is missing or damaged; `Err`: JetStream
    /// did not answer (nothing is known of the object).
    pub fn read_artifact(&self, version: u64) -> Result<Result<Vec<u8>, String>, JsError> {
        let name = object_name(version);
        let objects = self.objects.clone();
        let read = self.rt.block_on(async move {
            let mut object = objects
                .get(&name)
                .await
                .map_err(|e| JsError::from_failure(&format!("reading object {name}"), e))?;
            let mut bytes = Vec::new();
            object
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| JsError::from_failure(&format!("reading object {name}"), e))?;
            Ok(bytes)
        });
        match read {
            Ok(bytes) => Ok(Ok(bytes)),
            Err(JsError::NoQuorum(why)) => Err(JsError::NoQuorum(why)),
            Err(other) => Ok(Err(other.to_string())),
        }
    }
}

/// The object name of a version's artifact.
pub fn object_name(version: u64) -> String {
    format!("model-{version:08}.bin")
}

fn parse_counter(value: &[u8]) -> Result<u64, JsError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| JsError::Other(format!("the version counter holds {value:?}")))
}

async fn open_kv(js: &Context, replicas: usize) -> Result<kv::Store, JsError> {
    if let Ok(store) = js.get_key_value(BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: BUCKET.to_owned(),
        description: "the registry's identity and version counter".to_owned(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| JsError::from_failure("creating the KV bucket", e))
}

async fn open_objects(js: &Context, replicas: usize) -> Result<object_store::ObjectStore, JsError> {
    if let Ok(store) = js.get_object_store(OBJECTS).await {
        return Ok(store);
    }
    js.create_object_store(object_store::Config {
        bucket: OBJECTS.to_owned(),
        description: Some("the registry's artifacts, one immutable object per version".into()),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| JsError::from_failure("creating the object store", e))
}

async fn open_stream(
    js: &Context,
    name: &str,
    subject: &str,
    replicas: usize,
) -> Result<stream::Stream, JsError> {
    js.get_or_create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| JsError::from_failure(&format!("creating stream {name}"), e))
}

/// The identity in the bucket, made by the first registry to get there.
async fn identity(kv: &kv::Store) -> Result<String, JsError> {
    let fresh = uuid::Uuid::new_v4().to_string();
    match kv.create(IDENTITY_KEY, fresh.clone().into()).await {
        Ok(_) => {
            tracing::warn!(registry_id = %fresh, "new JetStream registry state: a new registry identity");
            return Ok(fresh);
        }
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(JsError::from_failure("making the registry identity", e)),
    }
    let value = kv
        .get(IDENTITY_KEY)
        .await
        .map_err(|e| JsError::from_failure("reading the registry identity", e))?
        .ok_or_else(|| JsError::Other("the registry identity vanished".into()))?;
    Ok(String::from_utf8_lossy(&value).into_owned())
}

/// The messages of `stream` after sequence `after`, with their sequences.
async fn read_after(stream: &mut stream::Stream, after: u64) -> Result<Vec<(u64, Bytes)>, JsError> {
    let last = stream
        .info()
        .await
        .map_err(|e| JsError::from_failure("reading a stream's state", e))?
        .state
        .last_sequence;
    let mut out = Vec::new();
    for seq in after + 1..=last {
        let message = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| JsError::from_failure(&format!("reading message {seq}"), e))?;
        out.push((seq, message.payload));
    }
    Ok(out)
}
