//! The two CloudWatch Logs calls the shipper makes, over the API's JSON
//! protocol, signed by [`crate::aws`].

use super::batch::Event;
use crate::aws::{CallError, Caller, Endpoint};
use std::time::Duration;

/// One call, from connect to the last byte of the answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogsError {
    #[error("CloudWatch Logs throttled the request ({0})")]
    Throttled(String),
    /// The group or the stream does not exist (any more).
    #[error("CloudWatch Logs: {0}")]
    NotFound(String),
    #[error("CloudWatch Logs refused {action}: {code}: {message}")]
    Api {
        action: &'static str,
        code: String,
        message: String,
    },
    #[error("CloudWatch Logs {0}")]
    Call(#[from] CallError),
    #[error("CloudWatch Logs answer unreadable: {0}")]
    Malformed(String),
}

impl LogsError {
    /// CloudWatch refuses this batch as it is, and would again: retrying
    /// it cannot help. Everything else may pass once fixed (access, keys,
    /// throttling, an outage) and is retried.
    pub fn batch_refused(&self) -> bool {
        matches!(self, LogsError::Api { code, .. } if code == "InvalidParameterException")
    }

    /// The error metric's label.
    pub fn kind(&self) -> &'static str {
        match self {
            LogsError::Throttled(_) => "throttled",
            LogsError::NotFound(_) => "not_found",
            LogsError::Api { .. } => "api",
            LogsError::Call(CallError::Credentials(_)) => "credentials",
            LogsError::Call(_) => "unreachable",
            LogsError::Malformed(_) => "malformed",
        }
    }
}

/// Events CloudWatch did not take: too old for the group's retention,
/// too far in the past or the future. It took the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rejected {
    pub count: usize,
}

pub struct Logs {
    caller: Caller,
    endpoint: Endpoint,
}

impl Logs {
    pub async fn new(region: &str) -> Result<Logs, LogsError> {
        Ok(Logs {
            caller: Caller::new(region, CALL_TIMEOUT).await?,
            endpoint: Endpoint::new("logs", "logs", "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS", region),
        })
    }

    async fn call(
        &self,
        action: &'static str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, LogsError> {
        let target = format!("Logs_20140328.{action}");
        let headers = [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", target.as_str()),
        ];
        let (status, bytes) = self
            .caller
            .post(
                &self.endpoint,
                &headers,
                body.to_string().into_bytes(),
                CALL_TIMEOUT,
            )
            .await?;
        answer(action, status, &bytes)
    }

