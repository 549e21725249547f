//! The alignment adapter's file format, owned here so the trainer that
//! writes it and the indexer that reads it agree by construction.
//!
//! An aligned encoder directory may hold `adapter.safetensors`: one F32
//! tensor `adapter.weight`, the `d x d` matrix `A` (row-major) that the
//! aligned image tower appends as `v' = normalise(v + v A^T)`. Because that
//! is scale-invariant in `v`, the parent's stored unit embeddings are enough
//! to index the aligned version (`apply`), without running the tower again.

use std::path::Path;

/// File name of the adapter weights next to an aligned encoder's manifest.
pub const ADAPTER_FILE: &str = "adapter.safetensors";
/// The tensor's name in the file.
pub const ADAPTER_TENSOR: &str = "adapter.weight";

/// Why an adapter file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path} is not an adapter file: {why}")]
pub struct AdapterError {
    pub path: String,
    pub why: String,
}

/// The adapter matrix `A` (`d x d`, row-major) of an aligned encoder.
pub fn read(path: &Path) -> Result<(usize, Vec<f32>), AdapterError> {
    let bad = |why: &str| AdapterError {
        path: path.display().to_string(),
        why: why.to_owned(),
    };
    let bytes = std::fs::read(path).map_err(|e| bad(&format!("cannot read it: {e}")))?;
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| bad("shorter than a safetensors header"))?;
    let header: serde_json::Value = bytes
        .get(8..8 + header_len)
        .and_then(|h| serde_json::from_slice(h).ok())
        .ok_or_else(|| bad("unreadable safetensors header"))?;
    let tensor = &header[ADAPTER_TENSOR];
    if tensor["dtype"] != "F32" {
        return Err(bad("adapter.weight is missing or not F32"));
    }
    let shape: Vec<usize> = serde_json::from_value(tensor["shape"].clone())
        .map_err(|_| bad("adapter.weight has no shape"))?;
    let offsets: [usize; 2] = serde_json::from_value(tensor["data_offsets"].clone())
        .map_err(|_| bad("adapter.weight has no data offsets"))?;
    let [d, d2] = shape[..] else {
        return Err(bad("adapter.weight is not a matrix"));
    };
    let data = bytes
        .get(8 + header_len + offsets[0]..8 + header_len + offsets[1])
        .filter(|data| d == d2 && data.len() == d * d * 4)
        .ok_or_else(|| bad("adapter.weight is not square or its data is cut short"))?;
    let values = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((d, values))
}

/// `normalise(v + v A^T)` for each unit row of `rows`.
pub fn apply(rows: &[f32], a: &[f32], dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows.len()];
    for (v, y) in rows.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        for (i, yi) in y.iter_mut().enumerate() {
            let a_row = &a[i * dim..(i + 1) * dim];
            *yi = v[i] + a_row.iter().zip(v).map(|(x, w)| x * w).sum::<f32>();
        }
        let norm = y.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        y.iter_mut().for_each(|x| *x /= norm);
    }
    out
}

/// Writes `A` (`dim x dim`, row-major) as an adapter file.
pub fn write(path: &Path, dim: usize, a: &[f32]) -> std::io::Result<()> {
    assert_eq!(a.len(), dim * dim, "the adapter is a dim x dim matrix");
    let header = serde_json::json!({
        ADAPTER_TENSOR: {"dtype": "F32", "shape": [dim, dim], "data_offsets": [0, a.len() * 4]}
    })
    .to_string();
    // safetensors pads the header with spaces to a multiple of 8 bytes
    let padded = format!("{header:<width$}", width = header.len().div_ceil(8) * 8);
    let mut bytes = Vec::with_capacity(8 + padded.len() + a.len() * 4);
    bytes.extend_from_slice(&(padded.len() as u64).to_le_bytes());
    bytes.extend_from_slice(padded.as_bytes());
    bytes.extend(a.iter().flat_map(|x| x.to_le_bytes()));
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_adapters_read_back_and_broken_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ADAPTER_FILE);
        let a = [0.5f32, -1.0, 0.25, 2.0];
        write(&path, 2, &a).unwrap();
        assert_eq!(read(&path).unwrap(), (2, a.to_vec()));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let error = read(&path).unwrap_err().to_string();
        assert!(error.contains("cut short"), "{error}");
        std::fs::write(&path, b"abc").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("header"));
    }

    #[test]
    fn the_adapter_is_v_plus_v_a_transposed_normalised() {
        // A = [[0, 1], [0, 0]]: v A^T = (v1, 0); v = (0.6, 0.8) -> (1.4, 0.8)
        let a = [0.0, 1.0, 0.0, 0.0];
        let out = apply(&[0.6, 0.8], &a, 2);
        let norm = (1.4f32 * 1.4 + 0.8 * 0.8).sqrt();
        assert!((out[0] - 1.4 / norm).abs() < 1e-6);
        assert!((out[1] - 0.8 / norm).abs() < 1e-6);
        // A = 0 is the identity
        assert_eq!(apply(&[0.6, 0.8], &[0.0; 4], 2), vec![0.6, 0.8]);
    }
}
