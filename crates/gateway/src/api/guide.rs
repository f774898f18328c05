//! The step every dialect shares between parsing its request and running it: the tools a
//! request offers and the output format it asks for become one [`Guide`] (the grammar the
//! answer obeys, the tools the prompt lists, whether the answer may hold calls), and a finished
//! or streamed answer is split back into text and tool calls with it.
//!
//! ```text
//! chat / messages / responses / ollama ─ parse their own fields ─> Tools + format grammar
//!        └─> Guide::new ─> Job { grammar, Prompt::Chat(messages, guide.in_prompt) }
//!                               └─> answer text ─> Guide::answer / Guide::stream
//! ```

use super::generation::GrammarRequest;
use super::tools::{self, CallStream, Choice, Tools};
use crate::error::ApiError;
use serde_json::Value;

/// How a request's answer is constrained and read back.
pub struct Guide {
    /// The grammar every choice obeys, if any.
    pub grammar: Option<GrammarRequest>,
    /// `Some(calls_only)` when the answer may hold tool calls (`calls_only`: `required` or a
    /// named function, so the answer is nothing but calls).
    pub calls: Option<bool>,
    /// The tools the prompt lists (none when the model may not call them).
    pub in_prompt: Vec<Value>,
}

impl Guide {
    /// Combines the tools and the output format of a request; `format_param` names the
    /// format's field in the dialect (refused beside callable tools, which have their own
    /// grammar).
    pub fn new(
        tools: Option<Tools>,
        format: Option<GrammarRequest>,
        format_param: &'static str,
    ) -> Result<Self, ApiError> {
        let calling = tools.as_ref().filter(|t| t.choice != Choice::None);
        if calling.is_some() && format.is_some() {
            return Err(ApiError::invalid(
                format!(
                    "`{format_param}` cannot be combined with callable tools yet; leave one out \
                     or make the tools not callable"
                ),
                Some(format_param),
            ));
        }
        let calls = calling.map(|t| t.choice != Choice::Auto);
        let in_prompt = tools.as_ref().map(Tools::in_prompt).unwrap_or_default();
        let grammar = match (&tools, format) {
            (Some(t), Some(f)) if t.choice == Choice::None => Some(f),
            (Some(t), _) => Some(t.grammar()),
            (None, f) => f,
        };
        Ok(Self {
            grammar,
            calls,
            in_prompt,
        })
    }

    /// A guide with only an output format (routes without tools).
    pub fn format(format: Option<GrammarRequest>) -> Self {
        Self {
            grammar: format,
            calls: None,
            in_prompt: Vec::new(),
        }
    }

    /// A finished answer as text (`None` when it is only calls) and OpenAI-shaped tool calls
    /// (`{"id", "type": "function", "function": {"name", "arguments": JSON text}}`).
    pub fn answer(&self, text: &str) -> (Option<String>, Vec<Value>) {
        match self.calls {
            Some(only) => tools::parse_answer(text, only),
            None => (Some(text.to_owned()), Vec::new()),
        }
    }

    /// A parser for one choice's streamed answer, when it may hold calls.
    pub fn stream(&self) -> Option<CallStream> {
        self.calls.map(CallStream::new)
    }
}

/// A tool call's `arguments` (JSON text) as an object; `None` when the text is not one (a call
/// cut by `max_tokens`), so the dialect can send the text as it is instead.
pub fn arguments(call: &Value) -> Option<Value> {
    call["function"]["arguments"]
        .as_str()
        .and_then(|a| serde_json::from_str::<Value>(a).ok())
        .filter(Value::is_object)
}
