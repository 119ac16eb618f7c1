//! Loading the user data CSV.
//!
//! Columns are found by name in the header row: `user_id`, the raw feature
//! columns (`feature_1`, `feature_2`) and, when present, `target`. Any other
//! column (a pandas index column, say) is ignored. Loading never skips a row
//! silently: the first row that cannot be used is reported with its line.
//!
//! [`RowReader`] reads a file row by row with the `csv` crate's byte records
//! and parses numbers from the bytes in place (no allocation per row or per
//! field), so a file of any size is read in constant memory; [`parse_csv`]
//! loads a whole file through it.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The column that identifies an entity.
pub const USER_ID: &str = "user_id";
/// The column a model learns to predict.
pub const TARGET: &str = "target";

/// Why a data file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The header row lacks a required column.
    #[error("{path}: missing column {column:?} in the header row")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column.
        column: String,
    },
    /// A row cannot be used.
    #[error("{path}:{line}: {reason}")]
    BadRow {
        /// The file.
        path: PathBuf,
        /// 1-based line number in the file.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The file changed while it was being read in several passes.
    #[error("{path} changed while the run read it; the run is abandoned")]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// The file has a header but no data row.
    #[error("{path}: no data rows")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// A loaded data file: one row per entity.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Raw feature column names, in the order of [`Dataset::features`].
    pub raw_names: Vec<String>,
    /// Entity ids, one per row.
    pub user_ids: Vec<String>,
    /// Raw features, row-major, `raw_names.len()` values per row.
    pub features: Vec<f64>,
    /// Targets, one per row, when the file has a `target` column.
    pub targets: Option<Vec<f64>>,
    /// `sha256:` and the hex SHA-256 of the file's bytes.
    pub fingerprint: String,
}

impl Dataset {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.user_ids.len()
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.user_ids.is_empty()
    }

    /// The raw features of row `i`.
    pub fn raw_row(&self, i: usize) -> &[f64] {
        let w = self.raw_names.len();
        &self.features[i * w..(i + 1) * w]
    }
}

/// Reads `path` and parses it with [`parse_csv`].
pub fn load_csv(path: &Path, raw_names: &[String]) -> Result<Dataset, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_csv(path, &bytes, raw_names)
}

