//! Open Inference Protocol tensors: the JSON request and response bodies of
//! `POST /v2/models/{name}/infer`, and the binary tensor data extension
//! (`Inference-Header-Content-Length`: a JSON header followed by the raw
//! bytes of the tensors whose `parameters.binary_data_size` says so), which
//! `tritonclient` uses by default.
//!
//! A request is turned into what `ml.predict` takes: user ids (a `BYTES`
//! input named `user_id`) or rows of raw features (an `FP32`/`FP64` input
//! per raw feature, shape `[N]` or `[N, 1]`, or one input named `features`
//! of shape `[N, F]`, columns in the order of the model metadata). The
//! first dimension is the batch.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

/// The name of the user-id input.
pub const USER_ID_INPUT: &str = "user_id";
/// The name of the `[N, F]` feature-matrix input.
pub const FEATURES_INPUT: &str = "features";
/// The prediction output.
pub const PREDICTION_OUTPUT: &str = "prediction";
/// A classifier's label output.
pub const LABEL_OUTPUT: &str = "label";

/// A malformed request, with the message for the caller (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TensorError(pub String);

fn bad(message: impl Into<String>) -> TensorError {
    TensorError(message.into())
}

/// An input tensor as sent.
#[derive(Debug, Clone, Deserialize)]
pub struct InputTensor {
    /// Its name.
    pub name: String,
    /// Its shape (row-major).
    pub shape: Vec<u64>,
    /// Its datatype (`FP32`, `FP64`, `BYTES`, …).
    pub datatype: String,
    /// Optional parameters (`binary_data_size` for binary data).
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    /// The data as JSON (flat or nested, row-major), unless binary.
    #[serde(default)]
    pub data: Option<Value>,
}

/// A requested output.
#[derive(Debug, Clone, Deserialize)]
pub struct RequestedOutput {
    /// Its name.
    pub name: String,
    /// Optional parameters (`binary_data` to ask for binary data).
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
}

/// The JSON part of an inference request.
#[derive(Debug, Clone, Deserialize)]
pub struct InferRequest {
    /// An identifier echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// Request parameters (`binary_data_output`).
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    /// The inputs.
    pub inputs: Vec<InputTensor>,
    /// The outputs wanted (all when absent).
    #[serde(default)]
    pub outputs: Option<Vec<RequestedOutput>>,
}

/// The values of one input tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    /// `FP32` or `FP64` elements, widened to `f64`.
    Numbers(Vec<f64>),
    /// `BYTES` elements as text.
    Text(Vec<String>),
}

/// What the request asks to predict.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    /// Users of the feature store, in order.
    UserIds(Vec<String>),
    /// Rows of raw features, in order.
    Features(Vec<BTreeMap<String, f64>>),
}

impl Rows {
    /// How many rows.
    pub fn len(&self) -> usize {
        match self {
            Rows::UserIds(ids) => ids.len(),
            Rows::Features(rows) => rows.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A decoded inference request.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The JSON part.
    pub request: InferRequest,
    /// The rows to predict.
    pub rows: Rows,
}

/// Whether an output is wanted in binary: its own `binary_data` parameter,
/// else the request's `binary_data_output`.
pub fn wants_binary(request: &InferRequest, output: Option<&RequestedOutput>) -> bool {
    let flag = |p: &Option<Map<String, Value>>, key: &str| {
        p.as_ref().and_then(|p| p.get(key)).and_then(Value::as_bool)
    };
    output
        .and_then(|o| flag(&o.parameters, "binary_data"))
        .or_else(|| flag(&request.parameters, "binary_data_output"))
        .unwrap_or(false)
}

/// Decodes a request body. `header_len` is `Inference-Header-Content-Length`
/// when present; `raw_features` are the raw feature names in metadata order.
pub fn decode(
    body: &[u8],
    header_len: Option<usize>,
    raw_features: &[String],
    max_rows: usize,
) -> Result<Decoded, TensorError> {
    let (json, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(bad(format!(
                "Inference-Header-Content-Length is {n} but the body has {} bytes",
                body.len()
            )))
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    if json.iter().all(u8::is_ascii_whitespace) {
        return Err(bad("empty request body: send a JSON inference request"));
    }
    let request: InferRequest =
        serde_json::from_slice(json).map_err(|e| bad(format!("invalid inference request: {e}")))?;
    if request.inputs.is_empty() {
        return Err(bad("the request has no inputs"));
    }
    let mut tensors: Vec<(InputTensor, Values)> = Vec::with_capacity(request.inputs.len());
    for input in &request.inputs {
        if tensors.iter().any(|(t, _)| t.name == input.name) {
            return Err(bad(format!("input '{}' is given twice", input.name)));
        }
        let values = values(input, &mut binary, max_rows, raw_features.len())?;
        tensors.push((input.clone(), values));
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data follow the inputs' binary_data_size",
            binary.len()
        )));
    }
    let rows = rows(tensors, raw_features, max_rows)?;
    Ok(Decoded { request, rows })
}

