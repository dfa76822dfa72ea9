//! Tokenizers: bytes, characters (nanoGPT's shakespeare_char) and GPT-2 BPE.
//!
//! A [`Tokenizer`] is described by a serialisable [`TokenizerSpec`], which a checkpoint
//! stores so the exact tokenizer can be rebuilt without the corpus.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

use crate::error::DataError;

/// Vocabulary size of the GPT-2 tokenizer (50 000 merges, 256 bytes, `<|endoftext|>`).
pub const GPT2_VOCAB_SIZE: usize = 50257;

/// Which tokenizer to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per UTF-8 byte; vocabulary 256.
    Bytes,
    /// One token per character; vocabulary = the sorted set of the corpus's characters.
    Char,
    /// GPT-2 byte-level BPE (tiktoken `r50k_base`); vocabulary 50257.
    Gpt2,
}

impl TokenizerKind {
    /// Every kind, in the order they are listed to users.
    pub const ALL: [TokenizerKind; 3] = [
        TokenizerKind::Bytes,
        TokenizerKind::Char,
        TokenizerKind::Gpt2,
    ];

    /// The lower-case name, as accepted by [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            TokenizerKind::Bytes => "bytes",
            TokenizerKind::Char => "char",
            TokenizerKind::Gpt2 => "gpt2",
        }
    }
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TokenizerKind {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TokenizerKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| DataError::UnknownTokenizer {
                name: s.to_string(),
            })
    }
}

/// Everything needed to rebuild a [`Tokenizer`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    /// The tokenizer kind.
    pub kind: TokenizerKind,
    /// For [`TokenizerKind::Char`]: the vocabulary, one character per id in id order.
    /// `None` for the other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chars: Option<String>,
}

/// Turns text into token ids and back.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Bytes,
    Char {
        chars: Vec<char>,
        ids: HashMap<char, u32>,
    },
    Gpt2(&'static CoreBPE),
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind())
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Builds a tokenizer of `kind` for `corpus_text`.
    ///
    /// Only [`TokenizerKind::Char`] looks at the text: its vocabulary is the sorted set of
    /// the text's characters, as nanoGPT's `shakespeare_char/prepare.py` does.
    pub fn build(kind: TokenizerKind, corpus_text: &str) -> Result<Self, DataError> {
        let inner = match kind {
            TokenizerKind::Bytes => Inner::Bytes,
            TokenizerKind::Char => {
                let mut chars: Vec<char> = corpus_text.chars().collect();
                chars.sort_unstable();
                chars.dedup();
                if chars.is_empty() {
                    return Err(DataError::Empty {
                        what: "the text given to the char tokenizer".into(),
                    });
                }
                char_inner(chars)
            }
            TokenizerKind::Gpt2 => Inner::Gpt2(gpt2()?),
        };
        Ok(Tokenizer { inner })
    }

    /// Rebuilds a tokenizer from its [`TokenizerSpec`] (as stored in a checkpoint).
    pub fn from_spec(spec: &TokenizerSpec) -> Result<Self, DataError> {
        let inner = match (spec.kind, &spec.chars) {
            (TokenizerKind::Char, Some(chars)) => {
                let chars: Vec<char> = chars.chars().collect();
                if chars.is_empty() {
                    return Err(DataError::InvalidSpec {
                        reason: "char tokenizer with an empty vocabulary".into(),
                    });
                }
                if chars.len() > u32::MAX as usize {
                    return Err(DataError::InvalidSpec {
                        reason: "char vocabulary too large".into(),
                    });
                }
                let inner = char_inner(chars);
                if let Inner::Char { chars, ids } = &inner {
                    if ids.len() != chars.len() {
                        return Err(DataError::InvalidSpec {
                            reason: "char tokenizer vocabulary repeats a character".into(),
                        });
                    }
                }
                inner
            }
            (TokenizerKind::Char, None) => {
                return Err(DataError::InvalidSpec {
                    reason: "char tokenizer without its `chars` vocabulary".into(),
                })
            }
            (kind, Some(_)) => {
                return Err(DataError::InvalidSpec {
                    reason: format!("{kind} tokenizer with a `chars` vocabulary"),
                })
            }
            (TokenizerKind::Bytes, None) => Inner::Bytes,
            (TokenizerKind::Gpt2, None) => Inner::Gpt2(gpt2()?),
        };
        Ok(Tokenizer { inner })
    }

    /// The spec that rebuilds this tokenizer with [`Tokenizer::from_spec`].
    pub fn spec(&self) -> TokenizerSpec {
        let chars = match &self.inner {
            Inner::Char { chars, .. } => Some(chars.iter().collect()),
            _ => None,
        };
        TokenizerSpec {
            kind: self.kind(),
            chars,
        }
    }

    /// The tokenizer kind.
    pub fn kind(&self) -> TokenizerKind {
        match self.inner {
            Inner::Bytes => TokenizerKind::Bytes,
            Inner::Char { .. } => TokenizerKind::Char,
            Inner::Gpt2(_) => TokenizerKind::Gpt2,
        }
    }

    /// Number of distinct token ids: 256 for bytes, the vocabulary length for char, 50257
    /// for gpt2. Every id this tokenizer produces is below it.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Bytes => 256,
            Inner::Char { chars, .. } => chars.len(),
            Inner::Gpt2(_) => GPT2_VOCAB_SIZE,
        }
    }

    /// Encodes text. GPT-2 encodes it as ordinary text: `<|endoftext|>` in the text is not
    /// treated as a special token.
    ///
    /// Errors: [`DataError::UnknownChar`] for a character outside a char vocabulary.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match &self.inner {
            Inner::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Inner::Char { chars, ids } => text
                .char_indices()
                .map(|(offset, ch)| {
                    ids.get(&ch).copied().ok_or(DataError::UnknownChar {
                        ch,
                        offset,
                        vocab_size: chars.len(),
                    })
                })
                .collect(),
            Inner::Gpt2(bpe) => Ok(bpe.encode_ordinary(text)),
        }
    }

    /// The bytes of one token id (bytes: the byte itself; char: the character's UTF-8;
    /// gpt2: the token's bytes, `<|endoftext|>` included), `None` outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        match &self.inner {
            Inner::Bytes => u8::try_from(id).ok().map(|b| vec![b]),
            Inner::Char { chars, .. } => chars.get(id as usize).map(|c| c.to_string().into_bytes()),
            Inner::Gpt2(bpe) => bpe.decode_bytes(&[id]).ok(),
        }
    }

    /// Decodes token ids. Lossy: ids outside the vocabulary, and byte sequences that are not
    /// valid UTF-8 (a bytes or gpt2 sequence cut mid-character), become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.inner {
            Inner::Bytes => decode_lossy(ids, |id| u8::try_from(id).ok().map(|b| vec![b])),
            Inner::Char { chars, .. } => ids
                .iter()
                .map(|&id| {
                    chars
                        .get(id as usize)
                        .copied()
                        .unwrap_or(char::REPLACEMENT_CHARACTER)
                })
                .collect(),
            Inner::Gpt2(bpe) => match bpe.decode_bytes(ids) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(_) => decode_lossy(ids, |id| bpe.decode_bytes(&[id]).ok()),
            },
        }
    }
}

