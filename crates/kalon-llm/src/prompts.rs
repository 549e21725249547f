//! The prompts Kalon sends and the robust parsing of what comes back.
//!
//! Every task asks for one small JSON object; parsing accepts what real
//! models do instead (code fences, prose around the object, a bare answer
//! line) and refuses what cannot be trusted (refusals, empty or overlong
//! text, missing keys). A refused answer is retried once with the strict
//! form of the prompt, which adds an explicit "JSON only" instruction.

use base64::Engine;

use crate::protocol::{ImageUrl, Message, Part};
use crate::rephrase::PromptVariant;

/// Why a model's answer could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed model output: {0}")]
pub struct ParseError(pub String);

const STRICT: &str =
    "Reply with ONLY that JSON object on one line: no prose, no code fences, no explanation.";

const LONGEST_REPHRASING: usize = 500;

/// One line of text, whitespace collapsed (queries go into line-based prompts).
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn instruction(variant: PromptVariant) -> &'static str {
    match variant {
        PromptVariant::Original => "Return the query unchanged.",
        PromptVariant::Detail => {
            "Add the visual details a beautiful, well-made result would have \
             (light, sharpness, colour, composition, style)."
        }
        PromptVariant::KList => {
            "After the query, list the 2 to 4 qualities a beautiful result must have, \
             as `<query>: 1. <quality> 2. <quality>`."
        }
        PromptVariant::KwDict => {
            "Write a keyword dictionary: `subject: <query>; quality: <quality>, <quality>`."
        }
        PromptVariant::Repeat => "Repeat the query twice, separated by a space.",
        PromptVariant::Reorg => {
            "Rewrite the query as one fluent phrase that states what would make the \
             result beautiful."
        }
    }
}

/// The chat messages asking for `variant` of `query`.
pub fn rephrase_messages(query: &str, variant: PromptVariant, strict: bool) -> Vec<Message> {
    let user = with_strict(
        format!(
            "Task: rephrase\nVariant: {}\nInstruction: {}\nQuery: {}\n\
             Answer with a JSON object {{\"rephrasing\": \"<text>\"}}.",
            variant.name(),
            instruction(variant),
            one_line(query)
        ),
        strict,
    );
    vec![
        Message::system(
            "You rewrite image-search queries so that a search engine returns the pictures \
             people find most beautiful, keeping what the query asks for.",
        ),
        Message::user(user),
    ]
}

/// Strips a Markdown code fence around the whole answer, if any.
fn unfence(text: &str) -> &str {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix("```") {
        let rest = rest.split_once('\n').map_or("", |(_, body)| body);
        return rest.trim_end().strip_suffix("```").unwrap_or(rest).trim();
    }
    text
}

/// The first balanced JSON value (object or array) inside `text`.
fn find_json(text: &str) -> Option<serde_json::Value> {
    let text = unfence(text);
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        if value.is_object() || value.is_array() {
            return Some(value);
        }
    }
    for (start, open) in text.char_indices().filter(|(_, c)| *c == '{' || *c == '[') {
        let close = if open == '{' { '}' } else { ']' };
        for (end, _) in text[start..].char_indices().filter(|(_, c)| *c == close) {
            if let Ok(value) = serde_json::from_str(&text[start..start + end + 1]) {
                return Some(value);
            }
        }
    }
    None
}

fn refusal(text: &str) -> bool {
    let lower = text.to_lowercase();
    ["i'm sorry", "i am sorry", "i cannot", "i can't", "as an ai"]
        .iter()
        .any(|m| lower.contains(m))
}

fn strings(value: &serde_json::Value) -> Option<Vec<String>> {
    match value {
        serde_json::Value::String(s) => Some(vec![s.trim().to_owned()]),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(|s| s.trim().to_owned()))
            .collect(),
        _ => None,
    }
}

fn k_list(query: &str, qualities: &[String]) -> String {
    let items: Vec<String> = qualities
        .iter()
        .enumerate()
        .map(|(i, q)| format!("{}. {q}", i + 1))
        .collect();
    format!("{query}: {}", items.join(" "))
}

