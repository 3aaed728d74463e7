pub mod config;
pub mod processor;
pub mod positions;
pub mod chat;
pub mod model;
pub mod text;
pub mod vision;
