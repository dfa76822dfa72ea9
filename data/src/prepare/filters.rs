//! Quality filters: Gopher-style rules (Rae et al. 2021, "Scaling Language Models",
//! appendix A; as implemented by datatrove's `GopherQualityFilter` and
//! `GopherRepetitionFilter`) over a normalised document.
//!
//! [`check`] returns the first rule a document fails, in the order of [`Rule::ALL`], or
//! `None`. Words are whitespace-separated tokens; lines are split at `\n`. Repetition
//! fractions are over the document's character count, as datatrove computes them.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::prepare::config::FilterConfig;

/// A quality rule (the reason a document was dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Fewer than `min_chars` characters.
    MinChars,
    /// More than `max_chars` characters.
    MaxChars,
    /// Fewer than `min_words` words.
    MinWords,
    /// More than `max_words` words.
    MaxWords,
    /// Mean word length below `min_mean_word_len`.
    MinMeanWordLen,
    /// Mean word length above `max_mean_word_len`.
    MaxMeanWordLen,
    /// Symbol-to-word ratio above `max_symbol_word_ratio`.
    SymbolWordRatio,
    /// Too many lines start with a bullet.
    BulletLines,
    /// Too many lines end with an ellipsis.
    EllipsisLines,
    /// Too few words contain a letter.
    AlphaWords,
    /// Too few stop words.
    StopWords,
    /// Too many repeated lines.
    DupLines,
    /// Too many characters in repeated lines.
    DupLineChars,
    /// The most frequent n-gram covers too many characters.
    TopNgram,
    /// Too many characters in repeated n-grams.
    DupNgram,
}

impl Rule {
    /// Every rule, in the order they are checked.
    pub const ALL: [Rule; 15] = [
        Rule::MinChars,
        Rule::MaxChars,
        Rule::MinWords,
        Rule::MaxWords,
        Rule::MinMeanWordLen,
        Rule::MaxMeanWordLen,
        Rule::SymbolWordRatio,
        Rule::BulletLines,
        Rule::EllipsisLines,
        Rule::AlphaWords,
        Rule::StopWords,
        Rule::DupLines,
        Rule::DupLineChars,
        Rule::TopNgram,
        Rule::DupNgram,
    ];

    /// The snake_case name used in reports and the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Rule::MinChars => "min_chars",
            Rule::MaxChars => "max_chars",
            Rule::MinWords => "min_words",
            Rule::MaxWords => "max_words",
            Rule::MinMeanWordLen => "min_mean_word_len",
            Rule::MaxMeanWordLen => "max_mean_word_len",
            Rule::SymbolWordRatio => "symbol_word_ratio",
            Rule::BulletLines => "bullet_lines",
            Rule::EllipsisLines => "ellipsis_lines",
            Rule::AlphaWords => "alpha_words",
            Rule::StopWords => "stop_words",
            Rule::DupLines => "dup_lines",
            Rule::DupLineChars => "dup_line_chars",
            Rule::TopNgram => "top_ngram",
            Rule::DupNgram => "dup_ngram",
        }
    }
}

/// Gopher's stop words: a document needs a few of them to look like natural language.
const STOP_WORDS: [&str; 8] = ["the", "be", "to", "of", "and", "that", "have", "with"];

