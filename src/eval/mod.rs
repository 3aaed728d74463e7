//! `am3 eval`'s metric and report layer, independent of generation: judged dialogues in,
//! safety figures with bootstrap intervals out (README "Eval metrics" has the definitions).

pub mod bootstrap; // defines: Figure, Ratio, evaluate (shared resamples, percentile CIs), quantile
pub mod chart; // defines: turn_chart_svg, write_turn_chart (mean s and h per turn, SVG)
pub mod metrics; // defines: Metrics, compute_metrics, Split, TurnFigures, RoundsFigure, GroupFigures, WinRates, Counts
pub mod record; // defines: EvalRecord, PairRecord, EvalConfig, HistoryMode, check_records
pub mod report; // defines: Report, write_report, read_report, write_answers_jsonl
pub mod table; // defines: metrics_table, before_after_table, print_before_after
pub mod winrate; // defines: order_score, pair_score

pub use bootstrap::Figure;
pub use chart::{turn_chart_svg, write_turn_chart};
pub use metrics::{compute_metrics, Counts, GroupFigures, Metrics, RoundsFigure, Split, TurnFigures, WinRates};
pub use record::{EvalConfig, EvalRecord, HistoryMode, PairRecord};
pub use report::{read_report, write_answers_jsonl, write_report, Report};
pub use table::{before_after_table, metrics_table, print_before_after};
pub use winrate::pair_score;