/// The rephrasing in a model's answer to [`rephrase_messages`].
pub fn parse_rephrasing(
    query: &str,
    variant: PromptVariant,
    content: &str,
) -> Result<String, ParseError> {
    let query = one_line(query);
    if refusal(content) {
        return Err(ParseError(format!("a refusal: {:?}", one_line(content))));
    }
    let text = match find_json(content) {
        Some(serde_json::Value::Object(map)) => {
            let direct = ["rephrasing", "rephrased", "query", "text"]
                .iter()
                .find_map(|k| map.get(*k).and_then(|v| v.as_str()));
            if let Some(text) = direct {
                text.to_owned()
            } else if let Some(list) = ["qualities", "list", "quality"]
                .iter()
                .find_map(|k| map.get(*k).and_then(strings))
                .filter(|_| variant == PromptVariant::KList)
            {
                k_list(&query, &list)
            } else if variant == PromptVariant::KwDict && !map.is_empty() {
                let mut fields = Vec::new();
                // the subject first, then the rest (serde_json's map is sorted)
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by_key(|(key, _)| key.as_str() != "subject");
                for (key, value) in entries {
                    let values = strings(value)
                        .ok_or_else(|| ParseError(format!("field {key:?} is not text")))?;
                    fields.push(format!("{key}: {}", values.join(", ")));
                }
                fields.join("; ")
            } else {
                let keys: Vec<&String> = map.keys().collect();
                return Err(ParseError(format!(
                    "JSON object without a \"rephrasing\" field (keys {keys:?})"
                )));
            }
        }
        Some(array @ serde_json::Value::Array(_)) if variant == PromptVariant::KList => {
            let list =
                strings(&array).ok_or_else(|| ParseError("a list that is not all text".into()))?;
            k_list(&query, &list)
        }
        Some(other) => return Err(ParseError(format!("unexpected JSON {other}"))),
        None => {
            // a bare answer: one line, perhaps labelled and quoted
            let body = unfence(content);
            let lines: Vec<&str> = body.lines().filter(|l| !l.trim().is_empty()).collect();
            if lines.len() != 1 {
                return Err(ParseError(format!(
                    "no JSON object and {} lines of prose",
                    lines.len()
                )));
            }
            let line = lines[0].trim();
            let line = line
                .split_once(':')
                .filter(|(label, _)| label.to_lowercase().contains("rephras"))
                .map_or(line, |(_, rest)| rest);
            line.trim()
                .trim_matches(|c| c == '"' || c == '\'')
                .to_owned()
        }
    };
    let text = one_line(&text);
    if text.is_empty() {
        return Err(ParseError("empty rephrasing".into()));
    }
    if text.len() > LONGEST_REPHRASING {
        return Err(ParseError(format!(
            "rephrasing of {} bytes, more than {LONGEST_REPHRASING}",
            text.len()
        )));
    }
    Ok(text)
}

/// The two aspects HPIR labels and the judge compares: Kalon's one aspect
/// type, from `kalon-events` (ratings and judgments share it).
pub use kalon_events::Aspect;

/// The aspect's name in HPIR and in the judge's prompts: `accuracy` for
/// [`Aspect::Relevance`], `aesthetic`. The prompts keep HPIR's word, so what
/// the judge is asked (and what the simulated endpoint reads from it) stays
/// the same; events and the database say `relevance`.
pub fn hpir_name(aspect: Aspect) -> &'static str {
    match aspect {
        Aspect::Relevance => "accuracy",
        Aspect::Aesthetic => "aesthetic",
    }
}

fn criterion(aspect: Aspect) -> &'static str {
    match aspect {
        Aspect::Relevance => "how well the images show what the query asks for",
        Aspect::Aesthetic => {
            "how beautiful the images are as answers to this query: light, colour, \
             composition, style"
        }
    }
}

/// An image shown to the judge: by URL, or as PNG bytes sent inline.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageRef {
    Url(String),
    Png(Vec<u8>),
}

impl ImageRef {
    pub fn part(&self) -> Part {
        let url = match self {
            ImageRef::Url(url) => url.clone(),
            ImageRef::Png(bytes) => format!(
                "data:image/png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(bytes)
            ),
        };
        Part::ImageUrl {
            image_url: ImageUrl {
                url,
                detail: Some("low".into()),
            },
        }
    }
}