/// The first rule `text` fails under `config`, or `None` when it passes them all (or the
/// filters are disabled).
pub fn check(text: &str, config: &FilterConfig) -> Option<Rule> {
    if !config.enabled {
        return None;
    }
    let chars = text.chars().count();
    if config.min_chars.is_some_and(|m| chars < m) {
        return Some(Rule::MinChars);
    }
    if config.max_chars.is_some_and(|m| chars > m) {
        return Some(Rule::MaxChars);
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    if config.min_words.is_some_and(|m| words.len() < m) {
        return Some(Rule::MinWords);
    }
    if config.max_words.is_some_and(|m| words.len() > m) {
        return Some(Rule::MaxWords);
    }
    let n_words = words.len().max(1) as f64;
    let mean_len = words.iter().map(|w| w.chars().count()).sum::<usize>() as f64 / n_words;
    if config.min_mean_word_len.is_some_and(|m| mean_len < m) {
        return Some(Rule::MinMeanWordLen);
    }
    if config.max_mean_word_len.is_some_and(|m| mean_len > m) {
        return Some(Rule::MaxMeanWordLen);
    }
    if let Some(max) = config.max_symbol_word_ratio {
        let symbols =
            text.matches('#').count() + text.matches("...").count() + text.matches('…').count();
        if symbols as f64 / n_words > max {
            return Some(Rule::SymbolWordRatio);
        }
    }
    let lines: Vec<&str> = text.split('\n').collect();
    let n_lines = lines.len().max(1) as f64;
    if let Some(max) = config.max_bullet_line_fraction {
        let bullets = lines
            .iter()
            .filter(|l| {
                let l = l.trim_start();
                l.starts_with(['•', '-', '*', '·', '‣', '▪'])
            })
            .count();
        if bullets as f64 / n_lines > max {
            return Some(Rule::BulletLines);
        }
    }
    if let Some(max) = config.max_ellipsis_line_fraction {
        let ellipses = lines
            .iter()
            .filter(|l| {
                let l = l.trim_end();
                l.ends_with("...") || l.ends_with('…')
            })
            .count();
        if ellipses as f64 / n_lines > max {
            return Some(Rule::EllipsisLines);
        }
    }
    if let Some(min) = config.min_alpha_word_fraction {
        let alpha = words
            .iter()
            .filter(|w| w.chars().any(char::is_alphabetic))
            .count();
        if (alpha as f64 / n_words) < min {
            return Some(Rule::AlphaWords);
        }
    }
    if let Some(min) = config.min_stop_words {
        let mut found = 0usize;
        for w in &words {
            if STOP_WORDS.iter().any(|s| w.eq_ignore_ascii_case(s)) {
                found += 1;
                if found >= min {
                    break;
                }
            }
        }
        if found < min {
            return Some(Rule::StopWords);
        }
    }
    let total_chars = chars.max(1) as f64;
    if config.max_dup_line_fraction.is_some() || config.max_dup_line_char_fraction.is_some() {
        let (dup_lines, dup_chars) = duplicate_lines(&lines);
        if config
            .max_dup_line_fraction
            .is_some_and(|m| dup_lines as f64 / n_lines > m)
        {
            return Some(Rule::DupLines);
        }
        if config
            .max_dup_line_char_fraction
            .is_some_and(|m| dup_chars as f64 / total_chars > m)
        {
            return Some(Rule::DupLineChars);
        }
    }
    if config.max_top_ngram_char_fraction.is_empty()
        && config.max_dup_ngram_char_fraction.is_empty()
    {
        return None;
    }
    let grams = Words::new(&words);
    for &(n, max) in &config.max_top_ngram_char_fraction {
        if top_ngram_chars(&grams, n) as f64 / total_chars > max {
            return Some(Rule::TopNgram);
        }
    }
    for &(n, max) in &config.max_dup_ngram_char_fraction {
        if duplicate_ngram_chars(&grams, n) as f64 / total_chars > max {
            return Some(Rule::DupNgram);
        }
    }
    None
}

/// Lines that repeat an earlier (non-empty) line, and their characters.
fn duplicate_lines(lines: &[&str]) -> (usize, usize) {
    let mut seen = HashSet::new();
    let (mut count, mut chars) = (0, 0);
    for line in lines {
        if line.trim().is_empty() {
            continue;
        }
        if !seen.insert(*line) {
            count += 1;
            chars += line.chars().count();
        }
    }
    (count, chars)
}

/// The words of a document as 64-bit hashes, with prefix sums of their lengths in
/// characters, so n-grams are compared and measured without touching the text again.
/// (Two different n-grams sharing a 64-bit hash is possible but negligible.)
struct Words {
    hashes: Vec<u64>,
    /// `prefix[i]` = characters in words `0..i`.
    prefix: Vec<usize>,
}

impl Words {
    fn new(words: &[&str]) -> Self {
        let mut prefix = Vec::with_capacity(words.len() + 1);
        prefix.push(0);
        let mut hashes = Vec::with_capacity(words.len());
        let mut total = 0usize;
        for w in words {
            let mut h = 0xcbf2_9ce4_8422_2325u64;
            for &b in w.as_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
            hashes.push(h);
            total += if w.is_ascii() {
                w.len()
            } else {
                w.chars().count()
            };
            prefix.push(total);
        }
        Words { hashes, prefix }
    }

    fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Characters of words `i..i + n`.
    fn chars(&self, i: usize, n: usize) -> usize {
        self.prefix[i + n] - self.prefix[i]
    }

    /// A hash of words `i..i + n` (order matters).
    fn gram(&self, i: usize, n: usize) -> u64 {
        let mut h = n as u64;
        for &w in &self.hashes[i..i + n] {
            h = (h.rotate_left(29) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        h ^ (h >> 32)
    }
}

/// A hasher for keys that are already hashes.
#[derive(Default)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type GramBuild = std::hash::BuildHasherDefault<PassThrough>;

/// Characters covered by the most frequent n-gram (joined with spaces, times its count),
/// when it occurs more than once: datatrove's `find_top_duplicate` over `get_n_grams`.
/// Ties go to the longest, then the first in word order.
fn top_ngram_chars(words: &Words, n: usize) -> usize {
    if n == 0 || words.len() < n {
        return 0;
    }
    // n-gram hash → (count, first position).
    let mut counts: HashMap<u64, (usize, usize), GramBuild> =
        HashMap::with_capacity_and_hasher(words.len(), GramBuild::default());
    for i in 0..=words.len() - n {
        counts.entry(words.gram(i, n)).or_insert((0, i)).0 += 1;
    }
    let best = counts
        .values()
        .map(|&(count, first)| {
            (
                count,
                words.chars(first, n) + n - 1,
                std::cmp::Reverse(first),
            )
        })
        .max();
    match best {
        Some((count, len, _)) if count > 1 => len * count,
        _ => 0,
    }
}

/// Characters in repeated n-grams (joined without spaces), skipping past each repeat:
/// datatrove's `find_all_duplicate`.
fn duplicate_ngram_chars(words: &Words, n: usize) -> usize {
    if n == 0 || words.len() < n {
        return 0;
    }
    let mut seen: HashSet<u64, GramBuild> =
        HashSet::with_capacity_and_hasher(words.len(), GramBuild::default());
    let mut repeated = 0usize;
    let mut i = 0usize;
    while i + n <= words.len() {
        if seen.insert(words.gram(i, n)) {
            i += 1;
        } else {
            repeated += words.chars(i, n);
            i += n;
        }
    }
    repeated
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` distinct words and two stop words: passes every default rule once n >= 48.
    fn distinct(n: usize) -> String {
        let mut words = vec!["the".to_string(), "and".to_string()];
        words.extend((0..n).map(|i| format!("word{i}")));
        words.join(" ")
    }

    #[test]
    fn good_text_passes() {
        let c = FilterConfig::default();
        assert_eq!(check(&distinct(60), &c), None);
        assert_eq!(
            check(
                "",
                &FilterConfig {
                    enabled: false,
                    ..c
                }
            ),
            None
        );
    }

    #[test]
    fn rule_table() {
        let c = FilterConfig::default();
        let sentence = "farmers carried heavy baskets across muddy fields toward distant markets";
        let cases: Vec<(&str, String, Option<Rule>)> = vec![
            ("empty", String::new(), Some(Rule::MinChars)),
            ("too long", "x".repeat(1_000_001), Some(Rule::MaxChars)),
            (
                "too few words",
                "the cat and the dog".into(),
                Some(Rule::MinWords),
            ),
            (
                "short words",
                format!("the and {}", vec!["a b c"; 40].join(" ")),
                Some(Rule::MinMeanWordLen),
            ),
            (
                "long words",
                format!("the and {}", vec!["incomprehensibilities"; 60].join(" ")),
                Some(Rule::MaxMeanWordLen),
            ),
            (
                "hashtags",
                format!("{} {}", distinct(60), "#tag ".repeat(10)),
                Some(Rule::SymbolWordRatio),
            ),
            (
                "bullets",
                format!(
                    "the and\n{}",
                    (0..60)
                        .map(|i| format!("- item{i}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
                Some(Rule::BulletLines),
            ),
            (
                "ellipses",
                format!(
                    "the and\n{}",
                    (0..60)
                        .map(|i| {
                            let end = if i % 2 == 0 { "..." } else { "" };
                            format!("line{i} went{i} home{i} after{i} dinner{i} then{end}")
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
                Some(Rule::EllipsisLines),
            ),
            (
                "numbers",
                format!(
                    "{} {}",
                    distinct(50),
                    (0..30)
                        .map(|i| format!("{}", 1000 + i))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                Some(Rule::AlphaWords),
            ),
            (
                "no stop words",
                (0..60)
                    .map(|i| format!("word{i}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                Some(Rule::StopWords),
            ),
            (
                "repeated lines",
                format!(
                    "the and\n{}",
                    (0..60)
                        .map(|i| if i % 2 == 0 {
                            "same line again".to_string()
                        } else {
                            format!("other{i} line{i} here{i}")
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
                Some(Rule::DupLines),
            ),
            (
                "repeated long lines",
                {
                    let long =
                        "this one long line repeats itself verbatim across the document body";
                    let mut lines: Vec<String> = (0..6)
                        .map(|j| {
                            (0..10)
                                .map(|i| format!("word{j}x{i}"))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .collect();
                    lines[0].push_str(" the and");
                    lines.extend(std::iter::repeat_n(long.to_string(), 4));
                    lines.join("\n")
                },
                Some(Rule::DupLineChars),
            ),
            (
                "repeated phrase",
                format!("{} {}", distinct(60), "spam eggs ".repeat(30)),
                Some(Rule::TopNgram),
            ),
            (
                "repeated sentence",
                format!("{} {}", distinct(80), [sentence; 4].join(" ")),
                Some(Rule::DupNgram),
            ),
            ("distinct", distinct(60), None),
        ];
        for (what, text, want) in cases {
            assert_eq!(check(&text, &c), want, "{what}: {text:?}");
        }
        // A rule switched off lets its documents through to the next rule.
        let off = FilterConfig {
            min_words: None,
            ..c.clone()
        };
        assert_eq!(check("the cat and a dog", &off), Some(Rule::MinMeanWordLen));
        assert_eq!(check("the cat and a dog", &c), Some(Rule::MinWords));
        let none = FilterConfig {
            max_dup_ngram_char_fraction: vec![],
            ..c.clone()
        };
        assert_eq!(
            check(
                &format!("{} {}", distinct(80), [sentence; 4].join(" ")),
                &none
            ),
            None
        );
    }

    #[test]
    fn repetition_helpers_match_datatrove() {
        let words = Words::new(&"a b c a b c a b".split(' ').collect::<Vec<_>>());
        // 2-grams: "a b" x3 (the most frequent), len("a b") = 3 → 9.
        assert_eq!(top_ngram_chars(&words, 2), 9);
        // 3-grams: abc (seen), bca, cab, then "abc" repeats at 3 (+3 chars, skip to 6):
        // "ab" is too short for another 3-gram.
        assert_eq!(duplicate_ngram_chars(&words, 3), 3);
        assert_eq!(duplicate_ngram_chars(&words, 9), 0);
        assert_eq!(duplicate_lines(&["x", "y", "x", "", ""]), (1, 1));
    }
}
