//! Data loading: image decoding and resizing shared by the image processors, the JSONL dialogue
//! format, converters from published layouts, and the demo dataset.

pub mod convert; // defines: convert (other layouts → this crate's JSONL, for `am3 data convert`)
pub mod dataset; // defines: Sample, Message, Role, Kind, TurnLabel, UserTurn, Purpose, load_jsonl, load_prompts, write_jsonl (validated JSONL, errors as file:line)
pub mod demo; // defines: generate (the synthetic demo dataset + tokenizer under data/demo/)
pub mod image;
pub mod safemt; // defines: load_safemt (the SafeMT benchmark layout → prompt-only samples)
pub mod tokenizer_train; // defines: train_bpe, train_demo_tokenizer (byte-level BPE with the Qwen special tokens)
