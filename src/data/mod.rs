//! Data loading: image decoding and resizing shared by the image processors (datasets follow).

pub mod image;
pub mod dataset; // defines: Sample, Message, Role, Kind, load_jsonl (validated JSONL, errors as file:line)
pub mod demo; // defines: generate (the synthetic demo dataset + tokenizer under data/demo/)
pub mod tokenizer_train; // defines: train_bpe, train_demo_tokenizer (byte-level BPE with the Qwen special tokens)