/// Parses CSV bytes; `path` is used in error messages only.
pub fn parse_csv(path: &Path, bytes: &[u8], raw_names: &[String]) -> Result<Dataset, DataError> {
    let mut rows = RowReader::new(path, bytes, raw_names)?;
    let mut data = Dataset {
        raw_names: raw_names.to_vec(),
        user_ids: Vec::new(),
        features: Vec::new(),
        targets: rows.has_target().then(Vec::new),
        fingerprint: fingerprint(bytes),
    };
    let mut first_seen: HashMap<String, u64> = HashMap::new();
    let mut raw = vec![0.0; raw_names.len()];
    while rows.advance()? {
        let line = rows.line();
        let user_id = rows.user_id()?;
        if let Some(first) = first_seen.insert(user_id.to_owned(), line) {
            return Err(rows.bad_row(format!(
                "duplicate user_id {user_id:?} (first on line {first})"
            )));
        }
        rows.features_into(&mut raw)?;
        data.features.extend_from_slice(&raw);
        if let (Some(t), Some(targets)) = (rows.target()?, data.targets.as_mut()) {
            targets.push(t);
        }
        data.user_ids.push(user_id.to_owned());
    }
    if data.is_empty() {
        return Err(DataError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(data)
}

/// Reads a data file row by row, without allocating per row or per field:
/// the `csv` crate's byte records, numbers parsed from the bytes in place.
/// Columns are found by name in the header row, as [`parse_csv`] does; each
/// accessor reports a bad value with the row's line.
pub struct RowReader<R: Read> {
    path: PathBuf,
    reader: csv::Reader<R>,
    record: csv::ByteRecord,
    id_col: usize,
    feature_cols: Vec<usize>,
    feature_names: Vec<String>,
    target_col: Option<usize>,
    line: u64,
}

impl<R: Read> RowReader<R> {
    /// Reads the header row of `source` and finds the columns; `path` is
    /// used in error messages only.
    pub fn new(path: &Path, source: R, raw_names: &[String]) -> Result<Self, DataError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .buffer_capacity(1 << 16)
            .from_reader(source);
        let headers = match reader.headers() {
            Ok(h) => h.clone(),
            Err(e) => {
                return Err(DataError::BadRow {
                    path: path.to_owned(),
                    line: 1,
                    reason: e.to_string(),
                })
            }
        };
        let find = |column: &str| headers.iter().position(|h| h.trim() == column);
        let missing = |column: &str| DataError::MissingColumn {
            path: path.to_owned(),
            column: column.to_owned(),
        };
        let id_col = find(USER_ID).ok_or_else(|| missing(USER_ID))?;
        let feature_cols = raw_names
            .iter()
            .map(|name| find(name).ok_or_else(|| missing(name)))
            .collect::<Result<Vec<_>, _>>()?;
        let target_col = find(TARGET);
        Ok(Self {
            path: path.to_owned(),
            reader,
            record: csv::ByteRecord::new(),
            id_col,
            feature_cols,
            feature_names: raw_names.to_vec(),
            target_col,
            line: 1,
        })
    }

    /// Whether the file has a `target` column.
    pub fn has_target(&self) -> bool {
        self.target_col.is_some()
    }

    /// Moves to the next row; `false` at the end of the file.
    pub fn advance(&mut self) -> Result<bool, DataError> {
        let before = self.reader.position().line();
        match self.reader.read_byte_record(&mut self.record) {
            Ok(false) => Ok(false),
            Ok(true) => {
                self.line = self.record.position().map_or(before, |p| p.line());
                Ok(true)
            }
            Err(e) => {
                self.line = e.position().map_or(before, |p| p.line());
                Err(self.bad_row(e.to_string()))
            }
        }
    }

    /// The 1-based line of the current row.
    pub fn line(&self) -> u64 {
        self.line
    }

    /// Bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.reader.position().byte()
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.reader.into_inner()
    }

    /// An error about the current row.
    pub fn bad_row(&self, reason: String) -> DataError {
        DataError::BadRow {
            path: self.path.clone(),
            line: self.line,
            reason,
        }
    }

    /// The current row's `user_id` (trimmed, not empty).
    pub fn user_id(&self) -> Result<&str, DataError> {
        let field = trim_ascii(&self.record[self.id_col]);
        let id = std::str::from_utf8(field)
            .map_err(|_| self.bad_row("user_id is not valid UTF-8".into()))?;
        if id.is_empty() {
            return Err(self.bad_row("empty user_id".into()));
        }
        Ok(id)
    }

    /// The current row's raw features, in the order of the names given to
    /// [`RowReader::new`], written into `out`.
    pub fn features_into(&self, out: &mut [f64]) -> Result<(), DataError> {
        for ((slot, &col), name) in out
            .iter_mut()
            .zip(&self.feature_cols)
            .zip(&self.feature_names)
        {
            *slot = parse_number_bytes(&self.record[col])
                .map_err(|r| self.bad_row(format!("{name}: {r}")))?;
        }
        Ok(())
    }

    /// The current row's target, when the file has a target column.
    pub fn target(&self) -> Result<Option<f64>, DataError> {
        self.target_col
            .map(|col| {
                parse_number_bytes(&self.record[col])
                    .map_err(|r| self.bad_row(format!("{TARGET}: {r}")))
            })
            .transpose()
    }
}

