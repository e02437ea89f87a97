//! The image format the pipeline moves, and a deterministic generator of
//! face-like test images.
//!
//! Format: `b"FIMG"`, width `u32` LE, height `u32` LE, then `width*height`
//! grayscale bytes, row-major.

use crate::ComputeError;

/// Bytes before the pixels.
pub const HEADER_LEN: usize = 12;

/// A borrowed grayscale image.
#[derive(Clone, Copy, Debug)]
pub struct Image<'a> {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major pixels.
    pub pixels: &'a [u8],
}

impl<'a> Image<'a> {
    /// Parses an encoded image, checking every length.
    pub fn parse(bytes: &'a [u8]) -> Result<Image<'a>, ComputeError> {
        if bytes.len() < HEADER_LEN || &bytes[..4] != b"FIMG" {
            return Err(ComputeError::BadImage("missing FIMG header"));
        }
        let width = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
        let height = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        if width < 8 || height < 8 {
            return Err(ComputeError::BadImage("image smaller than 8x8"));
        }
        let n = width
            .checked_mul(height)
            .ok_or(ComputeError::BadImage("dimensions overflow"))?;
        let pixels = bytes
            .get(HEADER_LEN..HEADER_LEN + n)
            .ok_or(ComputeError::BadImage(
                "fewer pixels than the header announces",
            ))?;
        Ok(Image {
            width,
            height,
            pixels,
        })
    }

    fn at(&self, x: usize, y: usize) -> i32 {
        self.pixels[y * self.width + x] as i32
    }
}

/// Encoded length of a `width`×`height` image.
pub fn encoded_len(width: usize, height: usize) -> usize {
    HEADER_LEN + width * height
}

/// Deterministic xorshift noise.
struct Noise(u64);
impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A face-like image of identity `person` (ellipse, eyes, mouth at
/// identity-dependent positions) with capture noise `capture`.
pub fn synth_face(person: u64, capture: u64, width: usize, height: usize) -> Vec<u8> {
    let mut id = Noise(person.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut shot = Noise(capture.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1);
    let (w, h) = (width as f32, height as f32);
    let frac = |n: &mut Noise| (n.next() % 1000) as f32 / 1000.0;
    let face_rx = w * (0.28 + 0.1 * frac(&mut id));
    let face_ry = h * (0.36 + 0.08 * frac(&mut id));
    let eye_dx = w * (0.09 + 0.06 * frac(&mut id));
    let eye_y = h * (0.38 + 0.08 * frac(&mut id));
    let eye_r = w * (0.03 + 0.03 * frac(&mut id));
    let mouth_y = h * (0.62 + 0.1 * frac(&mut id));
    let mouth_w = w * (0.08 + 0.1 * frac(&mut id));
    let stripes = 3.0 + 6.0 * frac(&mut id);
    let shift_x = (frac(&mut shot) - 0.5) * w * 0.02;
    let shift_y = (frac(&mut shot) - 0.5) * h * 0.02;
    let (cx, cy) = (w / 2.0 + shift_x, h / 2.0 + shift_y);
    let mut out = Vec::with_capacity(encoded_len(width, height));
    out.extend_from_slice(b"FIMG");
    out.extend_from_slice(&(width as u32).to_le_bytes());
    out.extend_from_slice(&(height as u32).to_le_bytes());
    for y in 0..height {
        for x in 0..width {
            let (fx, fy) = (x as f32 - cx, y as f32 - cy);
            let mut v = 40.0;
            if (fx / face_rx).powi(2) + (fy / face_ry).powi(2) < 1.0 {
                v = 170.0 + 30.0 * ((fy / face_ry) * stripes).sin();
                for side in [-1.0f32, 1.0] {
                    let (ex, ey) = (fx - side * eye_dx, y as f32 - (eye_y + shift_y));
                    if ex * ex + ey * ey < eye_r * eye_r {
                        v = 30.0;
                    }
                }
                if (y as f32 - (mouth_y + shift_y)).abs() < h * 0.015 && fx.abs() < mouth_w {
                    v = 60.0;
                }
            }
            let noise = (shot.next() % 21) as f32 - 10.0;
            out.push((v + noise).clamp(0.0, 255.0) as u8);
        }
    }
    out
}

/// Horizontal and vertical central-difference gradients at `(x, y)`.
pub(crate) fn gradient(img: &Image<'_>, x: usize, y: usize) -> (i32, i32) {
    let gx = img.at(x + 1, y) - img.at(x - 1, y);
    let gy = img.at(x, y + 1) - img.at(x, y - 1);
    (gx, gy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_checks_lengths() {
        let img = synth_face(1, 1, 32, 24);
        let parsed = Image::parse(&img).unwrap();
        assert_eq!((parsed.width, parsed.height), (32, 24));
        assert!(Image::parse(&img[..img.len() - 1]).is_err());
        assert!(Image::parse(b"NOPE").is_err());
        let mut tiny = img.clone();
        tiny[4..8].copy_from_slice(&4u32.to_le_bytes());
        assert!(Image::parse(&tiny).is_err());
    }

    #[test]
    fn synthesis_is_deterministic() {
        assert_eq!(synth_face(5, 9, 40, 40), synth_face(5, 9, 40, 40));
        assert_ne!(synth_face(5, 9, 40, 40), synth_face(5, 10, 40, 40));
    }
}