fn element_count(input: &InputTensor, max_rows: usize, width: usize) -> Result<usize, TensorError> {
    // Bounded before multiplying: no shape may ask for more elements than
    // the largest legal request holds.
    let limit = (max_rows.max(1) as u64).saturating_mul(width.max(1) as u64);
    let mut count: u64 = 1;
    for &d in &input.shape {
        count = count.saturating_mul(d);
    }
    if count > limit {
        return Err(bad(format!(
            "input '{}' has shape {:?}: more than the {limit} elements a request may hold",
            input.name, input.shape
        )));
    }
    Ok(count as usize)
}

fn values(
    input: &InputTensor,
    binary: &mut &[u8],
    max_rows: usize,
    width: usize,
) -> Result<Values, TensorError> {
    let name = &input.name;
    let count = element_count(input, max_rows, width)?;
    let binary_size = input
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_size"))
        .map(|v| {
            v.as_u64().ok_or_else(|| {
                bad(format!(
                    "input '{name}': binary_data_size must be a non-negative integer"
                ))
            })
        })
        .transpose()?;
    let datatype = input.datatype.as_str();
    match (binary_size, input.data.as_ref()) {
        (Some(_), Some(_)) => Err(bad(format!(
            "input '{name}' has both data and binary_data_size"
        ))),
        (None, None) => Err(bad(format!("input '{name}' has no data"))),
        (Some(size), None) => {
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if size > binary.len() {
                return Err(bad(format!(
                    "input '{name}' has binary_data_size {size} but only {} bytes of binary data remain",
                    binary.len()
                )));
            }
            let (bytes, rest) = binary.split_at(size);
            *binary = rest;
            from_binary(name, datatype, bytes, count)
        }
        (None, Some(data)) => {
            let mut leaves = Vec::new();
            flatten(data, &mut leaves, count, name)?;
            if leaves.len() != count {
                return Err(bad(format!(
                    "input '{name}' has shape {:?} ({count} elements) but {} data elements",
                    input.shape,
                    leaves.len()
                )));
            }
            from_json(name, datatype, leaves)
        }
    }
}

fn flatten<'a>(
    value: &'a Value,
    out: &mut Vec<&'a Value>,
    limit: usize,
    name: &str,
) -> Result<(), TensorError> {
    match value {
        Value::Array(items) => {
            for item in items {
                flatten(item, out, limit, name)?;
            }
            Ok(())
        }
        leaf => {
            if out.len() >= limit {
                return Err(bad(format!(
                    "input '{name}' has more data elements than its shape holds"
                )));
            }
            out.push(leaf);
            Ok(())
        }
    }
}

fn from_json(name: &str, datatype: &str, leaves: Vec<&Value>) -> Result<Values, TensorError> {
    match datatype {
        "FP32" | "FP64" => leaves
            .into_iter()
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    bad(format!(
                        "input '{name}' ({datatype}) holds {v}, not a number"
                    ))
                })
            })
            .collect::<Result<_, _>>()
            .map(Values::Numbers),
        "BYTES" => leaves
            .into_iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad(format!("input '{name}' (BYTES) holds {v}, not a string")))
            })
            .collect::<Result<_, _>>()
            .map(Values::Text),
        other => Err(unsupported(name, other)),
    }
}

fn unsupported(name: &str, datatype: &str) -> TensorError {
    bad(format!(
        "input '{name}' has datatype {datatype}: features take FP32 or FP64, user_id takes BYTES"
    ))
}

