//! The demo pictures: coloured shapes on a 28-pixel grid, drawn and written as PNG.

use super::*;

pub(super) const CELL: usize = 28;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub(super) const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];
    pub(super) fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// (name, RGB).
pub(super) const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 160, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [230, 200, 30]),
    ("purple", [140, 60, 170]),
    ("orange", [240, 130, 30]),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Item {
    pub(super) shape: Shape,
    pub(super) colour: usize,
    /// Centre and half-size in pixels.
    cx: usize,
    cy: usize,
    r: usize,
}

impl Item {
    fn phrase(&self) -> String {
        with_article(&format!("{} {}", COLOURS[self.colour].0, self.shape.name()))
    }
}

/// One picture: its size and shapes in reading order (cells left to right, top to bottom).
pub(super) struct Picture {
    width: usize,
    height: usize,
    pub(super) items: Vec<Item>,
}

impl Picture {
    /// 1–3 shapes, each in its own 28×28 cell, no two with the same colour and shape.
    pub(super) fn random(rng: &mut Rng) -> Picture {
        let (cols, rows) = if rng.below(2) == 0 { (2, 2) } else { (3, 2) };
        let mut cells: Vec<usize> = (0..cols * rows).collect();
        shuffle(rng, &mut cells);
        let n = 1 + rng.below(3);
        let mut chosen: Vec<usize> = cells[..n].to_vec();
        chosen.sort_unstable();
        let mut items: Vec<Item> = Vec::with_capacity(n);
        for cell in chosen {
            let (shape, colour) = loop {
                let s = Shape::ALL[rng.below(3)];
                let c = rng.below(COLOURS.len());
                if !items.iter().any(|it| it.shape == s && it.colour == c) {
                    break (s, c);
                }
            };
            let (col, row) = (cell % cols, cell / cols);
            let r = 9 + rng.below(3);
            let cx = col * CELL + CELL / 2 - 1 + rng.below(3);
            let cy = row * CELL + CELL / 2 - 1 + rng.below(3);
            items.push(Item { shape, colour, cx, cy, r });
        }
        Picture { width: cols * CELL, height: rows * CELL, items }
    }

    /// `[height, width, 3]` RGB on white.
    fn pixels(&self) -> Vec<u8> {
        let mut px = vec![255u8; self.width * self.height * 3];
        for it in &self.items {
            let (cx, cy, r) = (it.cx as f64, it.cy as f64, it.r as f64);
            for y in 0..self.height {
                for x in 0..self.width {
                    // Pixel centres.
                    let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
                    let inside = match it.shape {
                        Shape::Circle => (fx - cx).powi(2) + (fy - cy).powi(2) <= r * r,
                        Shape::Square => (fx - cx).abs() <= 0.85 * r && (fy - cy).abs() <= 0.85 * r,
                        Shape::Triangle => {
                            let top = cy - r;
                            fy >= top && fy <= cy + r && (fx - cx).abs() <= (fy - top) / 2.0
                        }
                    };
                    if inside {
                        let o = (y * self.width + x) * 3;
                        px[o..o + 3].copy_from_slice(&COLOURS[it.colour].1);
                    }
                }
            }
        }
        px
    }

    pub(super) fn png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        PngEncoder::new_with_quality(&mut out, CompressionType::Best, FilterType::Adaptive)
            .write_image(&self.pixels(), self.width as u32, self.height as u32, ExtendedColorType::Rgb8)
            .context("encoding a demo PNG")?;
        Ok(out)
    }

    /// "a red circle", "a red circle and a blue square", "a, b and c".
    pub(super) fn list(&self) -> String {
        let p: Vec<String> = self.items.iter().map(Item::phrase).collect();
        match p.len() {
            0 => "nothing".to_string(),
            1 => p[0].clone(),
            n => format!("{} and {}", p[..n - 1].join(", "), p[n - 1]),
        }
    }

    pub(super) fn count_word(&self) -> &'static str {
        ["no", "one", "two", "three"][self.items.len().min(3)]
    }

    /// "There is a red circle." / "There are two shapes: ...".
    pub(super) fn what_is_there(&self) -> String {
        if self.items.len() == 1 {
            format!("There is {}.", self.list())
        } else {
            format!("There are {} shapes: {}.", self.count_word(), self.list())
        }
    }

    /// A shape that appears exactly once (so "what colour is the X" has one answer).
    pub(super) fn unique_item(&self, rng: &mut Rng) -> Option<Item> {
        let uniq: Vec<Item> = self
            .items
            .iter()
            .filter(|a| self.items.iter().filter(|b| b.shape == a.shape).count() == 1)
            .copied()
            .collect();
        (!uniq.is_empty()).then(|| uniq[rng.below(uniq.len())])
    }
}
