//! The compute "accelerator": image verification on the CPU behind a
//! backend trait a GPU implementation can replace.
//!
//! Features are histograms of oriented gradients (8 orientation bins over a
//! 16×16 grid of cells, magnitude-weighted, L2-normalised); the score of a
//! query against an enrolled reference is their cosine similarity.

use crate::image::{gradient, Image};
use crate::ComputeError;

/// Grid cells per side.
pub const GRID: usize = 16;
/// Orientation bins per cell.
pub const BINS: usize = 8;

/// A feature vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Features(pub Vec<f32>);

/// Something that can run the verification kernel.
pub trait VerifyBackend: Send + Sync {
    /// Backend name for logs.
    fn name(&self) -> &'static str;
    /// Feature vector of an image.
    fn features(&self, image: &Image<'_>) -> Result<Features, ComputeError>;
    /// Similarity in `[-1, 1]` of two feature vectors.
    fn similarity(&self, a: &Features, b: &Features) -> Result<f32, ComputeError>;
    /// Score of `query` against `reference` (both encoded images).
    fn verify(&self, query: &[u8], reference: &Features) -> Result<f32, ComputeError> {
        let img = Image::parse(query)?;
        self.similarity(&self.features(&img)?, reference)
    }
}

/// The CPU backend. `stride` > 1 samples every `stride`-th pixel per axis
/// (a cheaper kernel standing in for an accelerator's speed).
#[derive(Clone, Copy, Debug)]
pub struct CpuBackend {
    /// Pixel sampling stride per axis (1: every pixel).
    pub stride: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend { stride: 1 }
    }
}

impl VerifyBackend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn features(&self, img: &Image<'_>) -> Result<Features, ComputeError> {
        let mut hist = vec![0f32; GRID * GRID * BINS];
        let step = self.stride.max(1);
        for y in (1..img.height - 1).step_by(step) {
            let cy = y * GRID / img.height;
            for x in (1..img.width - 1).step_by(step) {
                let (gx, gy) = gradient(img, x, y);
                if gx == 0 && gy == 0 {
                    continue;
                }
                let mag = ((gx * gx + gy * gy) as f32).sqrt();
                // Unsigned orientation in [0, pi) mapped to a bin.
                let mut angle = (gy as f32).atan2(gx as f32);
                if angle < 0.0 {
                    angle += core::f32::consts::PI;
                }
                let bin = ((angle / core::f32::consts::PI) * BINS as f32) as usize % BINS;
                let cx = x * GRID / img.width;
                hist[(cy * GRID + cx) * BINS + bin] += mag;
            }
        }
        let norm = hist.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm == 0.0 {
            return Err(ComputeError::BadImage("image has no structure (flat)"));
        }
        hist.iter_mut().for_each(|v| *v /= norm);
        Ok(Features(hist))
    }

    fn similarity(&self, a: &Features, b: &Features) -> Result<f32, ComputeError> {
        if a.0.len() != b.0.len() {
            return Err(ComputeError::FeatureMismatch {
                left: a.0.len(),
                right: b.0.len(),
            });
        }
        Ok(a.0.iter().zip(&b.0).map(|(x, y)| x * y).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::synth_face;

    fn feats(person: u64, capture: u64) -> Features {
        let img = synth_face(person, capture, 96, 96);
        CpuBackend::default()
            .features(&Image::parse(&img).unwrap())
            .unwrap()
    }

    #[test]
    fn same_person_scores_higher_than_strangers() {
        let enrolled = feats(1, 0);
        let same = CpuBackend::default()
            .similarity(&enrolled, &feats(1, 7))
            .unwrap();
        let other = CpuBackend::default()
            .similarity(&enrolled, &feats(2, 7))
            .unwrap();
        assert!(same > 0.9, "same person: {same}");
        assert!(same > other + 0.05, "same {same} vs other {other}");
    }

    #[test]
    fn sampling_keeps_identities_apart() {
        let fast = CpuBackend { stride: 4 };
        let f = |person, capture| {
            let img = synth_face(person, capture, 256, 256);
            fast.features(&Image::parse(&img).unwrap()).unwrap()
        };
        let enrolled = f(1, 0);
        let same = fast.similarity(&enrolled, &f(1, 3)).unwrap();
        let other = fast.similarity(&enrolled, &f(2, 3)).unwrap();
        assert!(same > other + 0.05, "same {same} vs other {other}");
    }

    #[test]
    fn flat_images_and_mismatched_features_are_errors() {
        let mut flat = synth_face(1, 1, 16, 16);
        flat[12..].fill(9);
        assert!(CpuBackend::default()
            .features(&Image::parse(&flat).unwrap())
            .is_err());
        let r = CpuBackend::default().similarity(&Features(vec![1.0]), &Features(vec![1.0, 0.0]));
        assert!(matches!(r, Err(ComputeError::FeatureMismatch { .. })));
    }
}