fn from_binary(
    name: &str,
    datatype: &str,
    bytes: &[u8],
    count: usize,
) -> Result<Values, TensorError> {
    let size_error = |width: usize| {
        bad(format!(
            "input '{name}' ({datatype}) has {} bytes of binary data; {count} elements take {}",
            bytes.len(),
            count * width
        ))
    };
    match datatype {
        "FP32" => {
            if bytes.len() != count * 4 {
                return Err(size_error(4));
            }
            Ok(Values::Numbers(
                bytes
                    .chunks_exact(4)
                    .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
            ))
        }
        "FP64" => {
            if bytes.len() != count * 8 {
                return Err(size_error(8));
            }
            Ok(Values::Numbers(
                bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ))
        }
        "BYTES" => {
            // Each element: a 4-byte little-endian length, then the bytes.
            let mut rest = bytes;
            let mut out = Vec::with_capacity(count);
            while !rest.is_empty() {
                if rest.len() < 4 || out.len() == count {
                    return Err(bad(format!(
                        "input '{name}' (BYTES): binary data does not hold {count} length-prefixed elements"
                    )));
                }
                let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                rest = &rest[4..];
                if len > rest.len() {
                    return Err(bad(format!(
                        "input '{name}' (BYTES): an element of {len} bytes overruns the data"
                    )));
                }
                let text = std::str::from_utf8(&rest[..len])
                    .map_err(|_| bad(format!("input '{name}' (BYTES): an element is not UTF-8")))?;
                out.push(text.to_owned());
                rest = &rest[len..];
            }
            if out.len() != count {
                return Err(bad(format!(
                    "input '{name}' (BYTES) has {} elements; its shape holds {count}",
                    out.len()
                )));
            }
            Ok(Values::Text(out))
        }
        other => Err(unsupported(name, other)),
    }
}

/// Rows of a column input: shape `[N]` or `[N, 1]`.
fn column_rows(input: &InputTensor) -> Result<usize, TensorError> {
    match input.shape.as_slice() {
        [n] | [n, 1] => Ok(*n as usize),
        other => Err(bad(format!(
            "input '{}' has shape {other:?}; expected [N] or [N, 1] (N rows)",
            input.name
        ))),
    }
}

fn check_rows(n: usize, max_rows: usize) -> Result<(), TensorError> {
    if n == 0 {
        return Err(bad("the batch is empty (the first dimension is 0)"));
    }
    if n > max_rows {
        return Err(bad(format!(
            "a batch of {n} rows; at most {max_rows} per request"
        )));
    }
    Ok(())
}

/// What a request may send, for the error messages.
fn expected(raw_features: &[String]) -> String {
    format!(
        "send either a BYTES input '{USER_ID_INPUT}', one FP32/FP64 input per raw feature ({}), or one input '{FEATURES_INPUT}' of shape [N, {}]",
        raw_features.join(", "),
        raw_features.len()
    )
}

/// The rows the inputs ask for: a `user_id` input alone, a `features`
/// matrix alone, or one column per raw feature.
fn rows(
    tensors: Vec<(InputTensor, Values)>,
    raw_features: &[String],
    max_rows: usize,
) -> Result<Rows, TensorError> {
    let named = |name: &str| tensors.iter().find(|(t, _)| t.name == name);
    if let Some((input, values)) = named(USER_ID_INPUT) {
        if tensors.len() > 1 {
            return Err(bad(format!(
                "'{USER_ID_INPUT}' goes alone, without feature inputs; {}",
                expected(raw_features)
            )));
        }
        return user_id_rows(input, values, max_rows);
    }
    if let Some((input, values)) = named(FEATURES_INPUT) {
        if tensors.len() > 1 {
            return Err(bad(format!(
                "'{FEATURES_INPUT}' goes alone; {}",
                expected(raw_features)
            )));
        }
        return matrix_rows(input, values, raw_features, max_rows);
    }
    per_feature_rows(&tensors, raw_features, max_rows)
}

