//! The feature store: raw features per `user_id`, and derived features
//! registered by name as functions of raw ones.
//!
//! Training and serving both turn a row of raw values into a model's input
//! through a [`FeaturePlan`] compiled from the model's ordered feature names,
//! so the two can never disagree on what `feature_3` means.

use std::hash::BuildHasher;
use std::path::Path;

use crate::data::{DataError, Dataset, RowReader};

/// Raw feature columns read from the data, in this order.
pub const RAW_FEATURES: [&str; 2] = ["feature_1", "feature_2"];

/// Most raw inputs a derived feature may take.
pub const MAX_DERIVED_INPUTS: usize = 8;

/// A derived feature: a pure function of some raw features, given in the
/// order they were named at registration.
pub type DeriveFn = fn(&[f64]) -> f64;

/// Why a feature cannot be registered or produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeatureError {
    /// The name is neither a raw feature nor a registered derived one.
    #[error("unknown feature {0:?}")]
    Unknown(String),
    /// The name is already taken.
    #[error("feature {0:?} is already defined")]
    Duplicate(String),
    /// A derived feature names too many inputs.
    #[error("derived feature {0:?} takes more than {MAX_DERIVED_INPUTS} inputs")]
    TooManyInputs(String),
}

#[derive(Debug, Clone)]
struct Derived {
    name: String,
    inputs: Vec<usize>,
    f: DeriveFn,
}

/// The catalogue of features: raw columns plus derived features by name.
#[derive(Debug, Clone)]
pub struct FeatureRegistry {
    raw: Vec<String>,
    derived: Vec<Derived>,
}

impl Default for FeatureRegistry {
    /// The platform's features: `feature_1`, `feature_2`, and
    /// `feature_3 = feature_1²`.
    fn default() -> Self {
        let mut registry = Self::with_raw(RAW_FEATURES.iter().map(|s| s.to_string()).collect());
        registry
            .register("feature_3", &["feature_1"], |x| x[0] * x[0])
            .expect("default features are consistent");
        registry
    }
}

impl FeatureRegistry {
    /// A registry with the given raw columns and no derived features.
    pub fn with_raw(raw: Vec<String>) -> Self {
        Self {
            raw,
            derived: Vec::new(),
        }
    }

    /// Registers `name` as `f(inputs…)`, where every input is a raw feature.
    pub fn register(
        &mut self,
        name: &str,
        inputs: &[&str],
        f: DeriveFn,
    ) -> Result<(), FeatureError> {
        if self.names().any(|n| n == name) {
            return Err(FeatureError::Duplicate(name.to_owned()));
        }
        if inputs.len() > MAX_DERIVED_INPUTS {
            return Err(FeatureError::TooManyInputs(name.to_owned()));
        }
        let inputs = inputs
            .iter()
            .map(|input| {
                self.raw_index(input)
                    .ok_or_else(|| FeatureError::Unknown((*input).to_owned()))
            })
            .collect::<Result<_, _>>()?;
        self.derived.push(Derived {
            name: name.to_owned(),
            inputs,
            f,
        });
        Ok(())
    }

    /// The raw columns, in storage order.
    pub fn raw_names(&self) -> &[String] {
        &self.raw
    }

    /// Position of a raw column.
    pub fn raw_index(&self, name: &str) -> Option<usize> {
        self.raw.iter().position(|r| r == name)
    }

