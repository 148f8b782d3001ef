//! From generated token ids to the text a client sees: pieces as soon as they are final,
//! stop strings found across tokens and cut, end-of-sequence tokens and the token limit.
//! Sans IO: the single-process generation loop and the cluster's origin both feed it.

use exo_core::FinishReason;

use crate::error::Result;
use crate::tokenizer::{TextStream, Tokenizer};

/// What one generated token gave.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Decoded {
    /// Text that is now final (possibly empty).
    pub text: String,
    /// Set when the generation is over, with why.
    pub finished: Option<FinishReason>,
}

/// Turns one generation's tokens into text. Feed every generated token to [`Detokenizer::push`]
/// until it says the generation is finished.
#[derive(Debug)]
pub struct Detokenizer<'a> {
    text: TextStream<'a>,
    stops: StopScanner,
    eos: &'a [u32],
    ignore_eos: bool,
    max_tokens: usize,
    generated: usize,
    finished: Option<FinishReason>,
}

impl<'a> Detokenizer<'a> {
    /// A detokenizer for a generation of at most `max_tokens` tokens that ends at any of
    /// `eos` (unless `ignore_eos`) and before any of `stops`.
    pub fn new(
        tokenizer: &'a Tokenizer,
        eos: &'a [u32],
        stops: &[String],
        ignore_eos: bool,
        max_tokens: usize,
    ) -> Self {
        Detokenizer {
            text: tokenizer.stream(),
            stops: StopScanner::new(stops),
            eos,
            ignore_eos,
            max_tokens,
            generated: 0,
            finished: (max_tokens == 0).then_some(FinishReason::Length),
        }
    }

    /// Adds the next generated token.
    ///
    /// After it reports the generation finished, further tokens are ignored (the caller
    /// should have stopped).
    pub fn push(&mut self, token: u32) -> Result<Decoded> {
        if let Some(reason) = self.finished {
            return Ok(Decoded {
                text: String::new(),
                finished: Some(reason),
            });
        }
        self.generated += 1;
        let mut out = Decoded::default();
        if !self.ignore_eos && self.eos.contains(&token) {
            // Text held back for a stop string that can no longer come is final now.
            out.text = self.stops.flush();
            return Ok(self.finish(out, FinishReason::Stop));
        }
        let piece = self.text.push(token)?;
        let (text, stopped) = self.stops.push(&piece);
        out.text = text;
        if stopped {
            return Ok(self.finish(out, FinishReason::Stop));
        }
        if self.generated >= self.max_tokens {
            out.text.push_str(&self.stops.flush());
            return Ok(self.finish(out, FinishReason::Length));
        }
        Ok(out)
    }

    /// Ends the generation early because the model's context is full: like the token limit.
    pub fn context_full(&mut self) -> Decoded {
        if let Some(reason) = self.finished {
            return Decoded {
                text: String::new(),
                finished: Some(reason),
            };
        }
        let text = self.stops.flush();
        self.finish(
            Decoded {
                text,
                finished: None,
            },
            FinishReason::Length,
        )
    }

    /// Why the generation ended, once it has.
    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Tokens pushed so far (the last one included).
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// All text released so far.
    pub fn emitted(&self) -> &str {
        &self.stops.emitted
    }

    fn finish(&mut self, mut out: Decoded, reason: FinishReason) -> Decoded {
        self.finished = Some(reason);
        out.finished = Some(reason);
        out
    }
}

/// Holds back text that might be the start of a stop string, and finds stop strings that span
/// several tokens.
#[derive(Debug)]
struct StopScanner {
    stops: Vec<String>,
    pending: String,
    emitted: String,
}

impl StopScanner {
    fn new(stops: &[String]) -> Self {
        StopScanner {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
            emitted: String::new(),
        }
    }