    /// Creates the stream; one that exists already is fine.
    pub async fn create_stream(&self, group: &str, stream: &str) -> Result<(), LogsError> {
        let body = serde_json::json!({"logGroupName": group, "logStreamName": stream});
        match self.call("CreateLogStream", body).await {
            Ok(_) => Ok(()),
            Err(LogsError::Api { code, .. }) if code == "ResourceAlreadyExistsException" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Puts one batch (in time order, within the API's limits).
    pub async fn put(
        &self,
        group: &str,
        stream: &str,
        events: &[Event],
    ) -> Result<Rejected, LogsError> {
        let events: Vec<serde_json::Value> = events
            .iter()
            .map(|e| serde_json::json!({"timestamp": e.timestamp, "message": e.message}))
            .collect();
        let total = events.len();
        let body = serde_json::json!({
            "logGroupName": group,
            "logStreamName": stream,
            "logEvents": events,
        });
        let answer = self.call("PutLogEvents", body).await?;
        Ok(rejected(&answer["rejectedLogEventsInfo"], total))
    }
}

/// How many events `rejectedLogEventsInfo` says were not taken: those up
/// to `tooOldLogEventEndIndex` and `expiredLogEventEndIndex` (exclusive),
/// and from `tooNewLogEventStartIndex` on.
fn rejected(info: &serde_json::Value, total: usize) -> Rejected {
    let index = |key: &str| {
        info[key]
            .as_u64()
            .and_then(|i| usize::try_from(i).ok())
            .map(|i| i.min(total))
    };
    let old = index("tooOldLogEventEndIndex")
        .max(index("expiredLogEventEndIndex"))
        .unwrap_or(0);
    let new = index("tooNewLogEventStartIndex").map_or(0, |start| total - start.max(old));
    Rejected { count: old + new }
}

/// The parsed body of a success, or the error it carries (`__type`,
/// possibly namespaced `…#Code`, and `message`).
fn answer(action: &'static str, status: u16, bytes: &[u8]) -> Result<serde_json::Value, LogsError> {
    let parsed = if bytes.is_empty() {
        Ok(serde_json::Value::Null)
    } else {
        serde_json::from_slice::<serde_json::Value>(bytes)
    };
    if (200..300).contains(&status) {
        return parsed.map_err(|e| LogsError::Malformed(e.to_string()));
    }
    let body = parsed.unwrap_or_default();
    let code = body["__type"]
        .as_str()
        .map(|t| t.rsplit('#').next().unwrap_or(t).to_owned())
        .unwrap_or_else(|| format!("HTTP {status}"));
    let message = body["message"]
        .as_str()
        .or(body["Message"].as_str())
        .unwrap_or_default()
        .to_owned();
    if code.starts_with("Throttling") || status == 429 || status == 503 {
        return Err(LogsError::Throttled(code));
    }
    if code == "ResourceNotFoundException" {
        return Err(LogsError::NotFound(message));
    }
    Err(LogsError::Api {
        action,
        code,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_cloudwatch_did_not_take() {
        let none = serde_json::Value::Null;
        assert_eq!(rejected(&none, 10).count, 0);
        let info = serde_json::json!({"tooOldLogEventEndIndex": 3, "tooNewLogEventStartIndex": 8});
        assert_eq!(rejected(&info, 10).count, 5);
        let info = serde_json::json!({"expiredLogEventEndIndex": 4, "tooOldLogEventEndIndex": 2});
        assert_eq!(rejected(&info, 10).count, 4);
        // Indices past the batch, or overlapping, never count more than it.
        let info = serde_json::json!({"tooOldLogEventEndIndex": 50, "tooNewLogEventStartIndex": 2});
        assert_eq!(rejected(&info, 10).count, 10);
    }

    #[test]
    fn tells_throttling_missing_and_refused_apart() {
        let throttled =
            br#"{"__type":"com.amazonaws.logs#ThrottlingException","message":"Rate exceeded"}"#;
        assert!(matches!(
            answer("PutLogEvents", 400, throttled),
            Err(LogsError::Throttled(code)) if code == "ThrottlingException"
        ));
        let missing = br#"{"__type":"ResourceNotFoundException","message":"The specified log stream does not exist."}"#;
        assert!(matches!(
            answer("PutLogEvents", 400, missing),
            Err(LogsError::NotFound(_))
        ));
        let bad = br#"{"__type":"InvalidParameterException","message":"Log events in a single PutLogEvents request must be in chronological order."}"#;
        match answer("PutLogEvents", 400, bad) {
            Err(LogsError::Api { code, message, .. }) => {
                assert_eq!(code, "InvalidParameterException");
                assert!(message.contains("chronological"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            answer("PutLogEvents", 503, b"<html>"),
            Err(LogsError::Throttled(_))
        ));
        assert!(matches!(
            answer("PutLogEvents", 200, b"{"),
            Err(LogsError::Malformed(_))
        ));
        assert_eq!(
            answer("CreateLogStream", 200, b"").unwrap(),
            serde_json::Value::Null
        );
        let denied = br#"{"__type":"AccessDeniedException","message":"not authorized"}"#;
        let e = answer("PutLogEvents", 400, denied).expect_err("denied");
        assert!(!e.batch_refused(), "an IAM mistake is retried, not dropped");
        assert!(
            answer("PutLogEvents", 400, bad)
                .expect_err("bad")
                .batch_refused()
        );
    }
}
