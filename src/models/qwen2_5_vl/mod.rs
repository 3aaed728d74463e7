pub mod chat;
pub mod config;
pub mod model;
pub mod positions;
pub mod processor;
pub mod text;
pub mod vision;