fn rows_prompt(
    task: &str,
    query: &str,
    aspect: Aspect,
    first: &[ImageRef],
    second: &[ImageRef],
    question: &str,
    strict: bool,
) -> Vec<Message> {
    let mut parts = vec![Part::text(format!(
        "Task: {task}\nAspect: {}\nCriterion: {}\nQuery: {}\nRow 1:",
        hpir_name(aspect),
        criterion(aspect),
        one_line(query)
    ))];
    parts.extend(first.iter().map(ImageRef::part));
    parts.push(Part::text("Row 2:"));
    parts.extend(second.iter().map(ImageRef::part));
    judge_messages(parts, question, strict)
}

/// The judge's messages: `parts`, then `question` (in its strict form when
/// asked).
fn judge_messages(mut parts: Vec<Part>, question: &str, strict: bool) -> Vec<Message> {
    parts.push(Part::text(with_strict(question.to_owned(), strict)));
    vec![
        Message::system("You judge image search results the way people would."),
        Message::user_parts(parts),
    ]
}

/// `text`, plus the "JSON only" instruction of a strict retry.
fn with_strict(mut text: String, strict: bool) -> String {
    if strict {
        text.push('\n');
        text.push_str(STRICT);
    }
    text
}

/// "Which row is better on `aspect`?", rows in the order given.
pub fn compare_messages(
    query: &str,
    aspect: Aspect,
    first: &[ImageRef],
    second: &[ImageRef],
    strict: bool,
) -> Vec<Message> {
    let question = format!(
        "Which row is better on {}? Answer with a JSON object {{\"better\": 1}} or {{\"better\": 2}}.",
        hpir_name(aspect)
    );
    rows_prompt("compare", query, aspect, first, second, &question, strict)
}

/// "Rate each row from 1 to 5 on `aspect`" (cp-scorer style).
pub fn score_messages(
    query: &str,
    aspect: Aspect,
    first: &[ImageRef],
    second: &[ImageRef],
    strict: bool,
) -> Vec<Message> {
    let question = format!(
        "Rate each row from 1 (poor) to 5 (excellent) on {}. Answer with a JSON object \
         {{\"row1\": <1-5>, \"row2\": <1-5>}}.",
        hpir_name(aspect)
    );
    rows_prompt("score", query, aspect, first, second, &question, strict)
}

/// "Rank these images on `aspect`, best first".
pub fn rank_messages(
    query: &str,
    aspect: Aspect,
    images: &[ImageRef],
    strict: bool,
) -> Vec<Message> {
    let mut parts = vec![Part::text(format!(
        "Task: rank\nAspect: {}\nCriterion: {}\nQuery: {}\nImages:",
        hpir_name(aspect),
        criterion(aspect),
        one_line(query)
    ))];
    for (i, image) in images.iter().enumerate() {
        parts.push(Part::text(format!("Image {}:", i + 1)));
        parts.push(image.part());
    }
    let question = format!(
        "Order all {} images from best to worst on {}. Answer with a JSON object \
         {{\"order\": [<image numbers, best first>]}}.",
        images.len(),
        hpir_name(aspect)
    );
    judge_messages(parts, &question, strict)
}

/// The ranking in an answer to [`rank_messages`] over `n` images: 0-based
/// indices, best first, each exactly once.
pub fn parse_ranking(content: &str, n: usize) -> Result<Vec<usize>, ParseError> {
    if refusal(content) {
        return Err(ParseError(format!("a refusal: {:?}", one_line(content))));
    }
    let value = find_json(content)
        .ok_or_else(|| ParseError(format!("no JSON in {:?}", one_line(content))))?;
    let list = value.get("order").unwrap_or(&value);
    let numbers: Vec<u64> = list
        .as_array()
        .and_then(|items| items.iter().map(|v| v.as_u64()).collect())
        .ok_or_else(|| ParseError(format!("no list of image numbers in {value}")))?;
    let mut seen = vec![false; n];
    let mut order = Vec::with_capacity(n);
    for number in numbers {
        let i = (number as usize).wrapping_sub(1);
        if i >= n || seen[i] {
            return Err(ParseError(format!(
                "image number {number} is out of 1..={n} or repeated"
            )));
        }
        seen[i] = true;
        order.push(i);
    }
    if order.len() != n {
        return Err(ParseError(format!("{} of {n} images ranked", order.len())));
    }
    Ok(order)
}

