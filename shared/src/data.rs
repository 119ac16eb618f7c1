//! Loading the user data CSV.
//!
//! Columns are found by name in the header row: `user_id`, the raw feature
//! columns (`feature_1`, `feature_2`) and, when present, `target`. Any other
//! column (a pandas index column, say) is ignored. Loading never skips a row
//! silently: the first row that cannot be used is reported with its line.

use std::collections::HashMap;
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
    let bad_row = |line: u64, reason: String| DataError::BadRow {
        path: path.to_owned(),
        line,
        reason,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|e| bad_row(1, e.to_string()))?
        .clone();
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

    let mut data = Dataset {
        raw_names: raw_names.to_vec(),
        user_ids: Vec::new(),
        features: Vec::new(),
        targets: target_col.map(|_| Vec::new()),
        fingerprint: fingerprint(bytes),
    };
    let mut first_seen: HashMap<String, u64> = HashMap::new();
    let mut record = csv::StringRecord::new();
    loop {
        let line = reader.position().line();
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line());
                return Err(bad_row(line, e.to_string()));
            }
        }
        let line = record.position().map_or(line, |p| p.line());
        let user_id = record[id_col].trim();
        if user_id.is_empty() {
            return Err(bad_row(line, "empty user_id".into()));
        }
        if let Some(first) = first_seen.insert(user_id.to_owned(), line) {
            return Err(bad_row(
                line,
                format!("duplicate user_id {user_id:?} (first on line {first})"),
            ));
        }
        for (name, &col) in raw_names.iter().zip(&feature_cols) {
            data.features.push(
                parse_number(&record[col]).map_err(|r| bad_row(line, format!("{name}: {r}")))?,
            );
        }
        if let (Some(col), Some(targets)) = (target_col, data.targets.as_mut()) {
            targets.push(
                parse_number(&record[col]).map_err(|r| bad_row(line, format!("{TARGET}: {r}")))?,
            );
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

fn parse_number(text: &str) -> Result<f64, String> {
    let text = text.trim();
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(format!("{text:?} is not a finite number")),
        Err(_) => Err(format!("{text:?} is not a number")),
    }
}

/// `sha256:<hex>` of some bytes: the data fingerprint recorded with each run.
pub fn fingerprint(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
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