    /// Adds a piece; returns what is safe to release and whether a stop string was found.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            self.pending.truncate(at);
            return (self.flush(), true);
        }
        // Keep the longest tail that could still grow into a stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.pending.len() + 1))
                    .rev()
                    .find(|&n| {
                        let at = self.pending.len() - n;
                        self.pending.is_char_boundary(at) && s.starts_with(&self.pending[at..])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let text: String = self.pending.drain(..cut).collect();
        self.emitted.push_str(&text);
        (text, false)
    }

    /// Releases what was held back.
    fn flush(&mut self) -> String {
        let text = std::mem::take(&mut self.pending);
        self.emitted.push_str(&text);
        text
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn scan(stops: &[&str], pieces: &[&str]) -> (String, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut scanner = StopScanner::new(&stops);
        let mut streamed = String::new();
        let mut stopped = false;
        for p in pieces {
            let (text, hit) = scanner.push(p);
            streamed.push_str(&text);
            if hit {
                stopped = true;
                break;
            }
        }
        if !stopped {
            streamed.push_str(&scanner.flush());
        }
        (scanner.emitted, stopped, streamed)
    }

    #[test]
    fn a_stop_string_across_pieces_is_found_and_cut() {
        let (text, stopped, streamed) = scan(&["\n\n"], &["Paris", ".", "\n", "\nNext"]);
        assert!(stopped);
        assert_eq!(text, "Paris.");
        assert_eq!(streamed, "Paris.");
    }

    #[test]
    fn a_partial_match_that_fails_is_released() {
        let (text, stopped, _) = scan(&["END"], &["the E", "ND", "x"]);
        assert!(stopped);
        assert_eq!(text, "the ");
        let (text, stopped, streamed) = scan(&["END"], &["the E", "nd"]);
        assert!(!stopped);
        assert_eq!(text, "the End");
        assert_eq!(streamed, "the End");
    }

    #[test]
    fn multibyte_text_is_never_split() {
        let (text, stopped, _) = scan(&["é!"], &["caf", "é", "é", "!"]);
        assert!(stopped);
        assert_eq!(text, "café");
    }

    /// The byte-level tokenizer of the tiny test model (printable characters, no space).
    fn tokenizer() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::testing::write_gguf(&path, &crate::testing::tiny_config(1), 1).unwrap();
        crate::Checkpoint::open(&path).unwrap().tokenizer().unwrap()
    }

    /// Every token of `text` through a detokenizer; the pieces and how it ended.
    fn run(
        tokenizer: &Tokenizer,
        text: &str,
        stops: &[&str],
        eos: &[u32],
        max: usize,
    ) -> (String, Option<FinishReason>, usize) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut d = Detokenizer::new(tokenizer, eos, &stops, false, max);
        let mut out = String::new();
        for id in tokenizer.encode(text).unwrap() {
            let step = d.push(id).unwrap();
            out.push_str(&step.text);
            if step.finished.is_some() {
                break;
            }
        }
        (out, d.finished(), d.generated())
    }

    #[test]
    fn text_comes_out_whole_and_limits_end_it() {
        let t = tokenizer();
        let text = "hello,world;hello,there";
        let ids = t.encode(text).unwrap();
        let (out, finished, n) = run(&t, text, &[], &[], 1000);
        assert_eq!(out, t.decode(&ids).unwrap());
        assert_eq!((finished, n), (None, ids.len()));

        let (out, finished, n) = run(&t, text, &[], &[], 2);
        assert_eq!((finished, n), (Some(FinishReason::Length), 2));
        assert_eq!(out, t.decode(&ids[..2]).unwrap());

        let (out, finished, _) = run(&t, text, &[";h"], &[], 1000);
        assert_eq!(finished, Some(FinishReason::Stop));
        assert_eq!(out, "hello,world");
    }

    #[test]
    fn end_of_sequence_ends_and_releases_held_back_text() {
        let t = tokenizer();
        let ids = t.encode("hello,world").unwrap();
        let eos = [ids[ids.len() - 1]];
        // "hello,worl" could start the stop string "hello,world!", so it is held until the
        // end-of-sequence token comes instead of the rest.
        let stops = vec!["hello,worl!".to_owned()];
        let mut d = Detokenizer::new(&t, &eos, &stops, false, 100);
        let mut out = String::new();
        for &id in &ids[..ids.len() - 1] {
            out.push_str(&d.push(id).unwrap().text);
        }
        let last = d.push(eos[0]).unwrap();
        out.push_str(&last.text);
        assert_eq!(last.finished, Some(FinishReason::Stop));
        assert_eq!(out, t.decode(&ids[..ids.len() - 1]).unwrap());
        assert_eq!(d.emitted(), out);
    }
}
