//! Judging that overlaps generation: a finished dialogue is pushed as soon as its last rollout
//! ends, while the engine keeps decoding the others. The http judge starts its requests at
//! once (its own thread pool); other judges are fast or share the device, so they score the
//! queue at `collect`. Results come back in push order.

use super::http::Ticket;
use super::{Judge, JudgeDialogue, JudgeOutput};
use anyhow::Result;

pub struct Streaming<'a> {
    judge: &'a mut dyn Judge,
    queued: Vec<JudgeDialogue>,
    tickets: Vec<Ticket>,
}

impl<'a> Streaming<'a> {
    pub fn new(judge: &'a mut dyn Judge) -> Self {
        Streaming { judge, queued: Vec::new(), tickets: Vec::new() }
    }

    /// Starts (http) or queues the scoring of one finished dialogue.
    pub fn push(&mut self, d: JudgeDialogue) -> Result<()> {
        match self.judge.as_http() {
            Some(h) => self.tickets.push(h.submit(d)?),
            None => self.queued.push(d),
        }
        Ok(())
    }

    /// Dialogues pushed but not collected.
    pub fn pending(&self) -> usize {
        self.queued.len() + self.tickets.len()
    }

    /// Every pushed dialogue's scores, in push order.
    pub fn collect(self) -> Result<JudgeOutput> {
        let mut out = JudgeOutput::default();
        for t in self.tickets {
            out.extend(t.wait());
        }
        if !self.queued.is_empty() {
            out.extend(self.judge.score(&self.queued)?);
        }
        Ok(out)
    }
}