/// Which of the two rows shown the model picked: 1 or 2.
pub fn parse_choice(content: &str) -> Result<u8, ParseError> {
    if refusal(content) {
        return Err(ParseError(format!("a refusal: {:?}", one_line(content))));
    }
    let from_value = |v: &serde_json::Value| -> Option<u8> {
        match v {
            serde_json::Value::Number(n) => n.as_u64().and_then(|n| u8::try_from(n).ok()),
            serde_json::Value::String(s) => choice_word(s),
            _ => None,
        }
        .filter(|n| *n == 1 || *n == 2)
    };
    if let Some(value) = find_json(content) {
        return value
            .get("better")
            .or_else(|| value.get("row"))
            .and_then(from_value)
            .ok_or_else(|| ParseError(format!("no \"better\": 1 or 2 in {value}")));
    }
    choice_word(content).ok_or_else(|| {
        ParseError(format!(
            "cannot tell which row was picked from {:?}",
            one_line(content)
        ))
    })
}

/// "1", "row 2", "Row 1 is better", "first", "the second row" -> 1 or 2.
fn choice_word(text: &str) -> Option<u8> {
    let lower = one_line(&text.to_lowercase());
    let lower = lower.trim_matches(|c: char| !c.is_alphanumeric());
    match lower {
        "1" | "first" => return Some(1),
        "2" | "second" => return Some(2),
        _ => {}
    }
    let one = lower.contains("row 1") || lower.contains("first row");
    let two = lower.contains("row 2") || lower.contains("second row");
    match (one, two) {
        (true, false) => Some(1),
        (false, true) => Some(2),
        _ => None,
    }
}