/// The `user_id` input: `[N]` or `[N, 1]` BYTES.
fn user_id_rows(
    input: &InputTensor,
    values: &Values,
    max_rows: usize,
) -> Result<Rows, TensorError> {
    let n = column_rows(input)?;
    check_rows(n, max_rows)?;
    match values {
        Values::Text(ids) => Ok(Rows::UserIds(ids.clone())),
        Values::Numbers(_) => Err(bad(format!(
            "input '{USER_ID_INPUT}' has datatype {}; it takes BYTES",
            input.datatype
        ))),
    }
}

/// The `features` input: `[N, F]` numbers, columns in metadata order.
fn matrix_rows(
    input: &InputTensor,
    values: &Values,
    raw_features: &[String],
    max_rows: usize,
) -> Result<Rows, TensorError> {
    let width = raw_features.len();
    let n = match input.shape.as_slice() {
        [n, f] if *f as usize == width => *n as usize,
        other => {
            return Err(bad(format!(
                "input '{FEATURES_INPUT}' has shape {other:?}; expected [N, {width}] (columns {})",
                raw_features.join(", ")
            )))
        }
    };
    check_rows(n, max_rows)?;
    let Values::Numbers(numbers) = values else {
        return Err(bad(format!(
            "input '{FEATURES_INPUT}' has datatype {}; it takes FP32 or FP64",
            input.datatype
        )));
    };
    Ok(Rows::Features(
        numbers
            .chunks_exact(width)
            .map(|row| {
                raw_features
                    .iter()
                    .cloned()
                    .zip(row.iter().copied())
                    .collect()
            })
            .collect(),
    ))
}

/// One `[N]` or `[N, 1]` numeric input per raw feature, all present, all of
/// the same batch size.
fn per_feature_rows(
    tensors: &[(InputTensor, Values)],
    raw_features: &[String],
    max_rows: usize,
) -> Result<Rows, TensorError> {
    let (n, columns) = feature_columns(tensors, raw_features)?;
    if let Some(missing) = raw_features
        .iter()
        .find(|f| !columns.iter().any(|(name, _)| name == f))
    {
        return Err(bad(format!(
            "missing input '{missing}'; {}",
            expected(raw_features)
        )));
    }
    check_rows(n, max_rows)?;
    Ok(Rows::Features(
        (0..n)
            .map(|i| {
                columns
                    .iter()
                    .map(|(name, values)| ((*name).to_owned(), values[i]))
                    .collect()
            })
            .collect(),
    ))
}

/// A per-feature input: its name and values.
type Column<'a> = (&'a str, &'a [f64]);

