//! Plain-text tables for the terminal: the eval table (model, optional baseline, intervals,
//! counts) and the before/after table of `am3 demo`. Rates print as percentages, means of s and
//! h with three decimals, a missing figure as "-".

use super::bootstrap::Figure;
use super::metrics::Metrics;
use std::collections::BTreeSet;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Rate,
    Mean,
}

type Getter = Box<dyn for<'a> Fn(&'a Metrics) -> Option<&'a Figure>>;

struct Row {
    label: String,
    kind: Kind,
    get: Getter,
    /// Shown only where some figure has a value or a missing count (per-turn rows: with given
    /// history most turn indices judge nothing).
    optional: bool,
}

fn row(label: impl Into<String>, kind: Kind, get: impl for<'a> Fn(&'a Metrics) -> Option<&'a Figure> + 'static) -> Row {
    Row { label: label.into(), kind, get: Box::new(get), optional: false }
}

impl Row {
    fn shown(&self, metrics: &[&Metrics]) -> bool {
        !self.optional || metrics.iter().filter_map(|m| (self.get)(m)).any(|f| f.value.is_some() || f.missing > 0)
    }
}

fn fmt_value(v: Option<f64>, kind: Kind) -> String {
    match (v, kind) {
        (None, _) => "-".into(),
        (Some(x), Kind::Rate) => format!("{:.1}%", 100.0 * x),
        (Some(x), Kind::Mean) => format!("{x:.3}"),
    }
}

fn fmt_ci(f: Option<&Figure>, kind: Kind) -> String {
    match f.map(|f| (f.ci_low, f.ci_high)) {
        Some((Some(lo), Some(hi))) => format!("[{}, {}]", fmt_value(Some(lo), kind), fmt_value(Some(hi), kind)),
        _ => "-".into(),
    }
}

fn fmt_n(f: Option<&Figure>) -> String {
    match f {
        None => "-".into(),
        Some(f) if f.missing > 0 => format!("{}, {} missing", f.count, f.missing),
        Some(f) => f.count.to_string(),
    }
}

fn fmt_change(a: Option<f64>, b: Option<f64>, kind: Kind) -> String {
    match (a, b, kind) {
        (Some(a), Some(b), Kind::Rate) => format!("{:+.1} pp", 100.0 * (b - a)),
        (Some(a), Some(b), Kind::Mean) => format!("{:+.3}", b - a),
        _ => "-".into(),
    }
}

/// Aligned columns: the first left-aligned, the others right-aligned, a rule under the header.
fn render(header: &[String], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&width)
            .enumerate()
            .map(|(i, (c, &w))| if i == 0 { format!("{c:<w$}") } else { format!("{c:>w$}") })
            .collect();
        parts.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(header);
    out += &(width.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().join("  ") + "\n");
    for r in rows {
        out += &line(r);
    }
    out
}

