//! `image_grid_pinpoints`: the anyres grid resolutions.

use super::*;

pub(super) fn parse_pinpoints(f: Fields, v: &Value) -> Result<Vec<(usize, usize)>> {
    let key = "image_grid_pinpoints";
    let bad =
        || f.err(key, format!("expected a non-empty list of [height, width] pairs of positive integers, got {v}"));
    let Value::Array(list) = v else { return Err(bad()) };
    if list.is_empty() {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(list.len());
    for p in list {
        match p.as_array().map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>()) {
            Some(a) if a.len() == 2 => match (a[0], a[1]) {
                (Some(h), Some(w)) if h > 0 && w > 0 => {
                    if h.max(w) > MAX_IMAGE_SIDE as u64 {
                        return Err(
                            f.err(key, format!("[{h}, {w}] has a side above the limit of {MAX_IMAGE_SIDE} pixels"))
                        );
                    }
                    out.push((h as usize, w as usize))
                }
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        }
    }
    Ok(out)
}
