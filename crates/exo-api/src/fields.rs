//! The words of the API's errors about fields: a missing one, and a JSON value described
//! without echoing long input back ("'tools' must be an array, got a string").

use serde_json::Value;

use crate::error::ApiError;

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