/// The headline rows, then per turn index (1-based in labels), per k and per category.
fn rows(metrics: &[&Metrics], with_wins: bool, per_category: bool) -> Vec<Row> {
    let mut rows = vec![
        row("ASR", Kind::Rate, |m| Some(&m.asr)),
        row("over-refusal", Kind::Rate, |m| Some(&m.over_refusal)),
        row("mean safety s", Kind::Mean, |m| Some(&m.mean_safety)),
        row("mean helpfulness h", Kind::Mean, |m| Some(&m.mean_help)),
    ];
    if with_wins {
        rows.push(row("win rate helpful (benign turns)", Kind::Rate, |m| m.win_rates.as_ref().map(|w| &w.helpful)));
        rows.push(row("win rate harmless (harmful turns)", Kind::Rate, |m| m.win_rates.as_ref().map(|w| &w.harmless)));
    }
    let turns = metrics.iter().map(|m| m.per_turn.len()).max().unwrap_or(0);
    for t in 0..turns {
        let n = t + 1;
        let turn_rows = [
            row(format!("ASR turn {n}"), Kind::Rate, move |m| m.per_turn.get(t).map(|x| &x.asr)),
            row(format!("over-refusal turn {n}"), Kind::Rate, move |m| m.per_turn.get(t).map(|x| &x.over_refusal)),
            row(format!("mean s turn {n}"), Kind::Mean, move |m| m.per_turn.get(t).map(|x| &x.safety.all)),
            row(format!("mean h turn {n}"), Kind::Mean, move |m| m.per_turn.get(t).map(|x| &x.help.all)),
        ];
        rows.extend(turn_rows.into_iter().map(|r| Row { optional: true, ..r }));
    }
    let ks: BTreeSet<usize> = metrics.iter().flat_map(|m| m.asr_by_rounds.iter().map(|r| r.rounds)).collect();
    for k in ks {
        rows.push(row(format!("ASR_{k} ({k} rounds)"), Kind::Rate, move |m| {
            m.asr_by_rounds.iter().find(|r| r.rounds == k).map(|r| &r.asr)
        }));
    }
    if per_category {
        let cats: BTreeSet<String> = metrics.iter().flat_map(|m| m.categories.keys().cloned()).collect();
        for c in cats {
            let (c1, c2, c3, c4) = (c.clone(), c.clone(), c.clone(), c.clone());
            rows.push(row(format!("ASR [{c}]"), Kind::Rate, move |m| m.categories.get(&c1).map(|g| &g.asr)));
            rows.push(row(format!("over-refusal [{c}]"), Kind::Rate, move |m| {
                m.categories.get(&c2).map(|g| &g.over_refusal)
            }));
            rows.push(row(format!("mean s [{c}]"), Kind::Mean, move |m| m.categories.get(&c3).map(|g| &g.mean_safety)));
            rows.push(row(format!("mean h [{c}]"), Kind::Mean, move |m| m.categories.get(&c4).map(|g| &g.mean_help)));
        }
    }
    rows
}

fn counts_line(name: &str, m: &Metrics) -> String {
    let c = &m.counts;
    let mut s = format!(
        "{name}: {} dialogues ({} harmful, {} benign), {} rollouts, {} scored turns, {} missing scores, {} unanswered turns",
        c.dialogues, c.harmful_dialogues, c.benign_dialogues, c.rollouts, c.scored_turns, c.missing_scores, c.unanswered_turns
    );
    if c.pairs > 0 {
        s += &format!(", {} pairs ({} missing)", c.pairs, c.missing_pairs);
    }
    s + "\n"
}

/// The eval table: metric, the model's figure, its interval and count, then the baseline's.
pub fn metrics_table(model_name: &str, model: &Metrics, baseline: Option<(&str, &Metrics)>) -> String {
    let level = format!("{:.0}% CI", 100.0 * model.config.level);
    let mut header = vec!["metric".to_string(), model_name.to_string(), level.clone(), "n".into()];
    if let Some((name, _)) = baseline {
        header.extend([name.to_string(), level, "n".into()]);
    }
    let all: Vec<&Metrics> = std::iter::once(model).chain(baseline.map(|b| b.1)).collect();
    let cells: Vec<Vec<String>> = rows(&all, model.win_rates.is_some(), true)
        .iter()
        .filter(|r| r.shown(&all))
        .map(|r| {
            let mut cells = vec![r.label.clone()];
            for m in &all {
                let f = (r.get)(m);
                cells.extend([fmt_value(f.and_then(|f| f.value), r.kind), fmt_ci(f, r.kind), fmt_n(f)]);
            }
            cells
        })
        .collect();
    let mut out = render(&header, &cells);
    out += &counts_line(model_name, model);
    if let Some((name, b)) = baseline {
        out += &counts_line(name, b);
    }
    out
}

/// ASR, over-refusal and mean s and h (overall and per turn index): before, after, change.
pub fn before_after_table(before: &Metrics, after: &Metrics) -> String {
    let header: Vec<String> = ["metric", "before", "after", "change"].map(String::from).to_vec();
    let cells: Vec<Vec<String>> = rows(&[before, after], false, false)
        .iter()
        .filter(|r| !r.label.starts_with("ASR_") && r.shown(&[before, after]))
        .map(|r| {
            let (a, b) = ((r.get)(before).and_then(|f| f.value), (r.get)(after).and_then(|f| f.value));
            vec![r.label.clone(), fmt_value(a, r.kind), fmt_value(b, r.kind), fmt_change(a, b, r.kind)]
        })
        .collect();
    render(&header, &cells)
}

/// Prints [`before_after_table`] to stdout and returns it.
pub fn print_before_after(before: &Metrics, after: &Metrics) -> String {
    let table = before_after_table(before, after);
    print!("{table}");
    table
}