/// The batch size and the named columns of per-feature inputs; refuses an
/// unknown input, a non-numeric one and unequal batch sizes.
fn feature_columns<'a>(
    tensors: &'a [(InputTensor, Values)],
    raw_features: &[String],
) -> Result<(usize, Vec<Column<'a>>), TensorError> {
    let mut n_rows = None;
    let mut columns: Vec<Column<'_>> = Vec::with_capacity(tensors.len());
    for (input, values) in tensors {
        if !raw_features.contains(&input.name) {
            return Err(bad(format!(
                "unknown input '{}'; {}",
                input.name,
                expected(raw_features)
            )));
        }
        let n = column_rows(input)?;
        if *n_rows.get_or_insert(n) != n {
            return Err(bad(format!(
                "inputs have different batch sizes ({} and {n} rows)",
                n_rows.unwrap_or_default()
            )));
        }
        let Values::Numbers(numbers) = values else {
            return Err(bad(format!(
                "input '{}' has datatype {}; features take FP32 or FP64",
                input.name, input.datatype
            )));
        };
        columns.push((input.name.as_str(), numbers));
    }
    Ok((n_rows.unwrap_or(0), columns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> Vec<String> {
        vec!["feature_1".into(), "feature_2".into()]
    }

    fn decode_json(body: &str) -> Result<Rows, TensorError> {
        decode(body.as_bytes(), None, &raw(), 10).map(|d| d.rows)
    }

    #[test]
    fn columns_matrix_and_user_ids_decode() {
        let rows = decode_json(
            r#"{"inputs":[{"name":"feature_1","shape":[2],"datatype":"FP64","data":[0.5,1]},
                          {"name":"feature_2","shape":[2,1],"datatype":"FP32","data":[[2],[3]]}]}"#,
        )
        .unwrap();
        let Rows::Features(rows) = rows else { panic!() };
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["feature_1"], 1.0);
        assert_eq!(rows[1]["feature_2"], 3.0);

        let rows = decode_json(
            r#"{"inputs":[{"name":"features","shape":[2,2],"datatype":"FP64","data":[[1,2],[3,4]]}]}"#,
        )
        .unwrap();
        let Rows::Features(rows) = rows else { panic!() };
        assert_eq!(rows[1]["feature_2"], 4.0);

        let rows = decode_json(
            r#"{"inputs":[{"name":"user_id","shape":[1],"datatype":"BYTES","data":["a"]}]}"#,
        )
        .unwrap();
        assert_eq!(rows, Rows::UserIds(vec!["a".into()]));
    }

    #[test]
    fn binary_tensors_decode() {
        let json = br#"{"inputs":[{"name":"user_id","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":13}},{"name":"x","shape":[0],"datatype":"FP32","parameters":{"binary_data_size":0}}]}"#;
        let mut body = json.to_vec();
        for s in ["ab", "cde"] {
            body.extend_from_slice(&(s.len() as u32).to_le_bytes());
            body.extend_from_slice(s.as_bytes());
        }
        // user_id goes alone: the second input is refused.
        let err = decode(&body, Some(json.len()), &raw(), 10).unwrap_err();
        assert!(err.0.contains("alone"), "{err}");

        let json = br#"{"inputs":[{"name":"feature_1","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}},{"name":"feature_2","shape":[1],"datatype":"FP64","parameters":{"binary_data_size":8}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&0.5f32.to_le_bytes());
        body.extend_from_slice(&2.25f64.to_le_bytes());
        let rows = decode(&body, Some(json.len()), &raw(), 10).unwrap().rows;
        let Rows::Features(rows) = rows else { panic!() };
        assert_eq!(rows[0]["feature_1"], 0.5);
        assert_eq!(rows[0]["feature_2"], 2.25);
    }

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        for (body, needle) in [
            ("", "empty"),
            ("{", "invalid"),
            (r#"{"inputs":[]}"#, "no inputs"),
            (
                r#"{"inputs":[{"name":"feature_1","shape":[2],"datatype":"FP64","data":[1]}]}"#,
                "data elements",
            ),
            (
                r#"{"inputs":[{"name":"feature_1","shape":[1],"datatype":"INT32","data":[1]},{"name":"feature_2","shape":[1],"datatype":"FP64","data":[1]}]}"#,
                "INT32",
            ),
            (
                r#"{"inputs":[{"name":"feature_1","shape":[1],"datatype":"FP64","data":["x"]}]}"#,
                "not a number",
            ),
            (
                r#"{"inputs":[{"name":"feature_1","shape":[1],"datatype":"FP64","data":[1]}]}"#,
                "missing input 'feature_2'",
            ),
            (
                r#"{"inputs":[{"name":"feature_9","shape":[1],"datatype":"FP64","data":[1]}]}"#,
                "unknown input",
            ),
            (
                r#"{"inputs":[{"name":"features","shape":[1,3],"datatype":"FP64","data":[1,2,3]}]}"#,
                "expected [N, 2]",
            ),
            (
                r#"{"inputs":[{"name":"user_id","shape":[1],"datatype":"FP64","data":[1]}]}"#,
                "BYTES",
            ),
            (
                r#"{"inputs":[{"name":"user_id","shape":[11],"datatype":"BYTES","data":["a","a","a","a","a","a","a","a","a","a","a"]}]}"#,
                "at most 10",
            ),
            (
                r#"{"inputs":[{"name":"user_id","shape":[0],"datatype":"BYTES","data":[]}]}"#,
                "empty",
            ),
            (
                r#"{"inputs":[{"name":"user_id","shape":[4294967296,4294967296],"datatype":"BYTES","data":[]}]}"#,
                "more than",
            ),
            (
                r#"{"inputs":[{"name":"feature_1","shape":[1,2],"datatype":"FP64","data":[1,2]}]}"#,
                "expected [N] or [N, 1]",
            ),
        ] {
            let err = decode_json(body).unwrap_err();
            assert!(err.0.contains(needle), "{body} -> {err}");
        }
    }
}
