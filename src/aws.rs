//! Signed calls to AWS APIs without their SDK crates: the SDK's credential
//! chain and SigV4 signer over one HTTPS client. The HA agent speaks EC2's
//! and Auto Scaling's query protocol with it, the audit shipper CloudWatch
//! Logs' JSON protocol; the per-service SDK crates would have doubled CI's
//! build for a handful of operations.

use hyper_rustls::ConfigBuilderExt as _;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Answers are read up to this size.
const MAX_RESPONSE_BYTES: usize = 4 << 20;
/// Cached credentials are renewed this long before they expire.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("unreachable: {0}")]
    Transport(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("no AWS credentials: {0}")]
    Credentials(String),
}

/// One API: the name it signs with, and where it is.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub signing_name: &'static str,
    pub url: String,
}

impl Endpoint {
    /// At `AWS_ENDPOINT_URL_<SERVICE>` (`env`) or `AWS_ENDPOINT_URL` if set
    /// (a VPC endpoint, or a local test server), else the regional
    /// endpoint `https://HOST.REGION.amazonaws.com/`.
    pub fn new(signing_name: &'static str, host: &str, env: &str, region: &str) -> Endpoint {
        let url = [env, "AWS_ENDPOINT_URL"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| format!("https://{host}.{region}.amazonaws.com"));
        Endpoint {
            signing_name,
            url: url.trim_end_matches('/').to_owned() + "/",
        }
    }
}

/// The SDK's HTTPS client with rustls on ring (its default, aws-lc, is a
/// large C build), for the S3 list source, IMDS and the credential chain.
pub fn https_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

type Https = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// Signs and sends requests for one region.
pub struct Caller {
    region: String,
    credentials: aws_credential_types::provider::SharedCredentialsProvider,
    cached: Mutex<Option<aws_credential_types::Credentials>>,
    http: Https,
    connect_timeout: Duration,
}

impl Caller {
    /// For `region`, with the standard credential chain (the instance role
    /// on EC2); connections give up after `connect_timeout`.
    pub async fn new(region: &str, connect_timeout: Duration) -> Result<Caller, CallError> {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_owned()))
            // The instance role's credentials come from IMDS over it.
            .http_client(https_client())
            .load()
            .await;
        let credentials = shared
            .credentials_provider()
            .ok_or_else(|| CallError::Credentials("no credential provider".into()))?;
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(false);
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| CallError::Transport(e.to_string()))?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(
                tls.with_native_roots()
                    .map_err(|e| CallError::Transport(e.to_string()))?
                    .with_no_client_auth(),
            )
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(https);
        Ok(Caller {
            region: region.to_owned(),
            credentials,
            cached: Mutex::new(None),
            http,
            connect_timeout,
        })
    }

    async fn credentials(&self) -> Result<aws_credential_types::Credentials, CallError> {
        let fresh = |c: &aws_credential_types::Credentials| {
            c.expiry().is_none_or(|e| {
                e.duration_since(SystemTime::now())
                    .is_ok_and(|left| left > RENEW_BEFORE)
            })
        };
        if let Ok(cached) = self.cached.lock()
            && let Some(c) = cached.as_ref().filter(|c| fresh(c))
        {
            return Ok(c.clone());
        }
        use aws_credential_types::provider::ProvideCredentials;
        let c = tokio::time::timeout(self.connect_timeout, self.credentials.provide_credentials())
            .await
            .map_err(|_| CallError::Credentials("timed out".into()))?
            .map_err(|e| CallError::Credentials(e.to_string()))?;
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some(c.clone());
        }
        Ok(c)
    }

    /// POSTs `body` with `headers` (content-type among them), signed; the
    /// status and body of the answer, all within `timeout`.
    pub async fn post(
        &self,
        endpoint: &Endpoint,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(u16, bytes::Bytes), CallError> {
        tokio::time::timeout(timeout, self.post_unbounded(endpoint, headers, body))
            .await
            .map_err(|_| CallError::Timeout(timeout))?
    }

    async fn post_unbounded(
        &self,
        endpoint: &Endpoint,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<(u16, bytes::Bytes), CallError> {
        use http_body_util::BodyExt;
        let mut request = http::Request::builder().method("POST").uri(&endpoint.url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let identity =
            aws_smithy_runtime_api::client::identity::Identity::from(self.credentials().await?);
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(endpoint.signing_name)
            .time(SystemTime::now())
            .settings(aws_sigv4::http_request::SigningSettings::default())
            .build()
            .map_err(|e| CallError::Credentials(e.to_string()))?
            .into();
        let signable = aws_sigv4::http_request::SignableRequest::new(
            "POST",
            &endpoint.url,
            headers.iter().copied(),
            aws_sigv4::http_request::SignableBody::Bytes(&body),
        )
        .map_err(|e| CallError::Credentials(e.to_string()))?;
        let (instructions, _) = aws_sigv4::http_request::sign(signable, &params)
            .map_err(|e| CallError::Credentials(e.to_string()))?
            .into_parts();
        let mut request = request
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|e| CallError::Transport(e.to_string()))?;
        instructions.apply_to_request_http1x(&mut request);
        let response = self
            .http
            .request(request)
            .await
            .map_err(|e| CallError::Transport(e.to_string()))?;
        let status = response.status().as_u16();
        let limited = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES);
        let bytes = limited
            .collect()
            .await
            .map_err(|e| CallError::Transport(e.to_string()))?
            .to_bytes();
        Ok((status, bytes))
    }
}