fn char_inner(chars: Vec<char>) -> Inner {
    let ids = chars
        .iter()
        .enumerate()
        .map(|(i, &c)| (c, i as u32))
        .collect();
    Inner::Char { chars, ids }
}

/// The shared GPT-2 BPE tables, built once per process from tiktoken's embedded ranks.
fn gpt2() -> Result<&'static CoreBPE, DataError> {
    static GPT2: OnceLock<Result<CoreBPE, String>> = OnceLock::new();
    GPT2.get_or_init(|| tiktoken_rs::r50k_base().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|reason| DataError::Gpt2 {
            reason: reason.clone(),
        })
}

/// Decode id by id: the bytes of known ids are joined and read as UTF-8 (lossily), and
/// an id with no bytes (unknown to the vocabulary) becomes U+FFFD.
fn decode_lossy(ids: &[u32], bytes_of: impl Fn(u32) -> Option<Vec<u8>>) -> String {
    let mut out = String::new();
    let mut bytes = Vec::with_capacity(ids.len());
    for &id in ids {
        match bytes_of(id) {
            Some(b) => bytes.extend(b),
            None => {
                out.push_str(&String::from_utf8_lossy(&bytes));
                bytes.clear();
                out.push(char::REPLACEMENT_CHARACTER);
            }
        }
    }
    out.push_str(&String::from_utf8_lossy(&bytes));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let corpus = "First Citizen:\nBefore we proceed any further, hear me speak. é€😀 ÿ";
        let cases: &[(TokenizerKind, &str, Option<&[u32]>)] = &[
            (TokenizerKind::Bytes, "abc", Some(&[97, 98, 99])),
            (
                TokenizerKind::Bytes,
                "é€😀",
                Some(&[0xc3, 0xa9, 0xe2, 0x82, 0xac, 0xf0, 0x9f, 0x98, 0x80]),
            ),
            (TokenizerKind::Bytes, "", Some(&[])),
            (TokenizerKind::Char, "", Some(&[])),
            (TokenizerKind::Char, "\n ", Some(&[0, 1])),
            (TokenizerKind::Char, "hear me speak", None),
            (TokenizerKind::Char, "é€😀ÿ", None),
            (TokenizerKind::Gpt2, "Hello world", Some(&[15496, 995])),
            (TokenizerKind::Gpt2, "", Some(&[])),
            (
                TokenizerKind::Gpt2,
                "fn main() {\n    println!(\"é€😀\");\n}\n",
                None,
            ),
            (TokenizerKind::Gpt2, "<|endoftext|>", None),
        ];
        for &(kind, text, want) in cases {
            let tok = Tokenizer::build(kind, corpus).unwrap();
            assert_eq!(tok.kind(), kind);
            let ids = tok.encode(text).unwrap();
            if let Some(want) = want {
                assert_eq!(ids, want, "{kind} {text:?}");
            }
            assert!(
                ids.iter().all(|&id| (id as usize) < tok.vocab_size()),
                "{kind} {text:?}"
            );
            assert_eq!(tok.decode(&ids), text, "{kind} {text:?}");
            // The spec rebuilds the same tokenizer, also after a trip through JSON.
            let spec: TokenizerSpec =
                serde_json::from_str(&serde_json::to_string(&tok.spec()).unwrap()).unwrap();
            assert_eq!(spec, tok.spec());
            let rebuilt = Tokenizer::from_spec(&spec).unwrap();
            assert_eq!(rebuilt.encode(text).unwrap(), ids, "{kind} {text:?}");
            assert_eq!(rebuilt.vocab_size(), tok.vocab_size());
        }
    }

    #[test]
    fn vocab_sizes() {
        let text = "hello";
        for (kind, want) in [
            (TokenizerKind::Bytes, 256),
            (TokenizerKind::Char, 4),
            (TokenizerKind::Gpt2, 50257),
        ] {
            assert_eq!(
                Tokenizer::build(kind, text).unwrap().vocab_size(),
                want,
                "{kind}"
            );
        }
        let spec = Tokenizer::build(TokenizerKind::Char, "hello")
            .unwrap()
            .spec();
        assert_eq!(
            spec,
            TokenizerSpec {
                kind: TokenizerKind::Char,
                chars: Some("ehlo".into())
            }
        );
        assert_eq!(
            serde_json::to_string(&spec).unwrap(),
            r#"{"kind":"char","chars":"ehlo"}"#
        );
        let bytes = Tokenizer::build(TokenizerKind::Bytes, text).unwrap().spec();
        assert_eq!(
            serde_json::to_string(&bytes).unwrap(),
            r#"{"kind":"bytes"}"#
        );
    }

    #[test]
    fn char_unknown_character_is_named() {
        let tok = Tokenizer::build(TokenizerKind::Char, "abc").unwrap();
        let err = tok.encode("abxc").unwrap_err();
        assert!(
            matches!(
                err,
                DataError::UnknownChar {
                    ch: 'x',
                    offset: 2,
                    vocab_size: 3
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("'x'"), "{err}");
        assert!(matches!(
            Tokenizer::build(TokenizerKind::Char, ""),
            Err(DataError::Empty { .. })
        ));
    }

    #[test]
    fn decode_is_lossy() {
        let bytes = Tokenizer::build(TokenizerKind::Bytes, "").unwrap();
        assert_eq!(bytes.decode(&[0xc3]), "\u{fffd}");
        assert_eq!(bytes.decode(&[104, 1000, 105]), "h\u{fffd}i");
        let chars = Tokenizer::build(TokenizerKind::Char, "ab").unwrap();
        assert_eq!(chars.decode(&[1, 7, 0]), "b\u{fffd}a");
        let gpt2 = Tokenizer::build(TokenizerKind::Gpt2, "").unwrap();
        assert_eq!(gpt2.decode(&[15496, 999_999, 995]), "Hello\u{fffd} world");
    }

    #[test]
    fn kind_parse_and_display() {
        for kind in TokenizerKind::ALL {
            assert_eq!(kind.to_string().parse::<TokenizerKind>().unwrap(), kind);
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{kind}\""));
        }
        let err = "bpe".parse::<TokenizerKind>().unwrap_err();
        assert!(matches!(&err, DataError::UnknownTokenizer { name } if name == "bpe"));
        let msg = err.to_string();
        assert!(
            msg.contains("\"bpe\"") && msg.contains("bytes, char, gpt2"),
            "{msg}"
        );
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let bad = [
            TokenizerSpec {
                kind: TokenizerKind::Char,
                chars: None,
            },
            TokenizerSpec {
                kind: TokenizerKind::Char,
                chars: Some(String::new()),
            },
            TokenizerSpec {
                kind: TokenizerKind::Char,
                chars: Some("aba".into()),
            },
            TokenizerSpec {
                kind: TokenizerKind::Bytes,
                chars: Some("ab".into()),
            },
        ];
        for spec in bad {
            assert!(
                matches!(
                    Tokenizer::from_spec(&spec),
                    Err(DataError::InvalidSpec { .. })
                ),
                "{spec:?}"
            );
        }
    }
}