    /// Every feature this registry can produce: raw first, then derived.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.raw
            .iter()
            .map(String::as_str)
            .chain(self.derived.iter().map(|d| d.name.as_str()))
    }

    /// Compiles the computation of `names`, in that order, from a raw row.
    pub fn plan(&self, names: &[String]) -> Result<FeaturePlan, FeatureError> {
        let steps = names
            .iter()
            .map(|name| {
                if let Some(i) = self.raw_index(name) {
                    Ok(Step::Raw(i))
                } else if let Some(d) = self.derived.iter().find(|d| &d.name == name) {
                    Ok(Step::Derived {
                        inputs: d.inputs.clone(),
                        f: d.f,
                    })
                } else {
                    Err(FeatureError::Unknown(name.clone()))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(FeaturePlan {
            names: names.to_vec(),
            steps,
        })
    }
}

#[derive(Debug, Clone)]
enum Step {
    Raw(usize),
    Derived { inputs: Vec<usize>, f: DeriveFn },
}

/// How to compute one model's ordered inputs from a raw row.
#[derive(Debug, Clone)]
pub struct FeaturePlan {
    names: Vec<String>,
    steps: Vec<Step>,
}

impl FeaturePlan {
    /// The features produced, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// How many features the plan produces.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the plan produces no feature at all.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Writes the features for `raw` into `out` (`out.len() == self.len()`).
    /// Allocates nothing.
    pub fn compute_into(&self, raw: &[f64], out: &mut [f64]) {
        debug_assert_eq!(out.len(), self.steps.len());
        for (slot, step) in out.iter_mut().zip(&self.steps) {
            *slot = match step {
                Step::Raw(i) => raw[*i],
                Step::Derived { inputs, f } => {
                    let mut args = [0.0; MAX_DERIVED_INPUTS];
                    for (a, i) in args.iter_mut().zip(inputs) {
                        *a = raw[*i];
                    }
                    f(&args[..inputs.len()])
                }
            };
        }
    }

    /// Computes the features for `raw` into a new vector.
    pub fn compute(&self, raw: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.len()];
        self.compute_into(raw, &mut out);
        out
    }
}

/// Raw features of every known entity, keyed by `user_id`.
///
/// Compact, so that its resident size stays close to the data's own: the
/// ids are one arena of bytes with an end offset per row, the features one
/// row-major `Vec<f64>`, and the index a SwissTable of `u32` row numbers
/// (hashed and compared through the arena). A row costs its id's bytes
/// plus 4 (offset) + 8 per raw feature + 6 to 12 (index) bytes; no
/// `String` per id.
///
/// The index hashes with `foldhash` (randomly seeded per store, so keys
/// cannot be chosen to collide, and several times faster than SipHash on
/// UUIDs).
#[derive(Clone, Default)]
pub struct FeatureStore {
    width: usize,
    /// Every id's bytes, one after the other.
    ids: Vec<u8>,
    /// End of row `i`'s id in `ids` (its start is the end of row `i - 1`).
    ends: Vec<u32>,
    /// Raw features, row-major, `width` values per row.
    values: Vec<f64>,
    index: Index,
}

impl std::fmt::Debug for FeatureStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureStore")
            .field("rows", &self.len())
            .field("width", &self.width)
            .field("id_bytes", &self.ids.len())
            .finish()
    }
}

/// Row numbers are 32 bits in the index.
const MAX_ROWS: usize = u32::MAX as usize;

/// The index: a SwissTable (`hashbrown`) of row numbers, hashed and
/// compared through the id arena, so an entry costs 4 bytes and a control
/// byte.
#[derive(Clone, Default)]
struct Index {
    hasher: foldhash::fast::RandomState,
    table: hashbrown::HashTable<u32>,
}

impl Index {
    /// The row of `key`, given how to read a row's id.
    #[inline]
    fn find<'a>(&self, key: &[u8], id: impl Fn(usize) -> &'a [u8]) -> Option<usize> {
        let hash = self.hasher.hash_one(key);
        self.table
            .find(hash, |&row| id(row as usize) == key)
            .map(|&row| row as usize)
    }

    /// Adds `row` under `key`, or returns the row already there.
    fn insert<'a>(
        &mut self,
        key: &[u8],
        row: usize,
        id: impl Fn(usize) -> &'a [u8] + Copy,
    ) -> Result<(), usize> {
        let hasher = &self.hasher;
        let hash = hasher.hash_one(key);
        match self.table.entry(
            hash,
            |&other| id(other as usize) == key,
            |&other| hasher.hash_one(id(other as usize)),
        ) {
            hashbrown::hash_table::Entry::Occupied(first) => Err(*first.get() as usize),
            hashbrown::hash_table::Entry::Vacant(slot) => {
                slot.insert(row as u32);
                Ok(())
            }
        }
    }
}

/// The id bytes of `row`, from the arena and the end offsets.
#[inline]
fn id_of<'a>(ids: &'a [u8], ends: &[u32], row: usize) -> &'a [u8] {
    let start = if row == 0 { 0 } else { ends[row - 1] as usize };
    &ids[start..ends[row] as usize]
}

/// Builds a store row by row (the loader's and `from_dataset`'s shared part).
struct Builder {
    store: FeatureStore,
}

impl Builder {
    fn new(width: usize) -> Self {
        Self {
            store: FeatureStore {
                width,
                ..FeatureStore::default()
            },
        }
    }

