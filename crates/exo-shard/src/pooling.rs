//! Embeddings from a model's last hidden states: the mean of a prompt's rows after the final
//! norm, L2-normalised (llama.cpp's `--pooling mean` with `embd_normalize` 2). The sum is kept
//! as rows are computed, so a prompt prefilled in several pieces pools the same as one.

/// A running mean of rows, in f64 so that long prompts lose nothing to rounding.
#[derive(Clone, Debug, Default)]
pub struct MeanPool {
    sum: Vec<f64>,
    rows: usize,
}

impl MeanPool {
    /// Adds rows (`[n * hidden]`) to the pool; a pool takes rows of one width.
    pub fn add(&mut self, rows: &[f32], hidden: usize) {
        if hidden == 0 {
            return;
        }
        if self.sum.len() != hidden {
            self.sum = vec![0.0; hidden];
            self.rows = 0;
        }
        for row in rows.chunks_exact(hidden) {
            self.sum
                .iter_mut()
                .zip(row)
                .for_each(|(s, &v)| *s += f64::from(v));
            self.rows += 1;
        }
    }

    /// Rows pooled so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The mean of the rows, L2-normalised; `None` when it has no direction (no rows, all
    /// zeros, or values that are not finite).
    pub fn embedding(&self) -> Option<Vec<f32>> {
        let count = self.rows.max(1) as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / count).collect();
        let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
        (self.rows > 0 && norm.is_finite() && norm > 0.0)
            .then(|| mean.iter().map(|v| (v / norm) as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn pieces_pool_like_the_whole_and_the_result_has_unit_length() {
        let rows = [1.0, 2.0, 3.0, 4.0, -1.0, 0.5];
        let mut whole = MeanPool::default();
        whole.add(&rows, 2);
        let mut pieces = MeanPool::default();
        pieces.add(&rows[..2], 2);
        pieces.add(&rows[2..], 2);
        assert_eq!(whole.rows(), 3);
        assert_eq!(whole.embedding(), pieces.embedding());
        // The mean is (1, 13/6): normalised.
        let e = whole.embedding().unwrap();
        let norm = (1.0f64 + (13.0f64 / 6.0).powi(2)).sqrt();
        assert!((f64::from(e[0]) - 1.0 / norm).abs() < 1e-6);
        assert!((f64::from(e[1]) - 13.0 / 6.0 / norm).abs() < 1e-6);
        assert!((e.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn nothing_zero_or_not_finite_has_no_direction() {
        assert_eq!(MeanPool::default().embedding(), None);
        let mut zero = MeanPool::default();
        zero.add(&[0.0, 0.0], 2);
        assert_eq!(zero.embedding(), None);
        let mut nan = MeanPool::default();
        nan.add(&[f32::NAN, 1.0], 2);
        assert_eq!(nan.embedding(), None);
    }
}
