//! Reading the JSON fields that take several shapes (typed request bodies keep them as JSON,
//! see `schema.rs`) in JSON's terms: `null` counts as absent (as OpenAI's API reads it), and a
//! field of the wrong type is a 400 naming it ("'tools' must be an array, got a string").

use serde_json::{Map, Value};

use crate::error::ApiError;

/// Typed access to an object's fields, treating `null` as absent as OpenAI does.
pub(crate) struct Fields<'a>(pub(crate) &'a Map<String, Value>);

impl Fields<'_> {
    pub(crate) fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|value| !value.is_null())
    }

    pub(crate) fn array(&self, name: &str) -> Result<Option<&Vec<Value>>, ApiError> {
        self.typed(name, "an array", Value::as_array)
    }

    fn typed<'v, T>(
        &'v self,
        name: &str,
        expected: &str,
        read: impl FnOnce(&'v Value) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => read(value).map(Some).ok_or_else(|| {
                ApiError::invalid_param(
                    name,
                    format!("'{name}' must be {expected}, got {}", describe(value)),
                )
            }),
        }
    }
}

pub(crate) fn missing(name: &str) -> ApiError {
    ApiError::invalid_param(name, format!("missing required parameter '{name}'"))
}

/// A JSON value described for an error message, without echoing long input back.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(_) => "a string".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}