    /// Makes room for `rows` more rows of `id_bytes` bytes of ids in all.
    fn reserve(&mut self, rows: usize, id_bytes: usize) {
        let s = &mut self.store;
        s.ids.reserve(id_bytes);
        s.ends.reserve(rows);
        s.values.reserve(rows * s.width);
        let (ids, ends, hasher) = (&s.ids, &s.ends, &s.index.hasher);
        s.index
            .table
            .reserve(rows, |&r| hasher.hash_one(id_of(ids, ends, r as usize)));
    }

    /// Claims the next row for `id` in the index: `Err` with the row that
    /// already has this id, or `Err(None)` when the store is full. The row
    /// must then be [`Builder::append`]ed (or the build abandoned).
    fn claim(&mut self, id: &[u8]) -> Result<(), Option<usize>> {
        let s = &mut self.store;
        let row = s.ends.len();
        if row >= MAX_ROWS || s.ids.len() + id.len() > u32::MAX as usize {
            return Err(None);
        }
        let (ids, ends) = (&s.ids, &s.ends);
        // The key is not in the arena yet: the rows compared with are all
        // below `row`.
        s.index
            .insert(id, row, |r| id_of(ids, ends, r))
            .map_err(Some)
    }

    /// Appends the row claimed last.
    fn append(&mut self, id: &[u8], raw: &[f64]) {
        let s = &mut self.store;
        s.ids.extend_from_slice(id);
        s.ends.push(s.ids.len() as u32);
        s.values.extend_from_slice(raw);
    }

    fn push(&mut self, id: &[u8], raw: &[f64]) -> Result<(), Option<usize>> {
        self.claim(id)?;
        self.append(id, raw);
        Ok(())
    }

    fn finish(mut self) -> FeatureStore {
        let s = &mut self.store;
        s.ids.shrink_to_fit();
        s.ends.shrink_to_fit();
        s.values.shrink_to_fit();
        let (ids, ends, hasher) = (&s.ids, &s.ends, &s.index.hasher);
        s.index
            .table
            .shrink_to_fit(|&r| hasher.hash_one(id_of(ids, ends, r as usize)));
        self.store
    }
}

impl FeatureStore {
    /// Builds the store from a loaded dataset (its raw feature columns).
    /// A duplicate id keeps its first row.
    pub fn from_dataset(data: &Dataset) -> Self {
        let mut builder = Builder::new(data.raw_names.len());
        for (i, id) in data.user_ids.iter().enumerate() {
            let _ = builder.push(id.as_bytes(), data.raw_row(i));
        }
        builder.finish()
    }

    /// Streams the CSV file at `path` straight into a store: one record
    /// buffer, no row of `String`s, no copy of the file in memory. The
    /// columns and the rules are those of [`crate::data::load_csv`]: columns
    /// found by (trimmed) name, others ignored; the first unusable row (a
    /// bad number in a feature or `target` column, an empty or duplicate
    /// `user_id`, a wrong number of fields) fails the load with its line;
    /// a file without rows is an error.
    pub fn load_csv(path: &Path, raw_names: &[String]) -> Result<Self, DataError> {
        let file = std::fs::File::open(path).map_err(|source| DataError::Io {
            path: path.to_owned(),
            source,
        })?;
        let size = file.metadata().ok().map(|m| m.len());
        Self::read_csv_sized(path, file, size, raw_names)
    }

    /// [`FeatureStore::load_csv`] from any reader; `path` is used in error
    /// messages only.
    pub fn read_csv<R: std::io::Read>(
        path: &Path,
        input: R,
        raw_names: &[String],
    ) -> Result<Self, DataError> {
        Self::read_csv_sized(path, input, None, raw_names)
    }

    /// Rows read before the store is sized from the input's length.
    const SAMPLE_ROWS: usize = 4096;

