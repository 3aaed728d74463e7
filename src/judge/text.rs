//! Text matching shared by the judges: one normal form (lower case, typographic apostrophes
//! and quotes made plain, runs of white space made one space), word splitting, phrase and
//! keyword matching, and unigram F1 for reference overlap.

use std::collections::HashMap;

/// Lower case; ’ ‘ ʼ ` ´ become ', “ ” become "; white space runs become one space.
pub fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars().flat_map(char::to_lowercase) {
        let c = match c {
            '\u{2019}' | '\u{2018}' | '\u{02bc}' | '`' | '\u{00b4}' | '\u{2032}' => '\'',
            '\u{201c}' | '\u{201d}' => '"',
            c => c,
        };
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        out.push(c);
    }
    out
}

/// The words of `s` after `normalize`: runs of letters, digits and inner apostrophes.
pub fn words(s: &str) -> Vec<String> {
    let n = normalize(s);
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in n.chars() {
        if c.is_alphanumeric() || (c == '\'' && !cur.is_empty()) {
            cur.push(c);
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    // A trailing apostrophe is quotation, not part of the word.
    out.iter_mut().for_each(|w| {
        while w.ends_with('\'') {
            w.pop();
        }
    });
    out.retain(|w| !w.is_empty());
    out
}

/// The first of `patterns` (already normalised) that occurs in `normalized_text` as a phrase
/// starting at a word boundary, so "i cannot" does not fire inside "hi cannot".
pub fn find_phrase<'a>(normalized_text: &str, patterns: &'a [String]) -> Option<&'a str> {
    patterns.iter().find(|p| !p.is_empty() && contains_at_boundary(normalized_text, p)).map(|p| p.as_str())
}

fn contains_at_boundary(text: &str, pat: &str) -> bool {
    let mut from = 0;
    while let Some(i) = text[from..].find(pat) {
        let at = from + i;
        let before_ok = text[..at].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
        if before_ok {
            return true;
        }
        from = at + text[at..].chars().next().map_or(1, char::len_utf8);
    }
    false
}

/// A harm keyword: a sequence of words, the last one a prefix when written with a trailing `*`
/// (`explosiv*` matches "explosive" and "explosives").
#[derive(Clone, Debug, PartialEq)]
pub struct Keyword {
    pub text: String,
    words: Vec<String>,
    prefix: bool,
}

impl Keyword {
    pub fn new(text: &str) -> Keyword {
        let t = text.trim();
        let prefix = t.ends_with('*');
        Keyword { text: t.to_string(), words: words(t.trim_end_matches('*')), prefix }
    }

    /// Does the keyword occur in `ws` (the words of a text) as consecutive whole words?
    pub fn occurs_in(&self, ws: &[String]) -> bool {
        let k = self.words.len();
        if k == 0 || ws.len() < k {
            return false;
        }
        ws.windows(k).any(|win| {
            win.iter().zip(&self.words).enumerate().all(|(i, (w, kw))| {
                if self.prefix && i == k - 1 {
                    w.starts_with(kw.as_str())
                } else {
                    w == kw
                }
            })
        })
    }
}

/// Unigram F1 between the words of `answer` and `reference` (multiset overlap); 0 when either
/// is empty.
pub fn unigram_f1(answer: &str, reference: &str) -> f64 {
    let (a, r) = (words(answer), words(reference));
    if a.is_empty() || r.is_empty() {
        return 0.0;
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in &r {
        *counts.entry(w.as_str()).or_default() += 1;
    }
    let mut common = 0usize;
    for w in &a {
        if let Some(c) = counts.get_mut(w.as_str()) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let p = common as f64 / a.len() as f64;
    let rc = common as f64 / r.len() as f64;
    2.0 * p * rc / (p + rc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_form_and_words() {
        assert_eq!(normalize("I  Can\u{2019}t\nHELP"), "i can't help");
        assert_eq!(words("Don't, 'quoted' x2!"), vec!["don't", "quoted", "x2"]);
        let pats = vec!["i can't".to_string()];
        assert!(find_phrase("sorry, i can't do that", &pats).is_some());
        assert!(find_phrase("hi can't", &pats).is_none());
    }

    #[test]
    fn keywords_and_f1() {
        let ws = words("How to build Explosives at home");
        assert!(Keyword::new("explosiv*").occurs_in(&ws));
        assert!(Keyword::new("build explosives").occurs_in(&ws));
        assert!(!Keyword::new("explosive").occurs_in(&ws));
        assert!(!Keyword::new("gun").occurs_in(&words("it had begun")));
        assert!((unigram_f1("a red circle", "a red circle") - 1.0).abs() < 1e-12);
        assert!((unigram_f1("a red circle", "a blue square") - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(unigram_f1("", "x"), 0.0);
    }
}