/// The two 1-5 scores in a model's answer to [`score_messages`].
pub fn parse_scores(content: &str) -> Result<(f64, f64), ParseError> {
    if refusal(content) {
        return Err(ParseError(format!("a refusal: {:?}", one_line(content))));
    }
    let value = find_json(content)
        .ok_or_else(|| ParseError(format!("no JSON object in {:?}", one_line(content))))?;
    let score = |key: &str| -> Result<f64, ParseError> {
        let v = value
            .get(key)
            .and_then(|v| {
                v.as_f64()
                    .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            })
            .ok_or_else(|| ParseError(format!("no numeric {key:?} in {value}")))?;
        if (1.0..=5.0).contains(&v) {
            Ok(v)
        } else {
            Err(ParseError(format!("{key} = {v} is outside 1-5")))
        }
    };
    Ok((score("row1")?, score("row2")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(variant: PromptVariant, content: &str) -> Result<String, ParseError> {
        parse_rephrasing("red cat", variant, content)
    }

    #[test]
    fn every_variant_parses_from_json_fences_prose_and_bare_lines() {
        for variant in PromptVariant::ALL {
            let expected = format!("red cat, {}", variant.name());
            let json = format!("{{\"rephrasing\": \"{expected}\"}}");
            for content in [
                json.clone(),
                format!("```json\n{json}\n```"),
                format!("Sure! Here it is:\n{json}\nHope this helps."),
                format!("Rephrased query: \"{expected}\""),
                expected.clone(),
            ] {
                assert_eq!(
                    parse(variant, &content).unwrap(),
                    expected,
                    "{variant:?} {content}"
                );
            }
        }
        // the list and dictionary variants also accept their natural shapes
        assert_eq!(
            parse(PromptVariant::KList, r#"["sharp", "well lit"]"#).unwrap(),
            "red cat: 1. sharp 2. well lit"
        );
        assert_eq!(
            parse(PromptVariant::KList, r#"{"qualities": ["sharp", "calm"]}"#).unwrap(),
            "red cat: 1. sharp 2. calm"
        );
        assert_eq!(
            parse(
                PromptVariant::KwDict,
                r#"{"subject": "red cat", "quality": ["sharp", "calm"]}"#
            )
            .unwrap(),
            "subject: red cat; quality: sharp, calm"
        );
    }

    #[test]
    fn refusals_prose_empty_and_wrong_shapes_are_malformed() {
        for content in [
            "I'm sorry, I can't help with that.",
            "",
            "   ",
            "Here are some ideas.\nMaybe a red cat.\nOr a blue one.",
            r#"{"answer": "red cat"}"#,
            r#"{"rephrasing": ""}"#,
            "[1, 2]",
        ] {
            assert!(
                parse(PromptVariant::Detail, content).is_err(),
                "{content:?} should be refused"
            );
        }
        let long = format!("{{\"rephrasing\": \"{}\"}}", "x".repeat(600));
        assert!(parse(PromptVariant::Detail, &long).is_err());
    }

    #[test]
    fn choices_and_scores_parse_robustly() {
        for (content, want) in [
            (r#"{"better": 1}"#, 1),
            (r#"{"better": "2"}"#, 2),
            ("```json\n{\"better\": 2}\n```", 2),
            ("Row 1 is clearly better.", 1),
            ("2", 2),
            ("the second row", 2),
        ] {
            assert_eq!(parse_choice(content).unwrap(), want, "{content}");
        }
        for content in [
            r#"{"better": 3}"#,
            "both rows are fine",
            "row 1 or row 2",
            "I cannot judge",
        ] {
            assert!(parse_choice(content).is_err(), "{content}");
        }
        assert_eq!(
            parse_scores(r#"{"row1": 4, "row2": "2.5"}"#).unwrap(),
            (4.0, 2.5)
        );
        assert!(parse_scores(r#"{"row1": 7, "row2": 2}"#).is_err());
        assert!(parse_scores(r#"{"row1": 3}"#).is_err());
    }

    /// The judge's prompts, word for word as before the aspect type moved
    /// to kalon-events: relevance is still asked for as HPIR's "accuracy"
    /// (the simulated endpoint reads the aspect from this text, and draws
    /// its noise from the request's bytes).
    #[test]
    fn judge_prompts_name_the_aspects_as_hpir_does() {
        let texts = |messages: Vec<Message>| -> Vec<String> {
            let crate::protocol::Content::Parts(parts) = &messages[1].content else {
                panic!("parts")
            };
            parts
                .iter()
                .filter_map(|p| match p {
                    Part::Text { text } => Some(text.clone()),
                    Part::ImageUrl { .. } => None,
                })
                .collect()
        };
        let image = [ImageRef::Url("http://h/a.png".into())];
        let criteria = [
            (
                Aspect::Relevance,
                "accuracy",
                "how well the images show what the query asks for",
            ),
            (
                Aspect::Aesthetic,
                "aesthetic",
                "how beautiful the images are as answers to this query: light, colour, composition, style",
            ),
        ];
        for (aspect, name, criterion) in criteria {
            assert_eq!(hpir_name(aspect), name);
            let head = |task: &str, tail: &str| {
                format!("Task: {task}\nAspect: {name}\nCriterion: {criterion}\nQuery: q\n{tail}")
            };
            assert_eq!(
                texts(compare_messages("q", aspect, &image, &image, false)),
                [
                    head("compare", "Row 1:"),
                    "Row 2:".to_owned(),
                    format!("Which row is better on {name}? Answer with a JSON object {{\"better\": 1}} or {{\"better\": 2}}.")
                ]
            );
            assert_eq!(
                texts(score_messages("q", aspect, &image, &image, false)),
                [
                    head("score", "Row 1:"),
                    "Row 2:".to_owned(),
                    format!("Rate each row from 1 (poor) to 5 (excellent) on {name}. Answer with a JSON object {{\"row1\": <1-5>, \"row2\": <1-5>}}.")
                ]
            );
            assert_eq!(
                texts(rank_messages("q", aspect, &image, false)),
                [
                    head("rank", "Images:"),
                    "Image 1:".to_owned(),
                    format!("Order all 1 images from best to worst on {name}. Answer with a JSON object {{\"order\": [<image numbers, best first>]}}.")
                ]
            );
        }
    }

    #[test]
    fn prompts_carry_the_task_the_query_and_the_rows() {
        let messages = rephrase_messages("red\ncat", PromptVariant::KList, true);
        let crate::protocol::Content::Text(user) = &messages[1].content else {
            panic!("text prompt")
        };
        assert!(user.contains("Task: rephrase\nVariant: k-list"), "{user}");
        assert!(user.contains("Query: red cat\n"), "{user}");
        assert!(user.contains("ONLY"), "strict form");
        let rows = compare_messages(
            "q",
            Aspect::Aesthetic,
            &[ImageRef::Url("http://h/a.png".into())],
            &[ImageRef::Png(vec![1, 2, 3])],
            false,
        );
        let crate::protocol::Content::Parts(parts) = &rows[1].content else {
            panic!("parts")
        };
        assert_eq!(parts.len(), 5);
        assert!(
            matches!(&parts[3], Part::ImageUrl { image_url } if image_url.url == "data:image/png;base64,AQID")
        );
    }
}
