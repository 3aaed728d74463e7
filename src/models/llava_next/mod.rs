//! LLaVA-NeXT (llava-hf/llava-v1.6-{mistral,vicuna}-7b-hf): config and weight names, the anyres
//! image processor, the anyres packing geometry, and the chat templates.

pub mod chat;
pub mod config;
pub mod model;
pub mod packing;
pub mod processor;
pub mod vision;