    /// Reads CSV of `size` bytes (when known): after [`Self::SAMPLE_ROWS`]
    /// rows, the store reserves room for as many rows as the rest of the
    /// input holds at the same bytes per row (plus 2%), so that it is not
    /// reallocated or rehashed while it grows.
    fn read_csv_sized<R: std::io::Read>(
        path: &Path,
        input: R,
        size: Option<u64>,
        raw_names: &[String],
    ) -> Result<Self, DataError> {
        // The columns, numbers and ids are read by the same rules as the
        // trainer's and the registry's ([`RowReader`]).
        let mut rows = RowReader::new(path, input, raw_names)?;
        let mut builder = Builder::new(raw_names.len());
        // The line of each row, for the message about a duplicate; dropped
        // once loaded.
        let mut lines: Vec<u32> = Vec::new();
        let mut raw = vec![0.0; raw_names.len()];
        while rows.advance()? {
            let user_id = rows.user_id()?;
            match builder.claim(user_id.as_bytes()) {
                Ok(()) => {}
                Err(Some(first)) => {
                    let first = lines[first];
                    let reason = format!("duplicate user_id {user_id:?} (first on line {first})");
                    return Err(rows.bad_row(reason));
                }
                Err(None) => {
                    let reason = "more rows or id bytes than a feature store holds (4 GiB)";
                    return Err(rows.bad_row(reason.into()));
                }
            }
            rows.features_into(&mut raw)?;
            // A bad target fails the load too: the file is the trainer's.
            rows.target()?;
            builder.append(user_id.as_bytes(), &raw);
            lines.push(u32::try_from(rows.line()).unwrap_or(u32::MAX));
            if lines.len() == Self::SAMPLE_ROWS {
                if let Some(size) = size {
                    Self::reserve(&mut builder, &mut lines, size, rows.bytes_read());
                }
            }
        }
        if builder.store.ends.is_empty() {
            return Err(DataError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(builder.finish())
    }

    /// Reserves room for the rest of an input of `size` bytes, at the
    /// bytes per row of the first `read` (plus 2%).
    fn reserve(builder: &mut Builder, lines: &mut Vec<u32>, size: u64, read: u64) {
        let rows = lines.len() as f64 * size as f64 / read.max(1) as f64 * 1.02;
        let more = (rows as usize).saturating_sub(lines.len()).min(MAX_ROWS);
        let per_id = builder.store.ids.len() as f64 / lines.len() as f64;
        builder.reserve(more, (more as f64 * per_id) as usize);
        lines.reserve(more);
    }

    /// The raw features of `user_id`, in the registry's raw order.
    #[inline]
    pub fn raw(&self, user_id: &str) -> Option<&[f64]> {
        let row = self
            .index
            .find(user_id.as_bytes(), |r| id_of(&self.ids, &self.ends, r))?;
        Some(&self.values[row * self.width..(row + 1) * self.width])
    }

    /// Number of entities.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the store holds no entity.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes the store holds on the heap (ids, offsets, features, index).
    pub fn heap_bytes(&self) -> usize {
        self.ids.capacity()
            + self.ends.capacity() * 4
            + self.values.capacity() * 8
            + self.index.table.allocation_size()
    }
}

/// A number cell, as [`crate::data`] reads it: trimmed, finite.
#[cfg(test)]
mod tests {
    use super::*;

    fn names(ns: &[&str]) -> Vec<String> {
        ns.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn feature_3_is_feature_1_squared() {
        let registry = FeatureRegistry::default();
        let plan = registry
            .plan(&names(&["feature_3", "feature_1", "feature_2"]))
            .unwrap();
        assert_eq!(plan.compute(&[3.0, -2.0]), vec![9.0, 3.0, -2.0]);
    }

    #[test]
    fn unknown_features_cannot_be_planned() {
        let registry = FeatureRegistry::default();
        let err = registry
            .plan(&names(&["feature_1", "feature_9"]))
            .unwrap_err();
        assert_eq!(err, FeatureError::Unknown("feature_9".into()));
    }

    #[test]
    fn registration_checks_names_and_inputs() {
        let mut registry = FeatureRegistry::default();
        assert_eq!(
            registry.register("feature_3", &["feature_1"], |x| x[0]),
            Err(FeatureError::Duplicate("feature_3".into()))
        );
        assert_eq!(
            registry.register("f4", &["nope"], |x| x[0]),
            Err(FeatureError::Unknown("nope".into()))
        );
        registry
            .register("product", &["feature_1", "feature_2"], |x| x[0] * x[1])
            .unwrap();
        let plan = registry.plan(&names(&["product"])).unwrap();
        assert_eq!(plan.compute(&[2.0, 5.0]), vec![10.0]);
    }

    fn raw() -> Vec<String> {
        RAW_FEATURES.iter().map(|s| s.to_string()).collect()
    }

    fn read(text: &str) -> Result<FeatureStore, DataError> {
        FeatureStore::read_csv(Path::new("t.csv"), text.as_bytes(), &raw())
    }

    #[test]
    fn the_streaming_loader_agrees_with_the_dataset_loader() {
        let mut bytes = Vec::new();
        crate::gen::write_csv(&mut bytes, 5000, 3).unwrap();
        let data = crate::data::parse_csv(Path::new("t.csv"), &bytes, &raw()).unwrap();
        let streamed = FeatureStore::read_csv(Path::new("t.csv"), &bytes[..], &raw()).unwrap();
        let built = FeatureStore::from_dataset(&data);
        assert_eq!((streamed.len(), built.len()), (5000, 5000));
        for (i, id) in data.user_ids.iter().enumerate() {
            assert_eq!(streamed.raw(id), Some(data.raw_row(i)), "{id}");
            assert_eq!(built.raw(id), Some(data.raw_row(i)), "{id}");
        }
        for unknown in [
            "",
            "nobody",
            &data.user_ids[0][1..],
            &format!("{} ", data.user_ids[0]),
        ] {
            assert_eq!(streamed.raw(unknown), None, "{unknown:?}");
        }
        // Near the data's own size: the ids' bytes and the features, plus
        // the offsets and an index at most half full.
        let own = data.user_ids.iter().map(String::len).sum::<usize>() + data.features.len() * 8;
        assert!(
            streamed.heap_bytes() < own * 2,
            "{} vs {own}",
            streamed.heap_bytes()
        );
    }

    #[test]
    fn the_streaming_loader_keeps_the_dataset_rules() {
        let s = read(",target,feature_2,user_id,feature_1\n0,1.5,2, a ,3\n1,2.5,4,b,5\n").unwrap();
        assert_eq!(s.raw("a"), Some(&[3.0, 2.0][..]));
        assert_eq!(s.raw("b"), Some(&[5.0, 4.0][..]));
        assert!(
            read("user_id,feature_1,feature_2\na,1,2\n").is_ok(),
            "target optional"
        );
        let line = |text: &str| match read(text) {
            Err(DataError::BadRow { line, reason, .. }) => (line, reason),
            other => panic!("{other:?}"),
        };
        let (l, why) = line("user_id,feature_1,feature_2\na,1,2\nb,x,2\n");
        assert_eq!(l, 3);
        assert!(why.contains("feature_1"), "{why}");
        let (l, why) = line("user_id,feature_1,feature_2\na,1,2\nc,3,4\na,x,2\n");
        assert_eq!(l, 4);
        assert!(why.contains("duplicate") && why.contains("line 2"), "{why}");
        assert_eq!(line("user_id,feature_1,feature_2\na,NaN,2\n").0, 2);
        assert_eq!(line("user_id,feature_1,feature_2\na,1\n").0, 2);
        assert_eq!(line("user_id,feature_1,feature_2\n ,1,2\n").0, 2);
        assert_eq!(
            line("user_id,feature_1,feature_2,target\na,1,2,1e999\n").0,
            2
        );
        assert!(matches!(
            read("user_id,feature_1\na,1\n"),
            Err(DataError::MissingColumn { ref column, .. }) if column == "feature_2"
        ));
        assert!(matches!(
            read("user_id,feature_1,feature_2\n"),
            Err(DataError::Empty { .. })
        ));
        assert!(read("").is_err());
        assert!(matches!(
            FeatureStore::load_csv(Path::new("/nonexistent/users.csv"), &raw()),
            Err(DataError::Io { .. })
        ));
    }

    #[test]
    fn a_file_is_sized_once_from_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.csv");
        crate::gen::write_csv(std::fs::File::create(&path).unwrap(), 20_000, 9).unwrap();
        let data = crate::data::load_csv(&path, &raw()).unwrap();
        let store = FeatureStore::load_csv(&path, &raw()).unwrap();
        assert_eq!(store.len(), 20_000);
        for (i, id) in data.user_ids.iter().enumerate().step_by(97) {
            assert_eq!(store.raw(id), Some(data.raw_row(i)));
        }
        let own = data.user_ids.iter().map(String::len).sum::<usize>() + data.features.len() * 8;
        assert!(
            store.heap_bytes() < own * 3 / 2,
            "{} vs {own}",
            store.heap_bytes()
        );
    }

    #[test]
    fn the_index_finds_every_key_through_growth_and_collisions() {
        let mut b = Builder::new(1);
        let keys: Vec<String> = (0..10_000).map(|i| format!("k{i}")).collect();
        for (i, k) in keys.iter().enumerate() {
            b.push(k.as_bytes(), &[i as f64]).unwrap();
        }
        assert_eq!(b.push(b"k17", &[0.0]), Err(Some(17)));
        let s = b.finish();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(s.raw(k), Some(&[i as f64][..]));
        }
        assert_eq!(s.raw("k10000"), None);
        assert_eq!(FeatureStore::default().raw("k1"), None);
    }
}