fn trim_ascii(mut field: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = field {
        if first.is_ascii_whitespace() {
            field = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = field {
        if last.is_ascii_whitespace() {
            field = rest;
        } else {
            break;
        }
    }
    field
}

fn parse_number_bytes(field: &[u8]) -> Result<f64, String> {
    match std::str::from_utf8(trim_ascii(field)) {
        Ok(text) => parse_number(text),
        Err(_) => Err(format!(
            "{:?} is not a number",
            String::from_utf8_lossy(field)
        )),
    }
}

fn parse_number(text: &str) -> Result<f64, String> {
    let text = text.trim();
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(format!("{text:?} is not a finite number")),
        Err(_) => Err(format!("{text:?} is not a number")),
    }
}

/// Size and modification time of a file: a file read in several passes
/// must keep the same stamp throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    /// Length in bytes.
    pub len: u64,
    /// Modification time.
    pub modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    /// The stamp of `path` now.
    pub fn of(path: &Path) -> Result<Self, DataError> {
        let meta = std::fs::metadata(path).map_err(|source| DataError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// `sha256:<hex>` of a file's bytes, read in blocks (memory independent of
/// the file's size).
pub fn fingerprint_file(path: &Path) -> Result<String, DataError> {
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = HashingReader::new(&mut file);
    std::io::copy(&mut hasher, &mut std::io::sink()).map_err(io)?;
    Ok(hasher.fingerprint().expect("a hashing reader"))
}

/// A reader that hashes what passes through it: the fingerprint of a file
/// read once for another purpose. [`HashingReader::plain`] passes the bytes
/// through without hashing.
pub struct HashingReader<R> {
    inner: R,
    hasher: Option<Sha256>,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`, hashing.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Some(Sha256::new()),
        }
    }

    /// Wraps `inner` without hashing.
    pub fn plain(inner: R) -> Self {
        Self {
            inner,
            hasher: None,
        }
    }

    /// `sha256:<hex>` of everything read so far (`None` without hashing).
    pub fn fingerprint(&self) -> Option<String> {
        self.hasher
            .as_ref()
            .map(|h| hex_fingerprint(&h.clone().finalize()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// `sha256:<hex>` of some bytes: the data fingerprint recorded with each run.
pub fn fingerprint(bytes: &[u8]) -> String {
    hex_fingerprint(&Sha256::digest(bytes))
}

fn hex_fingerprint(digest: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        write!(out, "{b:02x}").expect("writing to a string");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::RAW_FEATURES;

    fn raw() -> Vec<String> {
        RAW_FEATURES.iter().map(|s| s.to_string()).collect()
    }

    fn parse(text: &str) -> Result<Dataset, DataError> {
        parse_csv(Path::new("t.csv"), text.as_bytes(), &raw())
    }

    #[test]
    fn columns_are_found_by_name_and_others_ignored() {
        let d = parse(",target,feature_2,user_id,feature_1\n0,1.5,2,a,3\n1,2.5,4,b,5\n").unwrap();
        assert_eq!(d.user_ids, vec!["a", "b"]);
        assert_eq!(d.raw_row(0), &[3.0, 2.0]);
        assert_eq!(d.raw_row(1), &[5.0, 4.0]);
        assert_eq!(d.targets.unwrap(), vec![1.5, 2.5]);
        assert!(d.fingerprint.starts_with("sha256:"));
    }

    #[test]
    fn target_is_optional() {
        let d = parse("user_id,feature_1,feature_2\na,1,2\n").unwrap();
        assert!(d.targets.is_none());
    }

    #[test]
    fn bad_rows_are_reported_with_their_line() {
        let err = parse("user_id,feature_1,feature_2\na,1,2\nb,x,2\n").unwrap_err();
        assert!(matches!(err, DataError::BadRow { line: 3, .. }), "{err}");
        assert!(err.to_string().contains("feature_1"), "{err}");
        let err = parse("user_id,feature_1,feature_2\na,1,2\na,1,2\n").unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
        let err = parse("user_id,feature_1,feature_2\na,NaN,2\n").unwrap_err();
        assert!(matches!(err, DataError::BadRow { line: 2, .. }), "{err}");
        let err = parse("user_id,feature_1,feature_2\na,1\n").unwrap_err();
        assert!(matches!(err, DataError::BadRow { line: 2, .. }), "{err}");
    }

    #[test]
    fn missing_columns_and_empty_files_are_errors() {
        let err = parse("user_id,feature_1\na,1\n").unwrap_err();
        assert!(
            matches!(err, DataError::MissingColumn { ref column, .. } if column == "feature_2")
        );
        assert!(matches!(
            parse("user_id,feature_1,feature_2\n"),
            Err(DataError::Empty { .. })
        ));
        assert!(parse("").is_err());
    }
}
